"""AlexNet (torchvision layout) on Fashion-MNIST, images resized to 64x64.

conv1's 11x11/4 needs more than 28 pixels; at 64 px the last max-pool reads a 3x3 map and
the adaptive pool brings it to torchvision's 6x6 before fc6. fc6/fc7 are narrowed to 1024
units (10 classes do not need 4096). Argument: smoke | runlocal (narrow convolutions).
"""

from jaxcnn.config import zoo_fmnist_config

# (out channels, kernel, stride, padding, groups, LRN, max-pool after): torchvision's rows at
# a quarter of the width, for the smoke run
_NARROW = (
    (16, 11, 4, 2, 1, False, True),
    (48, 5, 1, 2, 1, False, True),
    (96, 3, 1, 1, 1, False, False),
    (64, 3, 1, 1, 1, False, False),
    (64, 3, 1, 1, 1, False, True),
)


def get_config(arg=None):
    return zoo_fmnist_config(
        'alexnet_fmnist',
        arg,
        'alexnet',
        image_size=64,
        num_epochs=10.0,
        optim=dict(lr=0.01, weight_decay=5e-4),
        model_kwargs=dict(mlp_width=1024),
        smoke_model_kwargs=dict(convs=_NARROW, mlp_width=256, drop_rate=0.0),
        smoke_lr=0.02,
    )
