"""EfficientNet-B0 (Tan & Le 2019) on Fashion-MNIST, with progressive learning.

Images are resized to 32x32 (B0's stride 32 leaves a 1x1 map before the head, as 224 px
leaves 7x7). Stochastic depth 0.2 as in the paper. Training is progressive (Tan & Le 2021,
§4.2, which also applies it to EfficientNet V1): 4 stages from 16 px and dropout 0.1 up to
32 px and B0's dropout 0.2. Argument: smoke | runlocal (width 0.5, half the blocks per stage:
the compound-scaling function shrinking B0; 2 progressive stages).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    c = zoo_fmnist_config(
        'efficientnet_fmnist',
        arg,
        'efficientnet_b0',
        image_size=32,
        num_epochs=10.0,
        optim=dict(lr=0.05, weight_decay=1e-5),
        # unscanned stages: XLA:CPU runs convolutions inside lax.scan slowly (docs/reversible.md)
        model_kwargs=dict(drop_rate=0.2, drop_path_rate=0.2, scan_blocks=False),
        # smoke: width 0.5 at lr 0.2 learns clearly in 40 steps (loss ratio 0.65-0.70 whatever the
        # convolution kernels); width 0.25 at lr 0.1 sat at 0.73-0.82, on the test's 0.8 line
        smoke_model_kwargs=dict(width_mult=0.5, depth_mult=0.5, drop_rate=0.0, drop_path_rate=0.0),
        smoke_lr=0.2,
    )
    c.progressive.update(
        dict(stages=2 if arg else 4, start_image_size=16, start_drop_rate=0.0 if arg else 0.1)
    )
    return c
