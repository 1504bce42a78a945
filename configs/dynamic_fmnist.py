"""Dynamic filter network (Jia, De Brabandere et al. 2016) on Fashion-MNIST: per stage a
residual dynamic convolution (a 3x3 kernel generated per sample) and a residual dynamic local
filter (a 3x3 filter generated per pixel, then a 1x1 conv); ``dynconv_cifar``.

SGD with Nesterov momentum, cosine schedule; the generators' weights decay like any kernel.
Argument: smoke | runlocal (widths 8/16/32, 8-unit generators).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'dynamic_fmnist',
        arg,
        'dynconv_cifar',
        num_epochs=15.0,
        optim=dict(lr=0.05, weight_decay=5e-4),
        smoke_model_kwargs=dict(widths=(8, 16, 32), hidden=8, local_hidden=8),
        smoke_lr=0.05,
    )
