"""MobileNet v1 (Howard et al. 2017, arXiv:1704.04861, Table 1): depthwise separable convolutions.

A standard 3x3 convolution is factored into a depthwise 3x3 (one filter per channel: spatial
filtering) and a pointwise 1x1 (channel mixing), each followed by BN and ReLU -- 8 to 9 times
fewer mult-adds (§3.1). There is no pooling inside the network: the spatial size halves through
stride-2 depthwise convolutions. The width multiplier alpha (§3.3) thins every layer uniformly.

Table 1 as stages (blocks, stride of the first block, output channels) after a 3x3/2 stem of 32:
    (1, 1, 64), (2, 2, 128), (2, 2, 256), (6, 2, 512), (2, 2, 1024), then global pool and FC.
(The table's second-to-last "Conv dw / s2" is a typo for s1: the map stays 7x7.)

``mobilenetv1_100``/``_125`` are timm's (ReLU6, as the TF-slim reference; channels rounded to
multiples of 8), whose layout and names this follows (``conv_stem``, ``bn1``, ``blocks.s.b``
with ``conv_dw``/``bn1``/``conv_pw``/``bn2``, ``classifier``).
"""

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from ..convert import register_renames
from ..layers import (
    ClassifierHead,
    batch_norm,
    check_image_batch,
    conv2d,
    depthwise_conv2d,
    get_act,
    make_divisible,
    tap,
)
from ..registry import register

# Table 1: (blocks, first stride, output channels) per stage.
STAGES = ((1, 1, 64), (2, 2, 128), (2, 2, 256), (6, 2, 512), (2, 2, 1024))


class DepthwiseSeparable(nn.Module):
    """Fig. 3 (right): 3x3 depthwise conv - BN - act - 1x1 conv - BN - act. No residual."""

    out_channels: int
    stride: int = 1
    act: str = 'relu6'
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = get_act(self.act)
        x = depthwise_conv2d(x.shape[-1], 3, self.stride, name='conv_dw', **kw)(x)
        x = act(batch_norm(train, name='bn1', **kw)(x))
        x = conv2d(self.out_channels, 1, name='conv_pw', **kw)(x)
        return act(batch_norm(train, name='bn2', **kw)(x))


class MobileNetV1(nn.Module):
    """MobileNet v1 from its stage table; ``width`` is the paper's width multiplier alpha."""

    width: float = 1.0
    stages: Sequence[Tuple[int, int, int]] = STAGES
    stem_channels: int = 32
    act: str = 'relu6'
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # no residual blocks to drop; accepted for a uniform surface
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        check_image_batch(x, 32, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = lambda c: make_divisible(c * self.width, 8)
        x = conv2d(ch(self.stem_channels), 3, 2, name='conv_stem', **kw)(x)
        x = get_act(self.act)(batch_norm(train, name='bn1', **kw)(x))
        for s, (n, stride, c) in enumerate(self.stages):
            for b in range(n):
                x = DepthwiseSeparable(
                    ch(c), stride if b == 0 else 1, self.act, name=f'blocks_{s}_{b}', **kw
                )(x, train)
            # feature levels as in timm (whose MobileNetV1 is an EfficientNet-builder table): the
            # output of each stage before a stride > 1 step, and of the last
            if s + 1 == len(self.stages) or self.stages[s + 1][1] > 1:
                tap(x, f'blocks.{s}')
        if features_only:
            return x
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


register_renames(
    'mobilenetv1',
    [
        (r'^blocks\.(\d+)\.(\d+)\.', r'blocks_\1_\2.'),
        (r'^classifier\.', 'head.fc.'),
    ],
)

# timm 1.0.31 counts at 1000 classes for 1.0 and 1.25; Howard et al. 2017, Table 6 gives
# 4.2M / 2.6M / 1.3M / 0.5M parameters for alpha = 1.0 / 0.75 / 0.5 / 0.25 (224 px).
register(
    'mobilenetv1_100',
    MobileNetV1,
    dict(width=1.0),
    family='mobilenetv1',
    input_size=(224, 224, 3),
    min_input=32,
    reference='timm mobilenetv1_100 (Howard et al. 2017, Table 1; Table 6: 4.2M)',
    reference_params=4_231_976,
    torch_name='timm:mobilenetv1_100',
)
register(
    'mobilenetv1_125',
    MobileNetV1,
    dict(width=1.25),
    family='mobilenetv1',
    input_size=(224, 224, 3),
    min_input=32,
    reference='timm mobilenetv1_125 (Howard et al. 2017, Table 1, width multiplier 1.25)',
    reference_params=6_270_840,
    torch_name='timm:mobilenetv1_125',
)
for _w, _paper in [(0.75, 2.6e6), (0.5, 1.3e6), (0.25, 0.5e6)]:
    register(
        f'mobilenetv1_{int(_w * 100):03d}',
        MobileNetV1,
        dict(width=_w),
        family='mobilenetv1',
        input_size=(224, 224, 3),
        min_input=32,
        reference=f'Howard et al. 2017, Table 6 ({_w} MobileNet-224: {_paper / 1e6}M parameters)',
        reference_params=_paper,
        params_rounding=1e5,
    )
