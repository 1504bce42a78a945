"""MobileNet v1 1.0 (Howard et al. 2017, Table 1) on Fashion-MNIST.

Images are resized to 32x32 so the five stride-2 layers end at a 1x1 map. Little weight decay
on the depthwise filters, as §4 advises (they hold few parameters): 4e-5 overall. Argument:
smoke | runlocal (width multiplier 0.5).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'mobilenetv1_fmnist',
        arg,
        'mobilenetv1_100',
        image_size=32,
        num_epochs=10.0,
        optim=dict(lr=0.1, weight_decay=4e-5),
        smoke_model_kwargs=dict(width=0.5),
        smoke_lr=0.1,
    )
