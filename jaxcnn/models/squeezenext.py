"""SqueezeNext (Gholami et al. 2018, SqueezeNext: Hardware-Aware Neural Network Design).

A SqueezeNext block (§3, Fig. 1 right) on a C-channel input: a two-stage 1x1 bottleneck
(C/2, then C/4), a 3x1 and a 1x3 convolution (C/2 each: the 3x3 made separable), a 1x1
expansion to the output width, and a residual sum followed by ReLU. Every convolution is
conv-BN-ReLU, without conv bias. Blocks that change the width or stride project their
shortcut with a 1x1 conv-BN-ReLU; the first of them (stride 2) keeps the bottleneck's first
stage at C (then C/2, C, C, out), and a block narrowing its input (64 -> 32 at stage 1)
squeezes to C/4, C/8, C/4, C/4.

The network (§4, Fig. 5): conv1 7x7/2 (64 filters, unpadded), 3x3/2 max-pool (Caffe's
rounding up), four stages of (32, 64, 128, 256) channels with stride 2 at the first block of
stages 2-4, a 1x1 conv-BN-ReLU to 128 channels, global average pooling and a bias-free linear
classifier. The 23-layer net has (6, 6, 8, 1) blocks per stage (conv1 + 21 blocks + the final
1x1); the width multiplier scales conv1 and the stages, not the 128-channel final
convolution. These details follow the authors' released Caffe definitions
(github.com/amirgholami/SqueezeNext, ``1.0-SqNxt-23`` and ``2.0-SqNxt-23``), including their
order of the separable pair, which alternates from block to block (3x1 first in even-numbered
blocks, 1x3 first in odd ones; ``alternate_separable=False`` always puts 3x1 first).

Parameter counts (BN scale and shift counted as parameters, as in the paper's tables):
1.0-SqNxt-23 has 717,280 (the paper's ImageNet results table: 0.72M) and 2.0-SqNxt-23 has 2,377,408 (hand
count of the released 2.0-SqNxt-23 layout, tests/test_squeezenext.py). osmr's PyTorch port
(imgclsmob ``sqnxt23_w1``: 724,056) differs: it adds conv biases, a classifier bias and, at
width 2.0, widens the final convolution to 256.

Each stage's blocks run through :class:`~jaxcnn.layers.stage.Stage`: block i of stage s (from 1)
is ``stage{s}/{i}``.
"""

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from ..layers import (
    DropPath,
    batch_norm,
    ceil_max_pool,
    check_image_batch,
    conv2d,
    drop_path_rates,
    global_avg_pool,
    tap,
)
from ..layers.stage import Stage, stage_blocks
from ..registry import register

SQNXT23 = (6, 6, 8, 1)  # blocks per stage, §4 (23 layers)
STAGE_WIDTHS = (32, 64, 128, 256)
# Caffe's "xavier" filler: uniform with variance 1 / fan_in.
_XAVIER = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


class ConvBNReLU(nn.Module):
    features: int
    kernel: Sequence[int] = (1, 1)
    stride: int = 1
    padding: str = 'torch'  # (k - 1) / 2 on each side: none for 1x1, 1 along a 3x1 / 1x3
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv2d(
            self.features,
            tuple(self.kernel),
            self.stride,
            padding=self.padding,
            kernel_init=_XAVIER,
            name='conv',
            **kw,
        )(x)
        return nn.relu(batch_norm(train, name='bn', **kw)(x))


class SqnxtBlock(nn.Module):
    """reduce1 (1x1, stride) -> reduce2 (1x1) -> sep1 -> sep2 (3x1 / 1x3) -> expand (1x1),
    + shortcut (identity, or 1x1 conv-BN-ReLU when width or stride change), ReLU."""

    features: int
    stride: int = 1
    first_separable: str = '3x1'
    drop_path: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        # the released definitions: C -> C/2 -> C/4 normally; C -> C/2 at a stride-2 block;
        # C -> C/4 -> C/8 when the block narrows its input
        r = 1 if self.stride == 2 else 4 if c > self.features else 2
        k1, k2 = ((3, 1), (1, 3)) if self.first_separable == '3x1' else ((1, 3), (3, 1))
        cbr = lambda ch, k, s, name: ConvBNReLU(ch, k, s, name=name, **kw)
        h = cbr(c // r, (1, 1), self.stride, 'reduce1')(x, train)
        h = cbr(c // (2 * r), (1, 1), 1, 'reduce2')(h, train)
        h = cbr(c // r, k1, 1, 'sep1')(h, train)
        h = cbr(c // r, k2, 1, 'sep2')(h, train)
        h = cbr(self.features, (1, 1), 1, 'expand')(h, train)
        if self.stride != 1 or c != self.features:
            x = cbr(self.features, (1, 1), self.stride, 'shortcut')(x, train)
        return nn.relu(x + DropPath(self.drop_path)(h, train))


class FeatureHead(nn.Module):
    """Global average pool -> dropout -> bias-free linear ``fc`` (the released classifier).
    ``num_classes=0`` returns the pooled features."""

    num_classes: int
    drop_rate: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = global_avg_pool(x)
        if not self.num_classes:
            return x
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        return nn.Dense(
            self.num_classes,
            use_bias=False,
            kernel_init=_XAVIER,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name='fc',
        )(x)


class SqueezeNext(nn.Module):
    """stem (7x7/2 conv-BN-ReLU, 3x3/2 max-pool) -> stages of SqueezeNext blocks -> final 1x1
    conv-BN-ReLU -> head. Widths (stem, stages) are multiplied by ``width``; ``final_width`` is
    not. ``num_classes=0`` returns the pooled final features, ``features_only`` the final map.
    ``remat`` recomputes each block's activations in the backward pass (True or a
    ``jax.checkpoint_policies`` name).
    """

    depths: Sequence[int] = SQNXT23
    width: float = 1.0
    stem_width: int = 64
    widths: Sequence[int] = STAGE_WIDTHS
    final_width: int = 128
    alternate_separable: bool = True
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: Union[bool, str] = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_image_batch(x, MIN_INPUT, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        x = ConvBNReLU(int(self.stem_width * self.width), (7, 7), 2, 'valid', name='stem', **kw)(
            x, train
        )
        tap(x, 'stem')
        x = ceil_max_pool(x, 3, 2)
        rates = drop_path_rates(self.drop_path_rate, sum(self.depths))
        start = 0
        for s, (n, w) in enumerate(zip(self.depths, self.widths)):
            # b: the block's index in the whole network, which alternates the separable pair
            blocks = stage_blocks(
                SqnxtBlock,
                [
                    dict(
                        features=int(w * self.width),
                        stride=2 if i == 0 and s > 0 else 1,
                        first_separable='3x1'
                        if not self.alternate_separable or b % 2 == 0
                        else '1x3',
                        drop_path=rates[b],
                        **kw,
                    )
                    for i, b in enumerate(range(start, start + n))
                ],
            )
            x = Stage(blocks, remat=self.remat, name=f'stage{s + 1}')(x, train)
            if s < len(self.depths) - 1:  # the last stage's map feeds only final
                tap(x, f'stage{s + 1}')
            start += n
        x = ConvBNReLU(self.final_width, (1, 1), 1, name='final', **kw)(x, train)
        tap(x, 'final')
        if features_only:
            return x
        return FeatureHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


# The 7x7 stem needs 7 pixels and the max-pool after it a full 3x3 window: (11 - 7) // 2 + 1 = 3.
MIN_INPUT = 11

_IMAGENET = dict(family='squeezenext', input_size=(227, 227, 3), min_input=MIN_INPUT)
# 1.0-SqNxt-23: 717,280 parameters, the paper's "0.72M" (ImageNet results table).
register(
    'sqnxt23_w1',
    SqueezeNext,
    dict(depths=SQNXT23, width=1.0),
    reference='Gholami et al. 2018, SqueezeNext, ImageNet results (1.0-SqNxt-23, 0.72M; layout of '
    'the released Caffe 1.0-SqNxt-23)',
    reference_params=0.72e6,
    params_rounding=1e4,
    **_IMAGENET,
)
# 2.0-SqNxt-23: hand count of the released Caffe 2.0-SqNxt-23 (widths doubled, final 1x1 kept
# at 128), recounted from the block formula in tests/test_squeezenext.py.
register(
    'sqnxt23_w2',
    SqueezeNext,
    dict(depths=SQNXT23, width=2.0),
    reference='Gholami et al. 2018, SqueezeNext, 2.0-SqNxt-23 (hand count of the released '
    'Caffe layout: widths x2, final 1x1 conv at 128)',
    reference_params=2_377_408,
    **_IMAGENET,
)
