"""ShuffleNet v1 (Zhang et al. 2018, arXiv:1707.01083, Table 1) and v2 (Ma et al. 2018,
arXiv:1807.11164, Table 5): cheap 1x1 convolutions made to mix channels again by a shuffle.

v1 makes the 1x1 convolutions *grouped* (g groups) to cut their cost, and shuffles channels
between the first grouped 1x1 and the depthwise 3x3 so that information crosses groups (the
reshape (g, C/g) -> transpose -> flatten of Fig. 1). Unit (Fig. 2b/c): GConv1x1 (C/4) -BN-ReLU-
shuffle- DWConv3x3 -BN- GConv1x1 -BN, then add the input (stride 1) or concatenate a 3x3/2
average pool of it (stride 2), then ReLU. Table 1's widths are chosen so every g costs ~140
MFLOPs; there is no library twin, so the counts are hand counts (tests/test_shufflenet.py).

v2 follows the paper's four guidelines instead (equal in/out widths, no group convs, few
branches, no element-wise adds): a unit splits the channels in half, leaves one half alone and
runs 1x1-DW3x3-1x1 on the other, concatenates and shuffles with 2 groups. Downsampling units
run both halves through a branch (the left one DW3x3/2-1x1) on the full input. Layout follows
torchvision's ``ShuffleNetV2`` so its weights convert with the rename table below.

Each stage's units run through :class:`~jaxcnn.layers.stage.Stage`: unit b of stage s is
``stage{s}/{b}`` (torchvision ``stage{s}.{b}``); ``remat`` recomputes their activations in the
backward pass instead of storing them.
"""

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from ..convert import register_renames
from ..layers import (
    ClassifierHead,
    avg_pool,
    batch_norm,
    channel_shuffle,
    check_image_batch,
    conv2d,
    depthwise_conv2d,
    max_pool,
    tap,
)
from ..layers.stage import Stage, stage_blocks
from ..registry import register


class ShuffleV1Unit(nn.Module):
    """Fig. 2(b) (stride 1, residual add) or 2(c) (stride 2, concat with 3x3/2 avg-pooled input).

    ``first_groups`` is the grouping of the first 1x1: 1 for the very first unit of stage 2,
    whose input has only 24 channels (§3.3: "we do not apply group convolution on the first
    pointwise layer because the number of input channels is relatively small").
    """

    out_channels: int
    stride: int
    groups: int
    first_groups: int
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = lambda name: batch_norm(train, name=name, **kw)
        mid = self.out_channels // 4  # bottleneck: 1/4 of the unit's output
        # a stride-2 unit concatenates its input, so its branch makes only the missing channels
        branch_out = self.out_channels - (x.shape[-1] if self.stride == 2 else 0)
        h = nn.relu(bn('bn1')(conv2d(mid, 1, groups=self.first_groups, name='conv1', **kw)(x)))
        if self.groups > 1:
            h = channel_shuffle(h, self.groups)
        h = bn('bn2')(depthwise_conv2d(mid, 3, self.stride, name='conv2', **kw)(h))
        h = bn('bn3')(conv2d(branch_out, 1, groups=self.groups, name='conv3', **kw)(h))
        if self.stride == 2:
            return nn.relu(jnp.concatenate([avg_pool(x, 3, 2, padding='torch'), h], axis=-1))
        return nn.relu(x + h)


def _stem(net, x, train, kw):
    """Both versions' stem: conv1 3x3/2 - BN - ReLU - max-pool 3x3/2 (Tables 1 and 5), and
    its two feature levels (torchvision's names), each before a stride-2 step."""
    check_image_batch(x, 32, type(net).__name__)
    x = conv2d(net.stem_channels, 3, 2, name='conv1', **kw)(
        jnp.asarray(x, net.dtype or jnp.float32)
    )
    x = tap(nn.relu(batch_norm(train, name='bn1', **kw)(x)), 'conv1')
    return tap(max_pool(x, 3, 2), 'maxpool')


class ShuffleNetV1(nn.Module):
    """Table 1: conv1 3x3/2 (24) -> max-pool 3x3/2 -> stages 2-4 of (1 + repeats) units (the
    first with stride 2) at widths ``stage_channels`` -> global pool -> FC."""

    groups: int = 3
    stage_channels: Sequence[int] = (240, 480, 960)
    stage_repeats: Sequence[int] = (3, 7, 3)
    stem_channels: int = 24
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # units are not dropped; accepted for a uniform surface
    remat: Union[bool, str] = False  # True or a jax.checkpoint_policies name (layers/stage.py)
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _stem(self, x, train, kw)
        for s, (ch, repeats) in enumerate(zip(self.stage_channels, self.stage_repeats)):
            blocks = stage_blocks(
                ShuffleV1Unit,
                [
                    dict(
                        out_channels=ch,
                        stride=2 if b == 0 else 1,
                        groups=self.groups,
                        first_groups=1 if (s == 0 and b == 0) else self.groups,
                        **kw,
                    )
                    for b in range(repeats + 1)
                ],
            )
            x = Stage(blocks, remat=self.remat, name=f'stage{s + 2}')(x, train)
            tap(x, f'stage{s + 2}')
        if features_only:
            return x
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


class ShuffleV2Unit(nn.Module):
    """Fig. 3(c) (stride 1: split, right half through 1x1-DW3x3-1x1) or 3(d) (stride 2: both
    branches see the whole input), then concatenate and shuffle with 2 groups."""

    out_channels: int
    stride: int
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = lambda name, h: batch_norm(train, name=name, **kw)(h)
        c = self.out_channels // 2
        if self.stride == 1:
            left, right = jnp.split(x, 2, axis=-1)  # channel split: first half is kept as is
        else:
            left = bn(
                'b1_bn1', depthwise_conv2d(x.shape[-1], 3, self.stride, name='b1_dw', **kw)(x)
            )
            left = nn.relu(bn('b1_bn2', conv2d(c, 1, name='b1_pw', **kw)(left)))
            right = x
        right = nn.relu(bn('b2_bn1', conv2d(c, 1, name='b2_pw1', **kw)(right)))
        right = bn('b2_bn2', depthwise_conv2d(c, 3, self.stride, name='b2_dw', **kw)(right))
        right = nn.relu(bn('b2_bn3', conv2d(c, 1, name='b2_pw2', **kw)(right)))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
    """Table 5: conv1 3x3/2 (24) -> max-pool 3x3/2 -> stages 2-4 (``stage_repeats`` units, the
    first with stride 2) at ``stage_channels`` -> conv5 1x1 -> global pool -> FC."""

    stage_channels: Sequence[int] = (116, 232, 464)
    stage_repeats: Sequence[int] = (4, 8, 4)
    stem_channels: int = 24
    num_features: int = 1024
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # units are not dropped; accepted for a uniform surface
    remat: Union[bool, str] = False  # True or a jax.checkpoint_policies name (layers/stage.py)
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _stem(self, x, train, kw)
        for s, (ch, repeats) in enumerate(zip(self.stage_channels, self.stage_repeats)):
            blocks = stage_blocks(
                ShuffleV2Unit,
                [dict(out_channels=ch, stride=2 if b == 0 else 1, **kw) for b in range(repeats)],
            )
            x = Stage(blocks, remat=self.remat, name=f'stage{s + 2}')(x, train)
            if s + 1 < len(self.stage_channels):  # the last stage's level is conv5's
                tap(x, f'stage{s + 2}')
        x = conv2d(self.num_features, 1, name='conv5', **kw)(x)
        x = tap(nn.relu(batch_norm(train, name='bn5', **kw)(x)), 'conv5')
        if features_only:
            return x
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


# ---------------------------------------------------------------------------------------------
# torchvision's ShuffleNetV2: conv1 = (conv, bn, relu), stageN.b.branch1 = (dw, bn, pw, bn, relu),
# branch2 = (pw, bn, relu, dw, bn, pw, bn, relu), conv5 = (conv, bn, relu).
_BRANCH = {
    'branch1.0': 'b1_dw',
    'branch1.1': 'b1_bn1',
    'branch1.2': 'b1_pw',
    'branch1.3': 'b1_bn2',
    'branch2.0': 'b2_pw1',
    'branch2.1': 'b2_bn1',
    'branch2.3': 'b2_dw',
    'branch2.4': 'b2_bn2',
    'branch2.5': 'b2_pw2',
    'branch2.6': 'b2_bn3',
}
register_renames(
    'shufflenet_v2',
    [
        (r'^conv1\.0\.', 'conv1.'),
        (r'^conv1\.1\.', 'bn1.'),
        (r'^conv5\.0\.', 'conv5.'),
        (r'^conv5\.1\.', 'bn5.'),
        (r'\.(branch\d\.\d)\.', lambda m: f'.{_BRANCH[m[1]]}.'),
        (r'^fc\.', 'head.fc.'),
    ],
)

# Ma et al. 2018, Table 5: output channels of stages 2-4 and conv5 per width multiplier.
# Counts: torchvision 0.29.1, 1000 classes.
V2_VARIANTS = {
    'shufflenet_v2_x0_5': ((48, 96, 192), 1024, 1_366_792),
    'shufflenet_v2_x1_0': ((116, 232, 464), 1024, 2_278_604),
    'shufflenet_v2_x1_5': ((176, 352, 704), 1024, 3_503_624),
    'shufflenet_v2_x2_0': ((244, 488, 976), 2048, 7_393_996),
}
for _name, (_chs, _feat, _count) in V2_VARIANTS.items():
    register(
        _name,
        ShuffleNetV2,
        dict(stage_channels=_chs, num_features=_feat),
        family='shufflenet_v2',
        input_size=(224, 224, 3),
        min_input=32,
        reference=f'torchvision {_name} (Ma et al. 2018, Table 5)',
        reference_params=_count,
        torch_name=f'tv:{_name}',
    )

# Zhang et al. 2018, Table 1 (ShuffleNet 1x): stage-2 output channels per number of groups g
# (stages 3 and 4 double it twice) and the table's complexity in MFLOPs at 224 px. No library
# twin: the counts are this builder's, checked against a hand count in tests/test_shufflenet.py.
V1_VARIANTS = {
    # g: (stage-2 channels, MFLOPs, params at 1000 classes)
    1: (144, 143, 1_531_936),
    2: (200, 140, 1_733_848),
    3: (240, 137, 1_865_728),
    4: (272, 133, 1_968_344),
    8: (384, 137, 2_434_768),
}
for _g, (_c, _mflops, _count) in V1_VARIANTS.items():
    register(
        f'shufflenet_g{_g}',
        ShuffleNetV1,
        dict(groups=_g, stage_channels=(_c, 2 * _c, 4 * _c)),
        family='shufflenet_v1',
        input_size=(224, 224, 3),
        min_input=32,
        reference=f'Zhang et al. 2018, Table 1 (ShuffleNet 1x, g={_g}, {_mflops} MFLOPs; '
        'parameters hand-counted)',
        reference_params=_count,
    )
