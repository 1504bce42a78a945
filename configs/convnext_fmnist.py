"""ConvNeXt-T (Liu et al. 2022) on Fashion-MNIST, with the paper's optimiser (AdamW, wd 0.05).

Images are resized to 32x32: the 4x4/4 patchify stem and three 2x2/2 downsamplings then end
at a 1x1 map (32 -> 8 -> 4 -> 2 -> 1). The paper's lr of 4e-3 at batch 4096 becomes 1e-3 at
batch 128; stochastic depth 0.1 as for ConvNeXt-T. Argument: smoke | runlocal (one narrow
block per stage).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'convnext_fmnist',
        arg,
        'convnext_tiny',
        image_size=32,
        num_epochs=10.0,
        optim=dict(name='adamw', lr=1e-3, weight_decay=0.05),
        model_kwargs=dict(drop_path_rate=0.1),
        smoke_model_kwargs=dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), drop_path_rate=0.0),
        smoke_lr=2e-3,
    )
