"""RevNet-38 (Gomez et al. 2017) on Fashion-MNIST at 28x28, offline; backprop by reconstruction.

The CIFAR network as is (3x3 stem, three stages 28 -> 14 -> 7), trained with the memory-free
reversible backward pass. Argument: smoke | runlocal (a narrow RevNet, a few steps; the model
stays reversible so the smoke run exercises the custom VJP).
"""

from jaxcnn.config import base_config, check_arg, shrink_for_smoke


def get_config(arg=None):
    check_arg('revnet38_fmnist', arg)
    c = base_config()
    c.model = 'revnet38'  # 0.46M parameters, Table 1
    c.dataset = 'fmnist'
    c.image_size = c.test_image_size = 28
    c.batch_size = 128
    c.num_epochs = 10.0
    c.optim.update(dict(name='sgd', lr=0.1, momentum=0.9, nesterov=True, weight_decay=2e-4))
    c.schedule.update(dict(name='cosine', warmup_epochs=0.5))
    c.augment.update(dict(crop_padding=2, flip=True))
    c.checkpoint_every_epochs = 1.0
    c.checkpoint_every_steps = -1
    if arg in ('smoke', 'runlocal'):
        shrink_for_smoke(c)
        # shrink_for_smoke swaps in a tiny ResNet; keep a (narrow) RevNet instead
        c.model = 'revnet38'
        c.model_kwargs = {
            'layers': (1, 2, 2),
            'widths': (8, 16, 16),
            'stem_width': 8,
            **{k: v for k, v in c.model_kwargs.items() if k.startswith('drop')},
        }
    return c
