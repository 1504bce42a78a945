"""Reversible networks: RevNet (Gomez et al. 2017) and i-RevNet (Jacobsen et al. 2018).

Both stack additive couplings (:class:`jaxcnn.layers.reversible.Coupling`) in stages of
:class:`jaxcnn.layers.stage.Stage` with ``reversible=True``, whose backward pass rebuilds
activations from the block outputs instead of storing them (``reversible=False`` scans the same
couplings under ordinary autodiff, ``remat=True`` recomputes them per block, for comparison).

RevNet (Gomez et al. 2017, Table 1): the channels are split in two halves; every residual
unit of a ResNet becomes a coupling y1 = x1 + F(x2), y2 = x2 + G(y1) whose F and G are
pre-activation residual functions (He et al. 2016b) of half the width. The first unit of each
stage changes resolution or width, is not invertible and stores its activations, as in the
paper; its identity path is average-pooled and zero-padded (basic units) or a 1x1 projection
(bottleneck units), as in the authors' code (github.com/renmengye/revnet-public).

============  ========  ====================  ==========  ==========================
model         units     channels              F, G        Table 1 parameters
============  ========  ====================  ==========  ==========================
RevNet-38     3-3-3     32-32-64-112          basic       0.46M
RevNet-110    9-9-9     32-32-64-128          basic       1.73M
RevNet-164    9-9-9     32-32-64-128          bottleneck  1.75M
RevNet-104    2-2-11-2  128-128-256-512-832   bottleneck  45.2M (ImageNet, 1000 classes)
============  ========  ====================  ==========  ==========================

(Channels: stem, then each stage's width; bottleneck units output 4x the width.)

The same coupling makes a reversible option for the residual family: ``branch='resnet'``
builds F and G from :class:`jaxcnn.models.resnet.ResidualBlock` (any kind, SE, groups) as
F(x) = block(x) - x, the block's own residual branch (its identity shortcut is exact), and
``revnet38_se`` registers one such model.

i-RevNet (Jacobsen et al. 2018, §3 and Fig. 1): a cascade of half-couplings
(x1, x2) -> (x2, x1 + F(x2)) with 3x3 bottleneck F (BN-ReLU-conv x3, width out/4), an
invertible space-to-depth downsampling in place of strides, no pooling: the network is a
bijection up to the classifier, and :meth:`IRevNet.inverse` maps the final representation
back to the image. Two consecutive half-couplings are one RevNet coupling, so the stride-1
stretches run through the same memory-free sequence.
"""

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from ..layers import (
    ClassifierHead,
    DropPath,
    avg_pool,
    batch_norm,
    check_image_batch,
    conv2d,
    drop_path_rates,
    max_pool,
    tap,
)
from ..layers.reversible import Coupling, depth_to_space, space_to_depth
from ..layers.stage import Stage, stage_blocks
from ..registry import CIFAR10_MEAN, CIFAR10_STD, register
from .resnet import EXPANSION, ResidualBlock


class RevBranch(nn.Module):
    """F or G of a RevNet unit: a pre-activation residual function (He et al. 2016b).

    basic: [BN-ReLU]-conv3x3-BN-ReLU-conv3x3; bottleneck: [BN-ReLU]-conv1x1-BN-ReLU-conv3x3-
    BN-ReLU-conv1x1 with inner width out/4. ``preact=False`` drops the leading BN-ReLU (the
    network's first unit, whose input was just normalised by the stem). ``dropout`` sits
    before the last convolution, as WideResNet's.
    """

    out_channels: int
    stride: int = 1
    bottleneck: bool = False
    preact: bool = True
    dropout: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = lambda h, name: nn.relu(batch_norm(train, name=name, **kw)(h))
        h = act(x, 'bn1') if self.preact else x
        if self.bottleneck:
            mid = self.out_channels // 4
            h = conv2d(mid, 1, self.stride, name='conv1', **kw)(h)
            h = conv2d(mid, 3, name='conv2', **kw)(act(h, 'bn2'))
            h = nn.Dropout(self.dropout, deterministic=not train)(act(h, 'bn3'))
            return conv2d(self.out_channels, 1, name='conv3', **kw)(h)
        h = conv2d(self.out_channels, 3, self.stride, name='conv1', **kw)(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(act(h, 'bn2'))
        return conv2d(self.out_channels, 3, name='conv2', **kw)(h)


class ResidualBranch(nn.Module):
    """F(x) = block(x) - x for a shape-preserving pre-activation block of the residual family.

    With kind 'preact_basic' / 'preact_bottleneck', stride 1 and equal widths the block's
    shortcut is the identity, so this is exactly its residual branch; any F is a valid
    coupling function, so the subtraction's rounding does not affect invertibility.
    """

    kind: str
    channels: int
    se_ratio: float = 0.0
    groups: int = 1
    base_width: int = 64
    dropout: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if not self.kind.startswith('preact'):
            raise ValueError(f'a residual branch needs a pre-activation block, got {self.kind!r}')
        planes = self.channels // EXPANSION[self.kind]
        out = ResidualBlock(
            self.kind,
            planes,
            1,
            self.groups,
            self.base_width,
            'B',
            self.se_ratio,
            self.dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name='block',
        )(x, train)
        return out - x


class RevDownUnit(nn.Module):
    """The first unit of a stage: a coupling with a strided / widening F and G input path.

    y1 = S(x1) + F(x2), y2 = S(x2) + G(y1), S the identity path. Not invertible; run under
    ordinary autodiff (its activations are stored).
    """

    channels: int  # per half
    stride: int
    bottleneck: bool
    first: bool = False
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    def _shortcut(self, x, name):
        changes = self.stride != 1 or x.shape[-1] != self.channels
        if not changes:
            return x
        if self.bottleneck:
            return conv2d(
                self.channels,
                1,
                self.stride,
                name=name,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )(x)
        if self.stride != 1:
            x = avg_pool(x, self.stride, self.stride)
        extra = self.channels - x.shape[-1]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))

    @nn.compact
    def __call__(self, x, train: bool = False):
        x1, x2 = x
        kw = dict(
            bottleneck=self.bottleneck,
            dropout=self.dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        f = RevBranch(self.channels, self.stride, preact=not self.first, name='f', **kw)(x2, train)
        y1 = self._shortcut(x1, 'proj1') + DropPath(self.drop_path)(f, train)
        g = RevBranch(self.channels, name='g', **kw)(y1, train)
        y2 = self._shortcut(x2, 'proj2') + DropPath(self.drop_path)(g, train)
        return y1, y2


class RevNet(nn.Module):
    """RevNet from a stage table (see the module docstring for the registered rows).

    layers: units per stage; widths: per-stage width (bottleneck units output 4x);
    stem: 'cifar' (3x3 conv) or 'imagenet' (7x7/2 conv + 3x3/2 max-pool), each + BN-ReLU.
    branch: 'revnet' (the paper's F, G) or 'resnet' (F, G from resnet.ResidualBlock of kind
      ``resnet_kind``, with ``se_ratio``) for the reversible units.
    reversible: False trains the same network with ordinary autodiff (scanned couplings, or
      unrolled with ``scan_blocks=False``); ``remat`` recomputes each unit instead.
    """

    layers: Sequence[int]
    widths: Sequence[int]
    stem_width: int = 32
    bottleneck: bool = False
    stem: str = 'cifar'
    num_classes: int = 10
    branch: str = 'revnet'
    resnet_kind: str = 'preact_basic'
    se_ratio: float = 0.0
    block_dropout: float = 0.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    reversible: bool = True
    scan_blocks: bool = True
    remat: Union[bool, str] = False
    scan_unroll: int = 1  # lax.scan unroll of the reversible stages (see README: CPU)
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    def _coupling(self, channels, rate) -> dict:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.branch == 'revnet':
            branch = (
                RevBranch,
                dict(
                    out_channels=channels,
                    bottleneck=self.bottleneck,
                    dropout=self.block_dropout,
                    **kw,
                ),
            )
        elif self.branch == 'resnet':
            branch = (
                ResidualBranch,
                dict(
                    kind=self.resnet_kind,
                    channels=channels,
                    se_ratio=self.se_ratio,
                    dropout=self.block_dropout,
                    **kw,
                ),
            )
        else:
            raise ValueError(f"branch must be 'revnet' or 'resnet', got {self.branch!r}")
        return dict(
            branch=branch[0], branch_fields=tuple(sorted(branch[1].items())), drop_path=rate
        )

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_image_batch(x, 8, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        if self.stem == 'cifar':
            x = conv2d(self.stem_width, 3, name='conv1', **kw)(x)
            x = tap(nn.relu(batch_norm(train, name='bn1', **kw)(x)), 'bn1')
        elif self.stem == 'imagenet':
            x = conv2d(self.stem_width, 7, 2, name='conv1', **kw)(x)
            x = max_pool(tap(nn.relu(batch_norm(train, name='bn1', **kw)(x)), 'bn1'), 3, 2)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")

        half = x.shape[-1] // 2
        x = (x[..., :half], x[..., half:])
        rates = iter(drop_path_rates(self.drop_path_rate, sum(self.layers)))
        for s, (n_units, width) in enumerate(zip(self.layers, self.widths)):
            channels = width * (4 if self.bottleneck else 1) // 2
            blocks = stage_blocks(
                RevDownUnit,
                [
                    dict(
                        channels=channels,
                        stride=1 if s == 0 else 2,
                        bottleneck=self.bottleneck,
                        first=s == 0,
                        dropout=self.block_dropout,
                        drop_path=next(rates),
                        **kw,
                    )
                ],
            )
            blocks += stage_blocks(
                Coupling, [self._coupling(channels, next(rates)) for _ in range(n_units - 1)]
            )
            x = Stage(
                blocks,
                scan=self.scan_blocks,
                remat=self.remat,
                reversible=self.reversible,
                unroll=self.scan_unroll,
                name=f'layer{s + 1}',
            )(x, train)
            tap(jnp.concatenate(x, axis=-1), f'layer{s + 1}')  # the halves (x1, x2) as one map
        x1, x2 = x
        x = jnp.concatenate([x1, x2], axis=-1)
        x = nn.relu(batch_norm(train, name='final_bn', **kw)(x))
        if features_only:
            return x
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


# ---------------------------------------------------------------------------------------------
# i-RevNet


class IRevBranch(nn.Module):
    """F of an i-RevNet block: [BN-ReLU]-conv3x3(/stride)-BN-ReLU-conv3x3-dropout-BN-ReLU-conv3x3.

    Inner width out/``mult`` (mult = 4); no leading BN-ReLU in the network's first block.
    """

    out_channels: int
    stride: int = 1
    first: bool = False
    mult: int = 4
    dropout: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = lambda h, name: nn.relu(batch_norm(train, name=name, **kw)(h))
        mid = self.out_channels // self.mult
        h = x if self.first else act(x, 'bn1')
        h = conv2d(mid, 3, self.stride, name='conv1', **kw)(h)
        h = conv2d(mid, 3, name='conv2', **kw)(act(h, 'bn2'))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return conv2d(self.out_channels, 3, name='conv3', **kw)(act(h, 'bn3'))


class IRevHalfBlock(nn.Module):
    """(x1, x2) -> (S(x2), S(x1) + F(x2)), S = space-to-depth when ``stride`` is 2, else identity.

    Invertible in closed form (:meth:`inverse`); used for the downsampling block of each stage
    and for a stage's odd block out (the rest pair up into reversible couplings).
    """

    out_channels: int
    stride: int = 1
    first: bool = False
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.f = IRevBranch(
            self.out_channels,
            self.stride,
            self.first,
            dropout=self.dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.drop = DropPath(self.drop_path)

    def _s(self, x):
        return space_to_depth(x, 2) if self.stride == 2 else x

    def __call__(self, x, train: bool = False):
        x1, x2 = x
        fx = self.drop(self.f(x2, train), train).astype(x1.dtype)
        return self._s(x2), self._s(x1) + fx

    def inverse(self, y, train: bool = False):
        a, b = y
        x2 = depth_to_space(a, 2) if self.stride == 2 else a
        fx = self.drop(self.f(x2, train), train).astype(b.dtype)
        x1 = b - fx
        return (depth_to_space(x1, 2) if self.stride == 2 else x1), x2


class IRevNet(nn.Module):
    """Bijective i-RevNet (Jacobsen et al. 2018): space-to-depth stem, stages of half-couplings.

    blocks: half-couplings per stage (the first downsamples by space-to-depth); channels:
    the F output width per stage (the representation has 2x that); init_ds: block size of the
    initial space-to-depth (2 -> 3x224x224 becomes 12x112x112); in_pad: channels of injective
    zero padding after it (0 keeps the network bijective, i-RevNet (b)).
    ``inverse(z)`` maps ``model.apply(..., features_only=True)`` back to the input.
    """

    blocks: Sequence[int] = (6, 16, 72, 6)
    channels: Sequence[int] = (24, 96, 384, 1536)
    init_ds: int = 2
    in_pad: int = 0
    num_classes: int = 1000
    block_dropout: float = 0.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    reversible: bool = True
    scan_blocks: bool = True
    remat: Union[bool, str] = False
    scan_unroll: int = 1  # lax.scan unroll of the reversible stages (see README: CPU)
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rates = drop_path_rates(self.drop_path_rate, sum(self.blocks))
        half = (3 * self.init_ds**2 + self.in_pad) // 2  # RGB input
        for c in self.channels:
            # the squeeze of a downsampling block quadruples the half it passes through
            if c != 4 * half:
                raise ValueError(
                    f'i-RevNet widths must each be 4x the previous half; got '
                    f'{tuple(self.channels)} for an input half of '
                    f'{(3 * self.init_ds**2 + self.in_pad) // 2}'
                )
            half = c
        stages, start = [], 0
        for s, (n, c) in enumerate(zip(self.blocks, self.channels)):
            r, start = rates[start : start + n], start + n
            half = dict(out_channels=c, dropout=self.block_dropout, **kw)
            n_rest = n - 1
            blocks = stage_blocks(
                IRevHalfBlock,
                [dict(half, stride=2, first=s == 0, drop_path=r[0])]
                + [dict(half, drop_path=r[1])] * (n_rest % 2),
            )
            branch = tuple(sorted(dict(out_channels=c, dropout=self.block_dropout, **kw).items()))
            # a stride-1 stretch: pairs of half-couplings are RevNet couplings, one rate per pair
            blocks += stage_blocks(
                Coupling,
                [
                    dict(branch=IRevBranch, branch_fields=branch, drop_path=p)
                    for p in r[1 + n_rest % 2 :: 2]
                ],
            )
            stages.append(
                Stage(
                    blocks,
                    unrolled=1 + n_rest % 2,
                    scan=self.scan_blocks,
                    remat=self.remat,
                    reversible=self.reversible,
                    unroll=self.scan_unroll,
                )
            )
        self.stages = stages
        self.final_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5, **kw)
        self.head = ClassifierHead(self.num_classes, self.drop_rate, **kw)

    def _split(self, x):
        if self.init_ds > 1:
            x = space_to_depth(x, self.init_ds)
        if self.in_pad:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.in_pad)))
        half = x.shape[-1] // 2
        return x[..., :half], x[..., half:]

    def __call__(self, x, train: bool = False, features_only: bool = False):
        check_image_batch(x, 2 ** (len(self.blocks) + 1), type(self).__name__)
        x = self._split(jnp.asarray(x, self.dtype or jnp.float32))
        for i, stage in enumerate(self.stages):
            x = stage(x, train)
            tap(jnp.concatenate(x, axis=-1), f'stages_{i}')  # setup's name for stages[i]
        x1, x2 = x
        z = jnp.concatenate([x1, x2], axis=-1)
        if features_only:
            return z
        z = nn.relu(self.final_bn(z, use_running_average=not train))
        return self.head(z, train)

    def inverse(self, z, train: bool = False):
        """The input image from the final representation z (``features_only=True`` output)."""
        half = z.shape[-1] // 2
        x = (z[..., :half], z[..., half:])
        for stage in reversed(self.stages):
            x = stage(x, train, inverse=True)
        x1, x2 = x
        x = jnp.concatenate([x1, x2], axis=-1)
        if self.in_pad:
            x = x[..., : x.shape[-1] - self.in_pad]
        return depth_to_space(x, self.init_ds) if self.init_ds > 1 else x


# ---------------------------------------------------------------------------------------------
# Rows. CIFAR: 10 classes, 32x32; the paper's figures are rounded to 0.01M.
_CIFAR = dict(
    family='revnet',
    input_size=(32, 32, 3),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    num_classes=10,
    min_input=8,
)
_TABLE1 = 'Gomez et al. 2017, The Reversible Residual Network, Table 1'
for _name, _layers, _widths, _bottleneck, _m in [
    ('revnet38', (3, 3, 3), (32, 64, 112), False, 0.46),
    ('revnet110', (9, 9, 9), (32, 64, 128), False, 1.73),
    ('revnet164', (9, 9, 9), (32, 64, 128), True, 1.75),
]:
    register(
        _name,
        RevNet,
        dict(layers=_layers, widths=_widths, bottleneck=_bottleneck),
        reference=f'{_TABLE1} ({_name}, {_m}M)',
        reference_params=_m * 1e6,
        params_rounding=1e4,
        **_CIFAR,
    )

register(
    'revnet104',
    RevNet,
    dict(
        layers=(2, 2, 11, 2),
        widths=(128, 256, 512, 832),
        stem_width=128,
        bottleneck=True,
        stem='imagenet',
        num_classes=1000,
    ),
    # this layout counts 45,428,072, 0.5 % above the table's 45.2M (the CIFAR rows match to
    # the table's 0.01M); the difference could not be traced, so the band is +-0.25M
    reference=f'{_TABLE1} (RevNet-104, 45.2M)',
    reference_params=45.2e6,
    params_rounding=5e5,
    family='revnet',
    input_size=(224, 224, 3),
    min_input=32,
)

# i-RevNet: the authors' released bijective ImageNet configuration (github.com/jhjacobsen/
# pytorch-i-revnet README, "bijective i-RevNet", their i-RevNet (b)): blocks 6-16-72-6, F widths
# 24-96-384-1536, initial 2x2 space-to-depth, no injective padding (3x224x224 = 150,528 numbers
# in, 3072x7x7 = 150,528 out). Counted by hand (tests/test_reversible.py): 125,120,356 with
# 1000 classes. The 29M quoted for i-RevNet (b) could not be reconciled with this layout; see
# docs/reversible.md.
register(
    'irevnet',
    IRevNet,
    dict(blocks=(6, 16, 72, 6), channels=(24, 96, 384, 1536), init_ds=2),
    reference='Jacobsen et al. 2018, i-RevNet, bijective ImageNet model as released '
    '(hand count of the layout, tests/test_reversible.py)',
    reference_params=125_120_356,
    family='irevnet',
    input_size=(224, 224, 3),
    min_input=32,
)

# The reversible option for the residual family: RevNet-38's layout whose reversible F and G
# are resnet.ResidualBlock('preact_basic', se_ratio=1/16) branches (SE-ResNet units, Hu et al.
# 2018). No paper reports it; the count is RevNet-38's plus the SE layers', checked by hand in
# tests/test_reversible.py.
register(
    'revnet38_se',
    RevNet,
    dict(
        layers=(3, 3, 3),
        widths=(32, 64, 112),
        branch='resnet',
        resnet_kind='preact_basic',
        se_ratio=1 / 16,
    ),
    reference='RevNet-38 (Gomez et al. 2017, Table 1) with SE-ResNet branches; hand count '
    'in tests/test_reversible.py',
    reference_params=472_058,
    **_CIFAR,
)
