"""GhostNet 1.0x (Han et al. 2020, Table 7) on Fashion-MNIST.

Images are resized to 32x32 so the five stride-2 layers end at a 1x1 map; weight decay 4e-5
and dropout 0.2 before the classifier as in the paper's ImageNet recipe (§4.2). Argument:
smoke | runlocal (width multiplier 0.25, no dropout).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'ghostnet_fmnist',
        arg,
        'ghostnet_100',
        image_size=32,
        num_epochs=10.0,
        optim=dict(lr=0.1, weight_decay=4e-5),
        smoke_model_kwargs=dict(width=0.25, drop_rate=0.0),
        smoke_lr=0.1,
    )
