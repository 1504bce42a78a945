"""1.0-SqNxt-23 (Gholami et al. 2018) on Fashion-MNIST.

Images are resized to 64x64 so the unpadded 7x7/2 stem, the 3x3/2 max-pool and the three
stride-2 stages leave a 2x2 map (64 -> 29 -> 14 -> 14 -> 7 -> 4 -> 2). Argument:
smoke | runlocal (half width, one block per stage).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'squeezenext_fmnist',
        arg,
        'sqnxt23_w1',
        image_size=64,
        num_epochs=10.0,
        optim=dict(lr=0.1, weight_decay=1e-4),
        smoke_model_kwargs=dict(width=0.5, depths=(1, 1, 1, 1)),
        smoke_lr=0.1,
    )
