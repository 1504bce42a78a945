"""Inception-v3 (torchvision layout, with its auxiliary classifier) on Fashion-MNIST at 139x139.

The 35x35, 17x17 and 8x8 grids of the 299-px network become 15x15, 7x7 and 3x3 at 139 px
(75 px, the smallest input it reads, leaves 7x7, 3x3 and 1x1, and learns visibly slower).
The auxiliary head on Mixed_6e adds its cross-entropy with weight 0.3 in training; below
299 px its pooled map is padded for the 5x5 convolution (see ``InceptionV3Aux``).
Argument: smoke | runlocal (every width an eighth).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'inception_v3_fmnist',
        arg,
        'inception_v3',
        image_size=139,
        num_epochs=10.0,
        optim=dict(lr=0.1, weight_decay=5e-4),
        smoke_model_kwargs=dict(width=0.125, drop_rate=0.0),
    )
