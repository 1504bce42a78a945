"""SqueezeNet 1.0 (Iandola et al. 2016, Table 1) on Fashion-MNIST.

Images are resized to 64x64 so conv1 (7x7/2) and the three 3x3/2 max-pools leave a 3x3 map
for fire9 and the class-map head (64 -> 29 -> 14 -> 7 -> 3). SqueezeNet has no BatchNorm and
its ReLU'd class maps die under large steps (SGD at 0.02-0.1 or Adam at 2e-3 with batch 32
left every class map at zero, loss ln 10, within a few steps), so the recipe is Adam at 3e-4
with the paper's weight decay (2e-4) and dropout (0.5 before conv10). It also starts slowly:
the smoke run (smoke | runlocal: the same network) takes 120 steps instead of 40.
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    c = zoo_fmnist_config(
        'squeezenet_fmnist',
        arg,
        'squeezenet1_0',
        image_size=64,
        num_epochs=10.0,
        optim=dict(name='adam', lr=3e-4, weight_decay=2e-4),
    )
    if arg in ('smoke', 'runlocal'):
        c.num_steps = c.eval_every_steps = c.checkpoint_every_steps = 120
    return c
