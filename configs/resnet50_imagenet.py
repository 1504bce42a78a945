"""ResNet-50 on ImageNet (ILSVRC-2012), 90 epochs.

Goyal et al. 2017 (arXiv:1706.02677): lr 0.1 per 256 images (0.4 at batch 1024) with 5
linear warm-up epochs, divided by 10 at epochs 30, 60 and 80; zero-initialised last BN
gamma of each block; SGD momentum 0.9, weight decay 1e-4 (not on BN and biases). Plus label
smoothing 0.1 (Szegedy et al. 2016). Random-resized crop 224 + flip; eval: resize 256,
centre crop 224. bf16 compute. Needs tensorflow-datasets with imagenet2012 prepared
(manual download). Argument: smoke | runlocal (Fashion-MNIST).
"""

from jaxcnn.config import base_config, check_arg, shrink_for_smoke


def get_config(arg=None):
    check_arg('resnet50_imagenet', arg)
    c = base_config()
    c.model = 'resnet50'
    c.model_kwargs.zero_init_last = True
    c.dataset = 'tfds:imagenet2012'
    c.num_classes = 1000
    c.image_size = c.test_image_size = 224
    c.normalization = 'model'
    c.batch_size = 1024
    c.eval_batch_size = 1024
    c.num_epochs = 90.0
    c.bf16 = True
    c.optim.update(
        dict(
            name='sgd',
            lr=0.1,
            lr_scaling='per_256',
            momentum=0.9,
            nesterov=False,
            weight_decay=1e-4,
        )
    )
    c.schedule.update(
        dict(name='multistep', warmup_epochs=5.0, milestones_epochs=(30, 60, 80), decay_factor=0.1)
    )
    c.augment.update(dict(crop_padding=0, flip=True))
    c.label_smoothing = 0.1
    c.log_every_steps = 100
    c.eval_every_epochs = 5.0
    c.checkpoint_every_steps = 2_000
    if arg in ('smoke', 'runlocal'):
        shrink_for_smoke(c)
    return c
