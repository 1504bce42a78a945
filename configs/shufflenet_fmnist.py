"""ShuffleNet v2 1x (Ma et al. 2018, Table 5) on Fashion-MNIST.

Images are resized to 32x32 so that the stride-32 network (3x3/2 conv, 3x3/2 max-pool, three
stride-2 stages) ends at a 1x1 map. Weight decay 4e-5 as in the paper (§5). Argument:
smoke | runlocal (one unit per stage, narrow).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'shufflenet_fmnist',
        arg,
        'shufflenet_v2_x1_0',
        image_size=32,
        num_epochs=10.0,
        optim=dict(lr=0.1, weight_decay=4e-5),
        smoke_model_kwargs=dict(
            stage_channels=(16, 32, 64), stage_repeats=(1, 1, 1), num_features=128
        ),
        smoke_lr=0.1,
    )
