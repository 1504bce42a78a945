"""RevNet-38 on CIFAR-10, the recipe of Gomez et al. 2017 (§5.1, after He et al. 2016).

SGD momentum 0.9, batch 100, lr 0.1 divided by 10 at 40k and 60k iterations, 80k in all,
weight decay 2e-4 (the authors' released configuration), 4-pixel zero padding + random 32x32
crop + flip. Needs tensorflow-datasets with cifar10 prepared. Argument: smoke | runlocal
(Fashion-MNIST, a narrow RevNet that still runs the reversible backward pass).
"""
from jaxcnn.config import base_config, check_arg, shrink_for_smoke

STEPS_PER_EPOCH = 50_000 // 100   # 500: the milestones below are exact in iterations


def get_config(arg=None):
  check_arg('revnet38_cifar', arg)
  c = base_config()
  c.model = 'revnet38'
  c.dataset = 'tfds:cifar10'
  c.num_classes = 10
  c.image_size = c.test_image_size = 32
  c.batch_size = 100
  c.num_steps = 80_000
  c.optim.update(dict(name='sgd', lr=0.1, momentum=0.9, nesterov=False, weight_decay=2e-4))
  c.schedule.update(dict(name='multistep', decay_factor=0.1,
                         milestones_epochs=(40_000 / STEPS_PER_EPOCH, 60_000 / STEPS_PER_EPOCH)))
  c.augment.update(dict(crop_padding=4, flip=True))
  c.eval_every_steps = 2_000
  c.checkpoint_every_steps = 2_000
  c.log_every_steps = 100
  if arg in ('smoke', 'runlocal'):
    shrink_for_smoke(c)
    # shrink_for_smoke swaps in a tiny ResNet; keep a (narrow) RevNet of the same kind
    c.model = 'revnet38'
    c.model_kwargs = {'layers': (1, 2, 2), 'widths': (8, 16, 16), 'stem_width': 8,
                      **{k: v for k, v in c.model_kwargs.items() if k.startswith('drop')}}
  return c
