"""Network in Network (Lin, Chen & Yan 2014, CIFAR model) on Fashion-MNIST at 32x32.

Three mlpconv blocks and a global average over the last block's class maps, no fully
connected layer. BatchNorm inside the mlpconv layers (``use_bn``): the paper's network, without
normalisation, sits at chance for the first thousand-odd steps (its logits barely depend on
the image at initialisation), which a 10-epoch budget cannot afford.
Argument: smoke | runlocal (narrow mlpconv blocks).
"""

from jaxcnn.config import zoo_fmnist_config

# (width, kernel, 1x1 widths, pool after): the CIFAR table at a quarter of the width
_NARROW = ((48, 5, (40, 24), 'max'), (48, 5, (48, 48), 'avg'), (48, 3, (48,), None))


def get_config(arg=None):
    return zoo_fmnist_config(
        'nin_fmnist',
        arg,
        'nin_cifar',
        image_size=32,
        num_epochs=10.0,
        optim=dict(lr=0.1, weight_decay=1e-4),
        model_kwargs=dict(use_bn=True),
        smoke_model_kwargs=dict(blocks=_NARROW, drop_rate=0.0),
        smoke_lr=0.2,
    )
