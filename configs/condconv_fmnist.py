"""CondConv ResNet-20 (Yang et al. 2019) on Fashion-MNIST: ResNet-20 whose 3x3 block
convolutions mix 4 expert kernels with per-sample routing sigmoid(FC(GAP(x))).

He et al.'s CIFAR recipe under the zoo's cosine schedule: SGD Nesterov 0.9, lr 0.1, weight
decay 5e-4 (on the expert kernels and routing FCs too). Argument: smoke | runlocal (one block
per stage, widths 8/16/32).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'condconv_fmnist',
        arg,
        'condconv_resnet20',
        num_epochs=15.0,
        smoke_model_kwargs=dict(layers=(1, 1, 1), widths=(8, 16, 32), stem_width=8),
    )
