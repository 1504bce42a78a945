"""Wide ResNet 28-10 (Zagoruyko & Komodakis 2016) on Fashion-MNIST, the paper's schedule.

Paper recipe (§3, CIFAR): SGD Nesterov 0.9, lr 0.1 divided by 5 at epochs 60, 120 and 160
of 200, weight decay 5e-4, batch 128, dropout 0.3 between the convolutions of each block
(built into the 'wrn_28_10' row), random crop and flip. Argument: smoke | runlocal.
"""

from jaxcnn.config import base_config, check_arg, shrink_for_smoke


def get_config(arg=None):
    check_arg('wrn_28_10_fmnist', arg)
    c = base_config()
    c.model = 'wrn_28_10'
    c.dataset = 'fmnist'
    c.image_size = c.test_image_size = 28
    c.batch_size = 128
    c.num_epochs = 200.0
    c.optim.update(dict(name='sgd', lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))
    c.schedule.update(dict(name='multistep', milestones_epochs=(60, 120, 160), decay_factor=0.2))
    c.augment.update(dict(crop_padding=2, flip=True))
    c.checkpoint_every_epochs = 2.0
    c.checkpoint_every_steps = -1
    c.eval_every_epochs = 2.0
    if arg in ('smoke', 'runlocal'):
        shrink_for_smoke(c)
    return c
