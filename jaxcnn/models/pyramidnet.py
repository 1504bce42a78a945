"""PyramidNet: additive widening of every residual unit (Han, Kim & Kim 2017, CVPR).

Channels grow by alpha / N at each of the N units, D_k = floor(16 + alpha * k / N) (eq. 2,
evaluated in exact rational arithmetic so that no width lands one below an integer),
instead of doubling at the downsampling units. The residual unit is BN-conv-BN-ReLU-conv-BN
(no ReLU after the addition; Fig. 6(d)); the bottleneck unit adds a 1x1 pair with x4
expansion. The identity path is zero-padded to the new width and average-pooled 2x2 where
the unit downsamples, so every shortcut is parameter-free.
Parameter counts: Table 4 of the paper (CIFAR, 10 classes), matched within its 0.1M rounding:
depth 110, alpha 48: 1,739,730 (1.7M); depth 272, alpha 200, bottleneck: 26,049,562 (26.0M).
The table's alpha-270 rows (28.3M at depth 110, 27.0M at depth 164 bottleneck) are not
registered: eq. 2 with alpha 270 gives whole widths 21, 26, ..., 286 with no rounding choice,
and this unit counts 28,485,477 and 27,216,021, 0.7-0.8 % above the table; pass ``alpha=270``
to build them anyway. Tests also check every count against a hand count of the units.

The three groups of N / 3 units (the reference implementation's ``layer1``-``layer3``) each run
through :class:`~jaxcnn.layers.stage.Stage`: unit b of group s (counted from 1) is ``layer{s}/{b}``.
"""

from fractions import Fraction
from typing import Optional, Union

import flax.linen as nn
import jax.numpy as jnp

from ..layers import (
    check_image_batch,
    ClassifierHead,
    DropPath,
    avg_pool,
    batch_norm,
    conv2d,
    drop_path_rates,
    tap,
)
from ..layers.stage import Stage, stage_blocks
from ..registry import CIFAR10_MEAN, CIFAR10_STD, register


class PyramidUnit(nn.Module):
    out_channels: int
    stride: int
    bottleneck: bool
    drop_path: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = lambda name: batch_norm(train, name=name, **kw)
        h = bn('bn1')(x)
        if self.bottleneck:
            mid = self.out_channels // 4
            h = nn.relu(bn('bn2')(conv2d(mid, 1, name='conv1', **kw)(h)))
            h = nn.relu(bn('bn3')(conv2d(mid, 3, self.stride, name='conv2', **kw)(h)))
            h = bn('bn4')(conv2d(self.out_channels, 1, name='conv3', **kw)(h))
        else:
            h = nn.relu(bn('bn2')(conv2d(self.out_channels, 3, self.stride, name='conv1', **kw)(h)))
            h = bn('bn3')(conv2d(self.out_channels, 3, name='conv2', **kw)(h))
        h = DropPath(self.drop_path)(h, train)
        shortcut = x
        if self.stride != 1:
            # ceil-mode 2x2 average pool, as the reference implementation's AvgPool2d(ceil_mode)
            ph, pw = shortcut.shape[1] % 2, shortcut.shape[2] % 2
            shortcut = avg_pool(shortcut, 2, 2, ((0, ph), (0, pw)), count_include_pad=False)
        extra = self.out_channels - shortcut.shape[-1]
        shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, extra)))
        return h + shortcut


class PyramidNet(nn.Module):
    """CIFAR PyramidNet with ``depth`` layers and widening factor ``alpha``.

    remat: recompute each unit's activations in the backward pass instead of storing them
      (True, or a ``jax.checkpoint_policies`` name; :class:`~jaxcnn.layers.stage.Stage`).
    """

    depth: int = 110
    alpha: float = 48
    bottleneck: bool = False
    num_classes: int = 10
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: Union[bool, str] = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        per_stage = (self.depth - 2) // (9 if self.bottleneck else 6)
        total = 3 * per_stage
        expansion = 4 if self.bottleneck else 1
        check_image_batch(x, 8, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        x = batch_norm(train, name='bn1', **kw)(conv2d(16, 3, name='conv1', **kw)(x))
        tap(x, 'bn1')
        rates = drop_path_rates(self.drop_path_rate, total)
        for s in range(3):
            units = range(s * per_stage, (s + 1) * per_stage)
            blocks = stage_blocks(
                PyramidUnit,
                [
                    dict(
                        out_channels=int(16 + Fraction(self.alpha) * (k + 1) / total)
                        * expansion,  # floor, exactly
                        stride=2 if (s > 0 and k == units[0]) else 1,
                        bottleneck=self.bottleneck,
                        drop_path=rates[k],
                        **kw,
                    )
                    for k in units
                ],
            )
            x = Stage(blocks, remat=self.remat, name=f'layer{s + 1}')(x, train)
            tap(x, f'layer{s + 1}')
        x = nn.relu(batch_norm(train, name='final_bn', **kw)(x))
        if features_only:
            return x
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


_CIFAR = dict(
    family='pyramidnet',
    input_size=(32, 32, 3),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    num_classes=10,
    min_input=8,
)
# (depth 110, alpha 84, 3.8M) is left out: XLA:CPU 0.10 crashes compiling its training step.
for _depth, _alpha, _bottleneck, _m in [(110, 48, False, 1.7), (272, 200, True, 26.0)]:
    # the paper's figures are rounded to 0.1M
    register(
        f'pyramidnet{_depth}_a{_alpha}' + ('_bottleneck' if _bottleneck else ''),
        PyramidNet,
        dict(depth=_depth, alpha=_alpha, bottleneck=_bottleneck),
        reference=f'Han et al. 2017, Deep Pyramidal Residual Networks, Table 4 '
        f'(depth {_depth}, alpha {_alpha}, {_m}M)',
        reference_params=_m * 1e6,
        params_rounding=1e5,
        **_CIFAR,
    )
