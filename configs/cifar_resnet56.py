"""ResNet-56 on CIFAR-10, the recipe of He et al. 2016 (Deep Residual Learning, §4.2).

SGD momentum 0.9 (no Nesterov), batch 128, lr 0.1 divided by 10 at 32k and 48k iterations,
64k iterations in all, weight decay 1e-4, 4-pixel zero padding + random 32x32 crop + flip,
per-channel normalisation. (The paper trains on a 45k/5k split; we train on all 50k.)
Needs tensorflow-datasets with cifar10 prepared. Argument: smoke | runlocal (Fashion-MNIST).
"""

from jaxcnn.config import base_config, check_arg, shrink_for_smoke

STEPS_PER_EPOCH = 50_000 // 128  # 390: the milestones below are exact in iterations


def get_config(arg=None):
    check_arg('cifar_resnet56', arg)
    c = base_config()
    c.model = 'resnet56'
    c.dataset = 'tfds:cifar10'
    c.num_classes = 10
    c.image_size = c.test_image_size = 32
    c.batch_size = 128
    c.num_steps = 64_000
    c.optim.update(dict(name='sgd', lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4))
    c.schedule.update(
        dict(
            name='multistep',
            decay_factor=0.1,
            milestones_epochs=(32_000 / STEPS_PER_EPOCH, 48_000 / STEPS_PER_EPOCH),
        )
    )
    c.augment.update(dict(crop_padding=4, flip=True))
    c.eval_every_steps = 2_000
    c.checkpoint_every_steps = 2_000
    c.log_every_steps = 100
    if arg in ('smoke', 'runlocal'):
        shrink_for_smoke(c)
    return c
