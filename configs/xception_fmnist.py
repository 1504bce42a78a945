"""Xception (timm legacy_xception layout) on Fashion-MNIST at 64x64.

At 64 px the entry flow leaves a 4x4 map for the middle flow and the exit flow a 2x2 one
(10x10 at 299 px). Argument: smoke | runlocal (every width an eighth, two middle-flow blocks).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'xception_fmnist',
        arg,
        'xception',
        image_size=64,
        num_epochs=10.0,
        optim=dict(lr=0.05, weight_decay=1e-4),
        smoke_model_kwargs=dict(width=0.125, middle_repeats=2),
        smoke_lr=0.05,
    )
