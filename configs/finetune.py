"""Transfer learning on Fashion-MNIST: pre-train on five classes, transfer to the other five.

  python -m jaxcnn.train --config finetune:pretrain --workdir workdirs/pretrain   # classes 0-4
  python -m jaxcnn.train --config finetune --config.init_from=workdirs/pretrain  # classes 5-9

The second run loads the pretrained ResNet (any jaxcnn workdir, or a converted PyTorch
.pth/.safetensors file of the same architecture), replaces the head with a new 5-class one,
fits that head alone on backbone features computed once (transfer.head_steps), then fine-tunes
every weight at a tenth of the pre-training learning rate. The target task has only 1,000
labelled images (train_subset), where a pretrained backbone matters most; without
--config.init_from the same command trains from scratch for comparison (give it
--config.optim.lr=0.1, the rate a fresh network needs).

Arguments: pretrain | smoke | pretrain_smoke (the smoke ones: a narrow ResNet, a few steps).
To freeze the backbone instead of fine-tuning it: --config.transfer.freeze_backbone=True.
"""

from jaxcnn.config import base_config, check_arg

SOURCE_CLASSES = (0, 1, 2, 3, 4)  # T-shirt/top, Trouser, Pullover, Dress, Coat
TARGET_CLASSES = (5, 6, 7, 8, 9)  # Sandal, Shirt, Sneaker, Bag, Ankle boot


def get_config(arg=None):
    check_arg('finetune', arg, ('pretrain', 'smoke', 'pretrain_smoke'))
    pretrain = arg in ('pretrain', 'pretrain_smoke')
    c = base_config()
    c.model = 'resnet20'
    c.model_kwargs.layers = (2, 2, 2)
    c.dataset = 'fmnist'
    c.image_size = c.test_image_size = 28
    c.num_classes = 5
    c.batch_size = 128
    c.augment.update(dict(crop_padding=0, flip=True))
    c.label_smoothing = 0.1
    c.optim.update(dict(name='sgd', lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))
    c.schedule.update(dict(name='cosine', warmup_epochs=0.0, warmup_steps=0))
    if pretrain:
        c.classes = SOURCE_CLASSES
        c.num_epochs = 3.0
    else:
        c.classes = TARGET_CLASSES
        c.train_subset = 1000
        c.num_steps = 300
        c.optim.lr = 0.01  # a tenth of the pre-training rate
        c.transfer.head_steps = 300
        c.transfer.head_lr = 0.05
    c.eval_every_steps = c.num_steps if c.num_steps > 0 else -1
    c.checkpoint_every_steps = 500
    if arg in ('smoke', 'pretrain_smoke'):
        c.model_kwargs = dict(layers=(1, 1, 1), widths=(8, 16, 32), stem_width=8)
        c.batch_size, c.eval_batch_size = 32, 250
        c.test_subset = 500
        c.progress = False
        c.log_every_steps = 10
        if pretrain:
            c.train_subset, c.num_epochs, c.num_steps = 2000, -1.0, 120
        else:
            c.train_subset, c.num_steps, c.transfer.head_steps = 200, 40, 100
        c.eval_every_steps = c.checkpoint_every_steps = c.num_steps
    return c
