"""FractalNet-20 (Larsson et al. 2017: B = 5 blocks, C = 3 columns) on Fashion-MNIST at 32x32.

The paper's regularisation (§3.3): local drop-path at 15 % per join input, mixed 50/50 by
mini-batch with global sampling of one column, and dropout (0, 0.1, 0.2, 0.3, 0.4) per block;
SGD with momentum 0.9 from lr 0.02, batch 100. The paper trains 400 epochs on CIFAR, dividing
the rate by 10 whenever the remaining epochs halve; here 20 epochs with the zoo's cosine
schedule. Images are resized to 32x32 so the five 2x2 pools end at 1x1 (28 would not divide).
Evaluate the deepest column alone with ``--config.model_kwargs.column=2``.
Argument: smoke | runlocal (the same three-column blocks, narrower, without drop-path and
dropout: in 40 steps the paper's regularisation keeps the loss near chance -- each mini-batch
trains another subnetwork, often a single column -- so the smoke run checks that the network
learns; drop-path is tested in tests/test_fractalnet.py).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'fractalnet_fmnist',
        arg,
        'fractalnet20',
        image_size=32,
        num_epochs=20.0,
        batch_size=100,
        optim=dict(lr=0.02),
        model_kwargs=dict(
            drop_path_rate=0.15, global_drop_ratio=0.5, block_dropout=(0.0, 0.1, 0.2, 0.3, 0.4)
        ),
        smoke_model_kwargs=dict(widths=(16, 32, 32, 64, 64), drop_path_rate=0.0, block_dropout=0.0),
        smoke_lr=0.05,
    )
