"""RevNet-110 on CIFAR-10: the recipe of configs/revnet38_cifar.py with the deeper model.

Argument: smoke | runlocal (Fashion-MNIST, a narrow RevNet of the same kind).
"""

from jaxcnn.config import check_arg, load_config


def get_config(arg=None):
    check_arg('revnet110_cifar', arg)
    c, _ = load_config('revnet38_cifar' + (f':{arg}' if arg else ''))
    c.model = 'revnet110'
    return c
