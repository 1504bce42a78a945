"""VGG-11 with BatchNorm (Simonyan & Zisserman 2015, config A) on Fashion-MNIST.

Images are resized to 32x32 so the five 2x2 max-pools leave a 1x1 map (torchvision's head
then pools it to 7x7 as it does for any input). Argument: smoke | runlocal (a narrow VGG).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'vgg_fmnist',
        arg,
        'vgg11_bn',
        image_size=32,
        num_epochs=10.0,
        optim=dict(lr=0.05, weight_decay=5e-4),
        model_kwargs=dict(mlp_width=512),
        # no dropout in the 40-step smoke run: with 0.5 on both hidden FC layers its loss fell
        # only to ~0.8x the first, under either form of the 2x2 maps' convolutions
        smoke_model_kwargs=dict(widths=(16, 32, 64, 64, 64), drop_rate=0.0),
        smoke_lr=0.1,
    )
