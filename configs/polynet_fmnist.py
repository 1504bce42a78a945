"""The small CIFAR PolyNet (Zhang et al. 2017 PolyInception modules: poly-2, mpoly-2 and 2-way
in every stage) on Fashion-MNIST at 28x28 (the two reductions give 14x14 and 7x7 stages).

SGD with Nesterov momentum 0.9, lr 0.1, weight decay 5e-4, batch 128, stochastic paths at
rate 0.1 (the paper drops PolyInception paths during training), 20 epochs with a cosine schedule.
Argument: smoke | runlocal (the same stage table with one module per stage, each kind once:
a third of the graph to compile).
"""

from jaxcnn.config import zoo_fmnist_config
from jaxcnn.models.polynet import REDUCTION_A, REDUCTION_B, UNIT_A, UNIT_B, UNIT_C


def get_config(arg=None):
    return zoo_fmnist_config(
        'polynet_fmnist',
        arg,
        'polynet_small_cifar',
        num_epochs=20.0,
        optim=dict(lr=0.1, weight_decay=5e-4),
        model_kwargs=dict(drop_path_rate=0.1),
        smoke_model_kwargs=dict(
            stages=(
                (64, UNIT_A, ('poly2',), REDUCTION_A),
                (128, UNIT_B, ('mpoly2',), REDUCTION_B),
                (256, UNIT_C, ('2way',), None),
            )
        ),
        smoke_lr=0.1,
    )
