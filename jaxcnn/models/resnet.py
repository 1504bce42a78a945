"""The residual family: ResNet, CIFAR ResNet, pre-activation ResNet, WideResNet, ResNeXt, SE-ResNet.

One generic builder, :class:`ResNet`, reads the stage table (blocks per stage, widths) and a
block kind; every registered variant below is a row of arguments. Parameter names mirror
torchvision's (``conv1``, ``bn1``, ``layer{s}/{b}/conv1`` ...), which keeps weight conversion
a table of renames (see :mod:`jaxcnn.convert`).

References:
  He et al. 2016, "Deep Residual Learning", Table 1 (ImageNet) and §4.2 (CIFAR, option A).
  He et al. 2016b, "Identity Mappings in Deep Residual Networks" (pre-activation, ResNet-164/1001).
  Zagoruyko & Komodakis 2016, "Wide Residual Networks", Table 1 (B(3,3), dropout in the block).
  Xie et al. 2017, "Aggregated Residual Transformations" (ResNeXt, Table 1).
  Hu et al. 2018, "Squeeze-and-Excitation Networks".
  Huang et al. 2016, "Deep Networks with Stochastic Depth" (``drop_path_rate``).
"""

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from ..layers import (
    check_image_batch,
    ClassifierHead,
    DropPath,
    SqueezeExcite,
    batch_norm,
    conv2d,
    drop_path_rates,
    max_pool,
    tap,
)
from ..layers.stage import Stage, stage_blocks
from ..registry import CIFAR10_MEAN, CIFAR10_STD, register

EXPANSION = {'basic': 1, 'bottleneck': 4, 'preact_basic': 1, 'preact_bottleneck': 4}


class Shortcut(nn.Module):
    """The identity path of a block for He et al.'s options.

    A: parameter-free: subsample spatially and zero-pad the new channels (CIFAR ResNets).
    B: 1x1 projection (+ BN unless pre-activation) only when the shape changes.
    C: 1x1 projection on every block.
    """

    out_channels: int
    stride: int
    option: str = 'B'
    preact: bool = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        changes = self.stride != 1 or x.shape[-1] != self.out_channels
        if self.option == 'A':
            if self.stride != 1:
                x = x[:, :: self.stride, :: self.stride, :]
            extra = self.out_channels - x.shape[-1]
            if extra:
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
            return x
        if self.option == 'B' and not changes:
            return x
        if self.option not in ('B', 'C'):
            raise ValueError(f"shortcut must be 'A', 'B' or 'C', got {self.option!r}")
        x = conv2d(
            self.out_channels,
            1,
            self.stride,
            name='conv',
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)
        if not self.preact:
            x = batch_norm(train, name='bn', dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x


class ResidualBlock(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1-3x3-1x1) block, post- or pre-activation.

    Stride sits on the 3x3 convolution (ResNet v1.5, as torchvision). ``groups`` and
    ``base_width`` give ResNeXt's grouped 3x3; ``se_ratio`` adds SE before the addition;
    ``dropout`` is WideResNet's dropout between the two convolutions.
    """

    kind: str
    planes: int
    stride: int = 1
    groups: int = 1
    base_width: int = 64
    shortcut: str = 'B'
    se_ratio: float = 0.0
    dropout: float = 0.0
    drop_path: float = 0.0
    zero_init_last: bool = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = lambda name, zero=False: batch_norm(train, name=name, zero_init=zero, **kw)
        preact = self.kind.startswith('preact')
        out_ch = self.planes * EXPANSION[self.kind]
        bottleneck = self.kind.endswith('bottleneck')
        width = int(self.planes * self.base_width / 64) * self.groups if bottleneck else self.planes

        if preact:
            # He et al. 2016b: BN-ReLU before each conv; a projection reads the pre-activated input
            # while the identity path stays untouched.
            h = nn.relu(bn('bn1')(x))
            sc = Shortcut(out_ch, self.stride, self.shortcut, True, name='downsample', **kw)
            needs_proj = self.shortcut == 'C' or (
                self.shortcut == 'B' and (self.stride != 1 or x.shape[-1] != out_ch)
            )
            shortcut = sc(h if needs_proj else x, train)
            if bottleneck:
                h = conv2d(width, 1, name='conv1', **kw)(h)
                h = nn.relu(bn('bn2')(h))
                h = conv2d(width, 3, self.stride, groups=self.groups, name='conv2', **kw)(h)
                h = nn.relu(bn('bn3')(h))
                h = conv2d(out_ch, 1, name='conv3', **kw)(h)
            else:
                h = conv2d(width, 3, self.stride, name='conv1', **kw)(h)
                h = nn.relu(bn('bn2')(h))
                h = nn.Dropout(self.dropout, deterministic=not train)(h)
                h = conv2d(out_ch, 3, name='conv2', **kw)(h)
        else:
            shortcut = Shortcut(out_ch, self.stride, self.shortcut, False, name='downsample', **kw)(
                x, train
            )
            if bottleneck:
                h = nn.relu(bn('bn1')(conv2d(width, 1, name='conv1', **kw)(x)))
                h = conv2d(width, 3, self.stride, groups=self.groups, name='conv2', **kw)(h)
                h = nn.relu(bn('bn2')(h))
                h = bn('bn3', self.zero_init_last)(conv2d(out_ch, 1, name='conv3', **kw)(h))
            else:
                h = nn.relu(bn('bn1')(conv2d(width, 3, self.stride, name='conv1', **kw)(x)))
                h = nn.Dropout(self.dropout, deterministic=not train)(h)
                h = bn('bn2', self.zero_init_last)(conv2d(out_ch, 3, name='conv2', **kw)(h))
        if self.se_ratio:
            h = SqueezeExcite(rd_ratio=self.se_ratio, name='se', **kw)(h)
        h = DropPath(self.drop_path)(h, train)
        out = h + shortcut
        return out if preact else nn.relu(out)


class ResNet(nn.Module):
    """Generic residual network built from a stage table.

    layers: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    widths: the "planes" of each stage (block output is planes x expansion).
    block: 'basic' | 'bottleneck' | 'preact_basic' | 'preact_bottleneck'.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (one 3x3 conv).
    scan_blocks: run the identical blocks 2..n of each stage through ``nn.scan`` (parameters
      stacked under ``layer{s}/stacked``, :class:`~jaxcnn.layers.stage.Stage`): compile time
      stops growing with depth, which is what makes ResNet-1202 practical; the math is unchanged.
    remat: recompute each block's activations in the backward pass instead of storing them
      (True, or a ``jax.checkpoint_policies`` name).
    """

    layers: Sequence[int]
    widths: Sequence[int] = (64, 128, 256, 512)
    block: str = 'bottleneck'
    stem: str = 'imagenet'
    stem_width: int = 64
    num_classes: int = 1000
    groups: int = 1
    base_width: int = 64
    shortcut: str = 'B'
    se_ratio: float = 0.0
    block_dropout: float = 0.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    zero_init_last: bool = False
    scan_blocks: bool = False
    remat: Union[bool, str] = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        if self.block not in EXPANSION:
            raise ValueError(f'block must be one of {sorted(EXPANSION)}, got {self.block!r}')
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        preact = self.block.startswith('preact')
        check_image_batch(x, 8, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        if self.stem == 'imagenet':
            x = conv2d(self.stem_width, 7, 2, name='conv1', **kw)(x)
            if not preact:
                x = nn.relu(batch_norm(train, name='bn1', **kw)(x))
            # timm's level names: ResNet's act1/layer{n}, ResNetV2's stem.conv/stages.{s}
            tap(x, 'stem.conv' if preact else 'act1')
            x = max_pool(x, 3, 2)
        elif self.stem == 'cifar':
            x = conv2d(self.stem_width, 3, 1, name='conv1', **kw)(x)
            if not preact:
                x = nn.relu(batch_norm(train, name='bn1', **kw)(x))
            tap(x, 'conv1' if preact else 'act1')
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")

        rates = iter(drop_path_rates(self.drop_path_rate, sum(self.layers)))
        for s, (n_blocks, planes) in enumerate(zip(self.layers, self.widths)):
            blocks = stage_blocks(
                ResidualBlock,
                [
                    dict(
                        kind=self.block,
                        planes=planes,
                        stride=2 if (s > 0 and b == 0) else 1,
                        groups=self.groups,
                        base_width=self.base_width,
                        shortcut=self.shortcut,
                        se_ratio=self.se_ratio,
                        dropout=self.block_dropout,
                        drop_path=next(rates),
                        zero_init_last=self.zero_init_last,
                        **kw,
                    )
                    for b in range(n_blocks)
                ],
            )
            x = Stage(blocks, scan=self.scan_blocks, remat=self.remat, name=f'layer{s + 1}')(
                x, train
            )
            tap(x, f'stages.{s}' if preact and self.stem == 'imagenet' else f'layer{s + 1}')
        if preact:
            x = nn.relu(batch_norm(train, name='final_bn', **kw)(x))
        if features_only:
            return x
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


# ---------------------------------------------------------------------------------------------
# ImageNet rows (torchvision layout).  Counts: torchvision 0.29.1 / timm 1.0.31, 1000 classes.
_IMAGENET = dict(family='resnet', input_size=(224, 224, 3))
for _name, _layers, _block, _count in [
    ('resnet18', (2, 2, 2, 2), 'basic', 11_689_512),
    ('resnet34', (3, 4, 6, 3), 'basic', 21_797_672),
    ('resnet50', (3, 4, 6, 3), 'bottleneck', 25_557_032),
    ('resnet101', (3, 4, 23, 3), 'bottleneck', 44_549_160),
    ('resnet152', (3, 8, 36, 3), 'bottleneck', 60_192_808),
]:
    register(
        _name,
        ResNet,
        dict(layers=_layers, block=_block),
        reference=f'torchvision {_name}',
        reference_params=_count,
        torch_name=f'tv:{_name}',
        **_IMAGENET,
    )

for _name, _layers, _count in [
    ('wide_resnet50_2', (3, 4, 6, 3), 68_883_240),
    ('wide_resnet101_2', (3, 4, 23, 3), 126_886_696),
]:
    register(
        _name,
        ResNet,
        dict(layers=_layers, block='bottleneck', base_width=128),
        reference=f'torchvision {_name}',
        reference_params=_count,
        torch_name=f'tv:{_name}',
        **_IMAGENET,
    )

for _name, _layers, _groups, _bw, _count in [
    ('resnext50_32x4d', (3, 4, 6, 3), 32, 4, 25_028_904),
    ('resnext101_32x8d', (3, 4, 23, 3), 32, 8, 88_791_336),
    ('resnext101_64x4d', (3, 4, 23, 3), 64, 4, 83_455_272),
]:
    register(
        _name,
        ResNet,
        dict(layers=_layers, block='bottleneck', groups=_groups, base_width=_bw),
        reference=f'torchvision {_name}',
        reference_params=_count,
        torch_name=f'tv:{_name}',
        **_IMAGENET,
    )

register(
    'seresnet50',
    ResNet,
    dict(layers=(3, 4, 6, 3), block='bottleneck', se_ratio=1 / 16),
    reference='timm seresnet50',
    reference_params=28_088_024,
    torch_name='timm:seresnet50',
    **_IMAGENET,
)
register(
    'seresnext50_32x4d',
    ResNet,
    dict(layers=(3, 4, 6, 3), block='bottleneck', groups=32, base_width=4, se_ratio=1 / 16),
    reference='timm seresnext50_32x4d',
    reference_params=27_559_896,
    torch_name='timm:seresnext50_32x4d',
    **_IMAGENET,
)

for _name, _layers, _count in [
    ('resnetv2_50', (3, 4, 6, 3), 25_549_352),
    ('resnetv2_101', (3, 4, 23, 3), 44_541_480),
]:
    register(
        _name,
        ResNet,
        dict(layers=_layers, block='preact_bottleneck'),
        reference=f'timm {_name}',
        reference_params=_count,
        torch_name=f'timm:{_name}',
        **_IMAGENET,
    )

# ---------------------------------------------------------------------------------------------
# CIFAR rows (10 classes, 32x32).  The paper reports rounded counts; ``params_rounding``
# says to which unit the reference figure is given.
_CIFAR = dict(
    family='resnet_cifar',
    input_size=(32, 32, 3),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    num_classes=10,
    min_input=8,
)
for _depth, _m in [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7), (1202, 19.4)]:
    _n = (_depth - 2) // 6
    register(
        f'resnet{_depth}',
        ResNet,
        dict(
            layers=(_n,) * 3,
            widths=(16, 32, 64),
            block='basic',
            stem='cifar',
            stem_width=16,
            shortcut='A',
            scan_blocks=_depth > 56,
        ),
        reference='He et al. 2016, Deep Residual Learning, Table 6 (option A shortcuts)',
        reference_params=_m * 1e6,
        params_rounding=1e4 if _m < 1 else 1e5,
        **_CIFAR,
    )

# Pre-activation CIFAR ResNets (He et al. 2016b, Table 1/2): basic blocks for 110, bottleneck
# blocks (16/32/64 planes, x4 expansion) for 164 and 1001.
register(
    'preact_resnet110',
    ResNet,
    dict(
        layers=(18,) * 3,
        widths=(16, 32, 64),
        block='preact_basic',
        stem='cifar',
        stem_width=16,
        scan_blocks=True,
    ),
    reference='He et al. 2016b, Identity Mappings, Table 2 (pre-act ResNet-110, 1.7M)',
    reference_params=1.7e6,
    params_rounding=1e5,
    **_CIFAR,
)
for _name, _n, _m in [('resnet164', 18, 1.7)]:
    register(
        _name,
        ResNet,
        dict(
            layers=(_n,) * 3,
            widths=(16, 32, 64),
            block='preact_bottleneck',
            stem='cifar',
            stem_width=16,
            scan_blocks=True,
        ),
        reference=f'He et al. 2016b, Identity Mappings, Table 2 (pre-act ResNet-{9 * _n + 2}, {_m}M)',
        reference_params=_m * 1e6,
        params_rounding=1e5,
        **_CIFAR,
    )

# Wide ResNets WRN-d-k: pre-activation B(3,3) blocks, widths 16k/32k/64k, dropout between convs
# (Zagoruyko & Komodakis 2016, Table 1; parameter counts from their Table 4/5).
for _d, _k, _m in [(28, 10, 36.5), (40, 4, 8.9), (16, 8, 11.0)]:
    _n = (_d - 4) // 6
    register(
        f'wrn_{_d}_{_k}',
        ResNet,
        dict(
            layers=(_n,) * 3,
            widths=(16 * _k, 32 * _k, 64 * _k),
            block='preact_basic',
            stem='cifar',
            stem_width=16,
            block_dropout=0.3,
        ),
        reference=f'Zagoruyko & Komodakis 2016, Wide Residual Networks, Table 4/5 (WRN-{_d}-{_k}, {_m}M)',
        reference_params=_m * 1e6,
        params_rounding=1e5,
        **_CIFAR,
    )
