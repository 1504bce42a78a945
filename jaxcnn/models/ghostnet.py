"""GhostNet (Han et al. 2020, arXiv:1911.11907, Table 7): features made cheaply from features.

Observation (§3.1, Fig. 1): many feature maps of a trained CNN are near-copies ("ghosts") of
others. A Ghost module therefore computes only m = ceil(n / s) intrinsic maps with an ordinary
1x1 convolution and derives the other (s - 1) m from them with a cheap depthwise 3x3 ("linear
operation"), concatenating both and keeping the first n (§3.1, s = 2 here).

The Ghost bottleneck (Fig. 3) mirrors MobileNetV2's inverted residual: Ghost module (expand,
ReLU) -> [depthwise k x k, stride 2, BN] -> [SE] -> Ghost module (project, no ReLU), plus a
shortcut that is the identity or, when the shape changes, depthwise k x k/stride + BN + 1x1 + BN.
Table 7 is the stage table below; the head is 1x1 conv to 960, global pool, a 1x1 conv to 1280
with ReLU (applied to the pooled vector, so a dense layer here), dropout and the classifier.

Layout and names follow timm's ``GhostNet`` (v1) so its weights convert with the table below:
bottleneck b of stage s is ``blocks_{s}/{b}`` (timm ``blocks.s.b``), each stage's blocks run
through :class:`~jaxcnn.layers.stage.Stage` (``remat`` recomputes their activations in the
backward pass).
"""

import math
from typing import Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from ..convert import register_renames
from ..layers import (
    ClassifierHead,
    DropPath,
    SqueezeExcite,
    batch_norm,
    check_image_batch,
    conv2d,
    depthwise_conv2d,
    drop_path_rates,
    global_avg_pool,
    make_divisible,
    tap,
)
from ..layers.stage import Stage, stage_blocks
from ..registry import register

# Table 7: one row per bottleneck (kernel, expansion width "#exp", output width, SE ratio, stride),
# grouped into timm's stages (which start wherever the stride or SE pattern changes).
STAGES = (
    ((3, 16, 16, 0, 1),),
    ((3, 48, 24, 0, 2),),
    ((3, 72, 24, 0, 1),),
    ((5, 72, 40, 0.25, 2),),
    ((5, 120, 40, 0.25, 1),),
    ((3, 240, 80, 0, 2),),
    (
        (3, 200, 80, 0, 1),
        (3, 184, 80, 0, 1),
        (3, 184, 80, 0, 1),
        (3, 480, 112, 0.25, 1),
        (3, 672, 112, 0.25, 1),
    ),
    ((5, 672, 160, 0.25, 2),),
    ((5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1)),
)


class GhostModule(nn.Module):
    """§3.1: primary 1x1 conv to m = ceil(n / ratio) maps, cheap depthwise conv making
    (ratio - 1) m more from them, concatenated and truncated to the n = ``out_channels`` asked for."""

    out_channels: int
    ratio: int = 2
    dw_size: int = 3
    relu: bool = True
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = nn.relu if self.relu else (lambda h: h)
        init = math.ceil(self.out_channels / self.ratio)
        primary = act(
            batch_norm(train, name='primary_bn', **kw)(
                conv2d(init, 1, name='primary_conv', **kw)(x)
            )
        )
        # each intrinsic map makes (ratio - 1) ghosts: a depthwise conv with channel multiplier
        cheap = conv2d(init * (self.ratio - 1), self.dw_size, groups=init, name='cheap_conv', **kw)(
            primary
        )
        cheap = act(batch_norm(train, name='cheap_bn', **kw)(cheap))
        return jnp.concatenate([primary, cheap], axis=-1)[..., : self.out_channels]


class GhostBottleneck(nn.Module):
    """Fig. 3: Ghost (expand, ReLU) - [DW k x k/2 - BN] - [SE] - Ghost (project, linear) + shortcut."""

    mid_channels: int
    out_channels: int
    kernel_size: int = 3
    stride: int = 1
    se_ratio: float = 0.0
    drop_path: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = lambda name, h: batch_norm(train, name=name, **kw)(h)
        h = GhostModule(self.mid_channels, relu=True, name='ghost1', **kw)(x, train)
        if self.stride > 1:
            h = bn(
                'bn_dw',
                depthwise_conv2d(
                    self.mid_channels, self.kernel_size, self.stride, name='conv_dw', **kw
                )(h),
            )
        if self.se_ratio:
            # SE with a hard-sigmoid gate and a reduced width rounded to a multiple of 4
            h = SqueezeExcite(
                rd_channels=make_divisible(self.mid_channels * self.se_ratio, 4),
                gate='hard_sigmoid',
                name='se',
                **kw,
            )(h)
        h = GhostModule(self.out_channels, relu=False, name='ghost2', **kw)(h, train)
        shortcut = x
        if self.stride > 1 or x.shape[-1] != self.out_channels:
            shortcut = bn(
                'shortcut_bn1',
                depthwise_conv2d(
                    x.shape[-1], self.kernel_size, self.stride, name='shortcut_dw', **kw
                )(x),
            )
            shortcut = bn(
                'shortcut_bn2', conv2d(self.out_channels, 1, name='shortcut_pw', **kw)(shortcut)
            )
        return shortcut + DropPath(self.drop_path)(h, train)


class GhostNet(nn.Module):
    """GhostNet from Table 7; ``width`` multiplies every width (rounded to multiples of 4).

    remat: recompute each bottleneck's activations in the backward pass instead of storing them
      (True, or a ``jax.checkpoint_policies`` name; :class:`~jaxcnn.layers.stage.Stage`).
    """

    width: float = 1.0
    stages: Sequence[Tuple[Tuple[float, ...], ...]] = STAGES
    stem_channels: int = 16
    last_channels: int = 960  # the 1x1 conv after the last bottleneck
    head_channels: int = 1280  # the 1x1 conv on the pooled features
    num_classes: int = 1000
    drop_rate: float = 0.2
    drop_path_rate: float = 0.0
    remat: Union[bool, str] = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        check_image_batch(x, 32, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = lambda c: make_divisible(c * self.width, 4)
        x = conv2d(ch(self.stem_channels), 3, 2, name='conv_stem', **kw)(x)
        tap(x, 'conv_stem')  # timm's first level is the stem conv's output, before its BN
        x = nn.relu(batch_norm(train, name='bn1', **kw)(x))
        rates = iter(drop_path_rates(self.drop_path_rate, sum(len(s) for s in self.stages)))
        for s, stage in enumerate(self.stages):
            blocks = stage_blocks(
                GhostBottleneck,
                [
                    dict(
                        mid_channels=ch(exp),
                        out_channels=ch(c),
                        kernel_size=k,
                        stride=stride,
                        se_ratio=se,
                        drop_path=next(rates),
                        **kw,
                    )
                    for k, exp, c, se, stride in stage
                ],
            )
            x = Stage(blocks, remat=self.remat, name=f'blocks_{s}')(x, train)
            # timm's GhostNet levels: each stage whose (last) block strides, right after it --
            # not the last map at that resolution, as in the MBConv families
            if stage[-1][-1] > 1:
                tap(x, f'blocks.{s}')
        x = conv2d(ch(self.last_channels), 1, name='conv_last', **kw)(x)
        x = nn.relu(batch_norm(train, name='bn_last', **kw)(x))
        if features_only:
            return x
        # the "1x1 conv" to 1280 runs on the pooled 1x1 map: a dense layer with bias, then ReLU
        x = nn.relu(nn.Dense(self.head_channels, name='conv_head', **kw)(global_avg_pool(x)))
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


# timm's GhostNet: blocks.s.b -> blocks_s/b (the last stage, blocks.9.0, is the 1x1 ConvBnAct
# to 960: conv_last / bn_last here, outside the stages),
# GhostModule = primary_conv (conv, bn, act) + cheap_operation (dwconv, bn, act),
# shortcut = (dw, bn, pw, bn), SE conv_reduce / conv_expand.
register_renames(
    'ghostnet',
    [
        (r'^blocks\.9\.0\.conv\.', 'conv_last.'),
        (r'^blocks\.9\.0\.bn1\.', 'bn_last.'),
        (r'^blocks\.(\d+)\.(\d+)\.', r'blocks_\1.\2.'),
        (r'\.primary_conv\.0\.', '.primary_conv.'),
        (r'\.primary_conv\.1\.', '.primary_bn.'),
        (r'\.cheap_operation\.0\.', '.cheap_conv.'),
        (r'\.cheap_operation\.1\.', '.cheap_bn.'),
        (r'\.se\.conv_reduce\.', '.se.fc1.'),
        (r'\.se\.conv_expand\.', '.se.fc2.'),
        (r'\.shortcut\.0\.', '.shortcut_dw.'),
        (r'\.shortcut\.1\.', '.shortcut_bn1.'),
        (r'\.shortcut\.2\.', '.shortcut_pw.'),
        (r'\.shortcut\.3\.', '.shortcut_bn2.'),
        (r'^classifier\.', 'head.fc.'),
    ],
)

register(
    'ghostnet_100',
    GhostNet,
    dict(width=1.0),
    family='ghostnet',
    input_size=(224, 224, 3),
    min_input=32,
    reference='timm ghostnet_100 (Han et al. 2020, Table 7, GhostNet 1.0x)',
    reference_params=5_182_508,
    torch_name='timm:ghostnet_100',
)
