"""LeNet-5 (LeCun et al. 1998) on Fashion-MNIST: the 28x28 images padded to the paper's 32x32.

The paper pads MNIST's 28x28 digits into a 32x32 field so that strokes reach C1's receptive
fields at the border; resizing to 32 serves the same purpose here. Argument: smoke | runlocal.
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    # LeNet is small enough to train as is in the smoke run
    return zoo_fmnist_config(
        'lenet5_fmnist',
        arg,
        'lenet5',
        image_size=32,
        num_epochs=10.0,
        optim=dict(lr=0.05, weight_decay=1e-4),
        smoke_lr=0.1,
    )
