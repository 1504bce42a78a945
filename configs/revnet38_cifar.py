"""RevNet-38 on CIFAR-10, the recipe of Gomez et al. 2017 (§5.1, after He et al. 2016).

The schedule of configs/cifar_resnet56.py with the RevNet authors' released settings: batch
100, lr 0.1 divided by 10 at 40k and 60k iterations, 80k in all, weight decay 2e-4.
Needs tensorflow-datasets with cifar10 prepared. Argument: smoke | runlocal
(Fashion-MNIST, a narrow RevNet that still runs the reversible backward pass).
"""

from jaxcnn.config import check_arg, load_config

STEPS_PER_EPOCH = 50_000 // 100  # 500: the milestones below are exact in iterations


def get_config(arg=None):
    check_arg('revnet38_cifar', arg)
    c, _ = load_config('cifar_resnet56' + (f':{arg}' if arg else ''))
    if arg in ('smoke', 'runlocal'):
        # the smoke variant keeps a (narrow) RevNet of the same kind, with the smoke drop rates
        c.model = 'revnet38'
        c.model_kwargs = {
            'layers': (1, 2, 2),
            'widths': (8, 16, 16),
            'stem_width': 8,
            **{k: v for k, v in c.model_kwargs.items() if k.startswith('drop')},
        }
        return c
    c.model = 'revnet38'
    c.batch_size = 100
    c.num_steps = 80_000
    c.optim.weight_decay = 2e-4
    c.schedule.milestones_epochs = (40_000 / STEPS_PER_EPOCH, 60_000 / STEPS_PER_EPOCH)
    return c
