"""The default recipe: a CIFAR-style ResNet-20 on Fashion-MNIST, sized for a 2-core CPU.

Target: >= 92% test accuracy in <= 10 minutes of CPU training. Measured recipe (see README); the lines below are the whole
recipe; everything else is jaxcnn.config.base_config(). Argument (`--config default:ARG`):
  smoke | runlocal   a few steps on a subset with a narrow ResNet (tests, CI).
"""

from jaxcnn.config import base_config, check_arg, shrink_for_smoke


def get_config(arg=None):
    check_arg('default', arg)
    c = base_config()
    # A CIFAR ResNet with two basic blocks per stage (ResNet-14: 16/32/64 channels, 0.17M
    # parameters): on a 2-core CPU it trains ~1.4x faster than ResNet-20, which buys the extra
    # epoch that short schedules need.
    c.model = 'resnet20'
    c.model_kwargs.layers = (2, 2, 2)
    # one XLA device: its dense convolutions then run on oneDNN (jaxcnn/kernels/onednn.py), whose steps are
    # ~1.3x faster here than two devices (one per core) data-parallel on XLA's own convolutions
    c.cpu_devices = 0
    c.dataset = 'fmnist'
    c.image_size = c.test_image_size = 28
    c.batch_size = 128
    c.num_epochs = 4.6
    c.optim.name = 'sgd'
    c.optim.lr = 0.2  # for batch 128
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.schedule.name = 'cosine'
    c.schedule.warmup_epochs = 0.3
    c.augment.crop_padding = 0  # flips only: crops cost accuracy at 4-5 epochs
    c.augment.flip = True
    c.label_smoothing = 0.1
    c.ema_decay = 0.0
    c.eval_every_epochs = 2.3
    c.checkpoint_every_steps = 500
    if arg in ('smoke', 'runlocal'):
        shrink_for_smoke(c)
    return c
