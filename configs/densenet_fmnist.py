"""DenseNet-BC (L = 100, k = 12; Huang et al. 2017, Table 2) on Fashion-MNIST at 28x28.

The CIFAR stem (one 3x3 conv with 2k channels) keeps the resolution, and the two transitions
halve it: 28 -> 14 -> 7, so no resizing is needed. Optimiser from the paper's CIFAR recipe
(§4.2): SGD Nesterov 0.9, lr 0.1, weight decay 1e-4, batch 64; a cosine schedule replaces
its /10 steps at 50 % and 75 % of the epochs. Argument: smoke | runlocal (DenseNet-BC with
two layers per block, k = 8).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'densenet_fmnist',
        arg,
        'densenet_bc_100_k12',
        image_size=28,
        num_epochs=10.0,
        batch_size=64,
        optim=dict(lr=0.1, weight_decay=1e-4),
        smoke_model_kwargs=dict(depths=(2, 2, 2), growth_rate=8, stem_width=16),
        smoke_lr=0.1,
    )
