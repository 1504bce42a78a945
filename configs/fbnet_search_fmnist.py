"""FBNet's differentiable architecture search (Wu et al. 2019) on Fashion-MNIST, sized for a
2-core CPU, and the recipe that trains the network it finds.

  python -m jaxcnn.search --config fbnet_search_fmnist      # writes workdirs/fbnet_search_fmnist/
  python -m jaxcnn.train --config fbnet_search_fmnist:train # trains its architecture.json

The search (jaxcnn/search.py): a supernet of 6 searchable layers on 28x28 images (stride-2
3x3 stem of 16 channels to 14 px, then stages of widths 24/32/64, two layers each, the first
two starting with stride 2, so 7/4/4 px; 1x1 head of 256), each layer a Gumbel-softmax mixture
of MBConv k3/k5 x e1/e3/e6 and skip; cost = multiply-adds. The search's own settings are
the ``search`` group; data, batch,
epochs, the weights' optimiser and augmentation are the trainer's fields. ``cost_unit`` 1e3
counts the cost in thousands of multiply-adds: eq. 2's log(cost)^beta needs a cost above 1,
and in these units the space spans 174-2,932 kMACs, so log(cost)^0.6 varies by about 1.3x
across it, as the paper's latencies (ms) do across its space.

Arguments (`--config fbnet_search_fmnist:ARG`):
  smoke | runlocal   a tiny search (3 steps of each phase per epoch, 2 epochs) for tests
  train              train the found network: model fbnet_searched, model_kwargs.arch =
                     workdirs/fbnet_search_fmnist/architecture.json (override with
                     --config.model_kwargs.arch=PATH)
  train_smoke        the same for a few steps on a subset
"""

from ml_collections import ConfigDict

from jaxcnn.config import base_config, check_arg

ARCH_FILE = 'workdirs/fbnet_search_fmnist/architecture.json'


def get_config(arg=None):
    check_arg('fbnet_search_fmnist', arg, ('smoke', 'runlocal', 'train', 'train_smoke'))
    c = base_config()
    c.dataset = 'fmnist'
    c.num_classes = 10
    c.image_size = c.test_image_size = 28
    c.batch_size = 128
    c.augment.update(dict(crop_padding=0, flip=True))
    c.label_smoothing = 0.1
    c.optim.update(dict(name='sgd', lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4))
    c.schedule.update(dict(name='cosine', warmup_epochs=0.0))

    if arg in ('train', 'train_smoke'):
        c.model = 'fbnet_searched'
        c.model_kwargs = ConfigDict(dict(arch=ARCH_FILE, drop_rate=0.1))
        c.num_epochs = 3.0
        c.optim.update(dict(lr=0.2, nesterov=True, weight_decay=5e-5))
        c.schedule.warmup_epochs = 0.3
        c.checkpoint_every_epochs = 1.0
        c.checkpoint_every_steps = -1
        if arg == 'train_smoke':
            c.train_subset, c.test_subset = 512, 256
            c.batch_size, c.eval_batch_size = 32, 128
            c.num_steps = 4
            c.schedule.warmup_epochs = 0.0
            c.log_every_steps = 1
            c.eval_every_steps = 4
            c.checkpoint_every_steps = 4
            c.checkpoint_every_epochs = -1.0
            c.progress = False
        return c

    # The search. num_epochs counts all epochs, warm-up included; each trains the weights on
    # 80 % of train_subset, then (after the warm-up) the architecture on the other 20 %.
    # The paper's 90 epochs (10 warm-up) are compressed into 6 (1 warm-up): the temperature
    # keeps its end points (5.0 -> 5.0 * 0.956^90 = 0.09, so each epoch here anneals as 15 of
    # the paper's), and theta's Adam rate is 0.1 for the paper's 0.01, as theta gets 60 updates
    # here instead of ~10,000.
    c.model = 'fbnet_searched'  # what the search produces
    c.train_subset = 4000
    c.test_subset = 2000
    c.batch_size = 64
    c.num_epochs = 6.0
    c.search = ConfigDict(
        dict(
            macro='',  # 'fbnet': the ImageNet space of Table 1 instead
            stages=((24, 2, 2), (32, 2, 2), (64, 2, 1)),  # (out, layers, first stride)
            stem_width=16,
            num_features=256,
            act='relu',
            candidates=('k3_e1', 'k3_e3', 'k3_e6', 'k5_e1', 'k5_e3', 'k5_e6', 'skip'),
            cost='flops',
            cost_unit=1e3,
            latency_batch=32,
            alpha=0.2,
            beta=0.6,  # eq. 2, the paper's values
            tau0=5.0,
            tau_decay=0.956**15,
            warmup_epochs=1,
            theta_lr=0.1,
            theta_weight_decay=5e-4,
            arch_fraction=0.2,
            num_samples=3,
            eval_batch_size=1000,
        )
    )
    if arg in ('smoke', 'runlocal'):
        c.train_subset, c.test_subset = 1024, 128
        c.batch_size = 32
        c.num_epochs = 2.0
        c.num_steps = 3  # the search reads it as a cap on steps per phase
        c.search.update(
            dict(
                stages=((16, 1, 1), (24, 1, 2)), num_features=32, num_samples=1, eval_batch_size=128
            )
        )
    return c
