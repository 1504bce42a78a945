"""NFNet-F0 (Brock et al. 2021, arXiv:2102.06171), the paper's ImageNet recipe.

Batch 4096; SGD Nesterov 0.9; lr 0.1 per 256 images (1.6), 5 linear warm-up epochs, then
cosine to 0 over 360 epochs; weight decay 2e-5, not on gains and biases; Adaptive Gradient
Clipping lambda = 0.01 on every layer but the classifier; label smoothing 0.1; dropout 0.2
before the classifier; stochastic depth 0.25; EMA of the weights with decay 0.99999;
RandAugment (4 layers, magnitude 5) + MixUp (0.2) + CutMix (1.0); train at 192 px, test at
256 px; bf16 compute.

Model 'nfnet_f0' is used when registered; until then model_fallback ('resnet50') stands in
(the trainer logs the substitution).

Arguments:
  fmnist           the same recipe scaled to Fashion-MNIST on a 2-core CPU: a CIFAR ResNet-20,
                   train 24 px / test 28 px, a few hundred steps, every regulariser on.
  smoke | runlocal the fmnist variant shrunk to a few steps (tests, CI).
"""

from jaxcnn.config import base_config, check_arg, shrink_for_smoke


def get_config(arg=None):
    check_arg('nfnet_f0', arg, valid=('fmnist', 'smoke', 'runlocal'))
    c = base_config()
    c.model = 'nfnet_f0'
    c.model_fallback = 'resnet50'
    # The model scans its repeated blocks (short compiles); AGC and the decay mask treat the
    # stacked parameters block by block (optim.is_stacked).
    c.model_kwargs.update(dict(drop_rate=0.2, drop_path_rate=0.25))
    c.dataset = 'tfds:imagenet2012'
    c.num_classes = 1000
    c.image_size = 192
    c.test_image_size = 256
    c.normalization = 'model'
    c.batch_size = 4096
    c.eval_batch_size = 1024
    c.num_epochs = 360.0
    c.bf16 = True
    c.optim.update(
        dict(
            name='sgd',
            lr=0.1,
            lr_scaling='per_256',
            momentum=0.9,
            nesterov=True,
            weight_decay=2e-5,
            decay_exclude=r'(^|/)(gain|skip_gain|bias)$',
            agc_clip=0.01,
            agc_exclude=r'^head/',
        )
    )
    c.schedule.update(dict(name='cosine', warmup_epochs=5.0, end_lr_factor=0.0))
    c.augment.update(
        dict(
            crop_padding=0,
            flip=True,
            randaugment_layers=4,
            randaugment_magnitude=5,
            mixup=0.2,
            cutmix=1.0,
        )
    )
    c.label_smoothing = 0.1
    c.ema_decay = 0.99999
    c.log_every_steps = 100
    c.eval_every_epochs = 5.0
    c.checkpoint_every_steps = 1_000

    if arg in ('fmnist', 'smoke', 'runlocal'):
        # Same recipe, scaled: 300 steps of batch 256 (~1.3 epochs), warm-up 5% of training,
        # EMA horizon ~100 steps; RandAugment needs the TFDS host pipeline, so it is off here.
        c.model = c.model_fallback = 'resnet20'
        c.dataset = 'fmnist'
        c.num_classes = 10
        c.image_size, c.test_image_size = 24, 28
        c.normalization = 'dataset'
        c.batch_size = 256
        c.eval_batch_size = 1000
        c.num_steps = 300
        c.bf16 = False
        c.schedule.warmup_steps = 15
        c.augment.update(dict(crop_padding=2, randaugment_layers=0, randaugment_magnitude=0))
        c.ema_decay = 0.99
        c.log_every_steps = 10
        c.eval_every_steps = 100
        c.checkpoint_every_steps = 100
    if arg in ('smoke', 'runlocal'):
        shrink_for_smoke(c)
        c.image_size = 24  # keep the train/test resolution gap on the smoke path
    return c
