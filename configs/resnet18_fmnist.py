"""ResNet-18 (He et al. 2016) on Fashion-MNIST at 28x28, full 30-epoch schedule.

The ImageNet stem (7x7/2 conv + max-pool) would shrink 28 px to 7 px before the first
stage, so the CIFAR stem (one 3x3 conv) is used, as is usual for small images:
28 -> 28 -> 14 -> 7 -> 4. Argument: smoke | runlocal.
"""

from jaxcnn.config import base_config, check_arg, shrink_for_smoke


def get_config(arg=None):
    check_arg('resnet18_fmnist', arg)
    c = base_config()
    c.model = 'resnet18'
    c.model_kwargs.stem = 'cifar'
    c.dataset = 'fmnist'
    c.image_size = c.test_image_size = 28
    c.batch_size = 128
    c.num_epochs = 30.0
    c.optim.update(dict(name='sgd', lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))
    c.schedule.update(dict(name='cosine', warmup_epochs=1.0))
    c.augment.update(dict(crop_padding=2, flip=True, random_erasing=0.25))
    c.label_smoothing = 0.1
    c.ema_decay = 0.999
    c.checkpoint_every_epochs = 1.0
    c.checkpoint_every_steps = -1
    if arg in ('smoke', 'runlocal'):
        shrink_for_smoke(c)
    return c
