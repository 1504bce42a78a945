"""MobileNetV2 (Sandler et al. 2018) on Fashion-MNIST.

Images are resized to 32x32: the network's five stride-2 stages leave a 1x1 map before the
1280-wide head conv, as 224 px leaves 7x7 on ImageNet. Argument: smoke | runlocal (width 0.5,
half the blocks per stage).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'mobilenet_fmnist',
        arg,
        'mobilenetv2_100',
        image_size=32,
        num_epochs=10.0,
        optim=dict(lr=0.05, weight_decay=4e-5),
        model_kwargs=dict(drop_rate=0.2),
        smoke_model_kwargs=dict(width_mult=0.5, depth_mult=0.5, drop_rate=0.0),
        smoke_lr=0.1,
    )
