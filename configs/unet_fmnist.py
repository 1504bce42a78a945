"""Segmentation of Fashion-MNIST: a U-Net over ResNet-20 labels every pixel with its garment's
class, or background (dataset 'fmnist_masks', 11 classes; the test metric is the mean IoU).

The contracting path is ResNet-20's feature pyramid at 28 px (28, 28, 14, 7), the expanding
path U-Net's (jaxcnn/models/segmentation.py). The backbone can start from a Fashion-MNIST
classifier: train ``resnet20`` on 'fmnist' into a workdir, then pass it as
``--config.init_from=WORKDIR``; ``transfer.trainable`` names the parts the classifier lacks, so
the encoder takes the classifier's weights and the decoder and head start fresh.
Argument: smoke | runlocal.
"""

from jaxcnn.config import base_config, check_arg, shrink_for_smoke


def get_config(arg=None):
    check_arg('unet_fmnist', arg)
    c = base_config()
    c.model = 'unet_resnet20'
    c.dataset = 'fmnist_masks'
    c.image_size = c.test_image_size = 28
    c.batch_size = 128
    c.num_epochs = 10.0
    c.optim.update(dict(name='adamw', lr=3e-3, weight_decay=1e-4))
    c.schedule.update(dict(name='cosine', warmup_epochs=0.5))
    c.augment.update(dict(crop_padding=2, flip=True))  # the masks move with the images
    c.transfer.trainable = '^(decoder|head)/'
    c.transfer.head_steps = 0
    c.checkpoint_every_epochs = 1.0
    c.checkpoint_every_steps = -1
    if arg in ('smoke', 'runlocal'):
        shrink_for_smoke(c)
        c.model, c.model_kwargs = 'unet_resnet20', {}
        c.dataset = 'fmnist_masks'
        c.train_subset, c.test_subset = 2048, 256
        c.num_steps = 60
        c.log_every_steps = 5
        c.eval_every_steps = 60
        c.checkpoint_every_steps = 60
        c.optim.lr = 3e-3
    return c
