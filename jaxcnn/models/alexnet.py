"""AlexNet and ZFNet: five convolutions, overlapping max-pools, a 4096-4096 MLP.

One builder, :class:`AlexNet`, reads a table of five convolution rows; each registered network
is a table:
  * ``alexnet``: torchvision's single-tower variant (64-192-384-256-256 filters, no LRN), the
    layout the lecture's per-layer table uses.
  * ``alexnet_lrn``: Krizhevsky, Sutskever & Hinton 2012, §3 and Fig. 2: 96-256-384-384-256
    filters, conv2/4/5 split into two groups (one per GPU; conv3 and the FC layers see both),
    Local Response Normalisation after the ReLU of conv1 and conv2, dropout on fc6 and fc7.
  * ``zfnet``: Zeiler & Fergus 2014, Fig. 3 (conv1 7x7 stride 2, conv2 stride 2, contrast
    normalisation after pools 1-2, no groups) with conv3-5 widened to 512/1024/512
    (Table 2, model (b)). Its 3x3/2 max-pools round up (ceil mode), which is what gives
    Fig. 3's 110 -> 55, 26 -> 13 and 13 -> 6 maps.

Like torchvision, an adaptive average pool brings the last feature map to 6x6 before the MLP,
and the map is flattened in (C, H, W) order so converted fc6 weights line up.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ..convert import register_renames
from ..layers import (
    ClassifierHead,
    LocalResponseNorm,
    adaptive_avg_pool,
    ceil_max_pool,
    check_image_batch,
    conv2d,
    max_pool,
    tap,
)
from ..registry import register


def paper_lrn():
    """Krizhevsky et al. §3.3: k = 2, n = 5, alpha = 1e-4, beta = 0.75 in
    b = a / (k + alpha * sum a^2)^beta. The layer divides alpha by n (PyTorch's convention),
    so it gets n * 1e-4."""
    return LocalResponseNorm(size=5, alpha=5 * 1e-4, beta=0.75, k=2.0)


# ---------------------------------------------------------------------------------------------
# Stage tables: (out channels, kernel, stride, padding, groups, LRN after ReLU, max-pool after)
TORCHVISION = (
    (64, 11, 4, 2, 1, False, True),
    (192, 5, 1, 2, 1, False, True),
    (384, 3, 1, 1, 1, False, False),
    (256, 3, 1, 1, 1, False, False),
    (256, 3, 1, 1, 1, False, True),
)
KRIZHEVSKY_2012 = (
    (96, 11, 4, 2, 1, True, True),
    (256, 5, 1, 2, 2, True, True),
    (384, 3, 1, 1, 1, False, False),
    (384, 3, 1, 1, 2, False, False),
    (256, 3, 1, 1, 2, False, True),
)
ZEILER_FERGUS_2014 = (
    (96, 7, 2, 1, 1, True, True),
    (256, 5, 2, 0, 1, True, True),
    (512, 3, 1, 1, 1, False, False),
    (1024, 3, 1, 1, 1, False, False),
    (512, 3, 1, 1, 1, False, True),
)
# Smallest input whose last 3x3/2 pool still has a 3x3 map to read (all three tables).
MIN_INPUT = 63


class AlexNet(nn.Module):
    """conv rows -> adaptive 6x6 average pool -> fc6 -> fc7 -> head/fc.

    dropout_first: torchvision's order (dropout on the inputs of fc6 and fc7); otherwise the
      papers' (dropout on the outputs of fc6 and fc7, i.e. before fc7 and the head).
    ceil_pool: round pooled sizes up (ZFNet's Caffe pooling).
    ``num_classes=0`` returns the fc7 features; ``features_only`` the last pooled conv map.
    """

    convs: Sequence[tuple] = TORCHVISION
    dropout_first: bool = True
    ceil_pool: bool = False
    mlp_width: int = 4096
    num_classes: int = 1000
    drop_rate: float = 0.5
    drop_path_rate: float = 0.0  # no residual blocks to drop; accepted for a uniform surface
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_image_batch(x, MIN_INPUT, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        # feature levels, named by their index in torchvision's ``features`` Sequential (conv,
        # ReLU, [LRN], [pool] per row): the map before each later strided step (a max-pool, or
        # ZFNet's stride-2 conv2), and the last max-pool's
        n = 0
        for i, (ch, k, s, p, g, lrn, pool) in enumerate(self.convs):
            if s > 1 and i:
                tap(x, f'features.{n - 1}')
            x = nn.relu(
                conv2d(ch, k, s, padding=p, groups=g, use_bias=True, name=f'conv{i + 1}', **kw)(x)
            )
            if lrn:
                x = paper_lrn()(x)
            n += 3 if lrn else 2
            if pool:
                tap(x, f'features.{n - 1}')
                x = ceil_max_pool(x, 3, 2) if self.ceil_pool else max_pool(x, 3, 2, padding='valid')
                n += 1
        tap(x, f'features.{n - 1}')
        if features_only:
            return x
        x = adaptive_avg_pool(x, 6)
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # PyTorch's (C, H, W) flatten
        drop = lambda h: nn.Dropout(self.drop_rate, deterministic=not train)(h)
        fc = lambda name, h: nn.relu(nn.Dense(self.mlp_width, name=name, **kw)(h))
        if self.dropout_first:  # torchvision: Dropout-fc6-ReLU-Dropout-fc7-ReLU-fc8
            x, head_drop = fc('fc7', drop(fc('fc6', drop(x)))), 0.0
        else:  # papers: fc6-ReLU-Dropout-fc7-ReLU-Dropout-fc8
            x, head_drop = fc('fc7', drop(fc('fc6', x))), self.drop_rate
        return ClassifierHead(self.num_classes, head_drop, name='head', **kw)(x, train)


# torchvision keys: features.{0,3,6,8,10} are the convolutions, classifier.{1,4,6} the linears.
_TV_CONVS = {'0': 1, '3': 2, '6': 3, '8': 4, '10': 5}
register_renames(
    'alexnet',
    [
        (r'^features\.(\d+)\.', lambda m: f'conv{_TV_CONVS[m[1]]}.'),
        (r'^classifier\.1\.', 'fc6.'),
        (r'^classifier\.4\.', 'fc7.'),
        (r'^classifier\.6\.', 'head.fc.'),
    ],
)

_IMAGENET = dict(family='alexnet', input_size=(224, 224, 3), min_input=MIN_INPUT)
register(
    'alexnet',
    AlexNet,
    dict(convs=TORCHVISION, dropout_first=True),
    reference='torchvision alexnet',
    reference_params=61_100_840,
    torch_name='tv:alexnet',
    **_IMAGENET,
)
# The paper states "60 million parameters" (abstract); this two-group layout has 60,965,224
# (tests/test_classic.py counts it by hand), so the figure is read to one significant digit.
register(
    'alexnet_lrn',
    AlexNet,
    dict(convs=KRIZHEVSKY_2012, dropout_first=False),
    reference='Krizhevsky et al. 2012, ImageNet Classification with Deep CNNs, §3 and Fig. 2 '
    '(two groups, LRN; "60 million parameters")',
    reference_params=60e6,
    params_rounding=1e7,
    **_IMAGENET,
)


# Zeiler & Fergus give no parameter count: weights + biases of Fig. 3's layers with Table 2 (b)'s
# maps, 14,208 + 614,656 + 1,180,160 + 4,719,616 + 4,719,104 (conv1-5) + 75,501,568 (fc6,
# 6x6x512 inputs) + 16,781,312 (fc7) + 4,097,000 (fc8) = 107,627,624.
register(
    'zfnet',
    AlexNet,
    dict(convs=ZEILER_FERGUS_2014, dropout_first=False, ceil_pool=True),
    reference='Zeiler & Fergus 2014, Visualizing and Understanding ConvNets, Fig. 3 with '
    'Table 2 (b) conv3-5 of 512/1024/512 maps (hand count of the layout)',
    reference_params=107_627_624,
    **_IMAGENET,
)
