"""Multi-Residual Networks (Abdi & Nahavandi 2016, arXiv:1609.05672).

A multi-residual block adds k residual functions of its input to the identity path:

    x_{l+1} = x_l + sum_{i=1..k} F_i(x_l),

each F_i with its own weights: the network grows wider in residual functions instead of deeper
(the paper reads a ResNet as an ensemble of paths; k functions per block multiply the paths).
With k = 1 this is the pre-activation ResNet of He et al. 2016b.

The CIFAR networks are pre-activation ResNets with three stages of (16, 32, 64) x ``width``
planes after a 3x3 stem of 16 channels, final BN-ReLU, global average pool and a linear layer:
  * ``block='bottleneck'`` (depth = 9n + 2): F_i = BN-ReLU-conv1x1(p)-BN-ReLU-conv3x3(p)-
    BN-ReLU-conv1x1(4p), the ResNet-164/1001 unit, stride on the first 1x1 as in the
    authors' Torch code (masabdi/multi-resnet, models/multi-resnet.lua);
  * ``block='basic'`` (depth = 6n + 2): F_i = BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, the
    WRN unit, for the wide (``width`` > 1) networks.
The first unit of each stage pre-activates once, BN-ReLU shared by its k functions and by the
shortcut, which is a 1x1 convolution where the shape changes (option B); every other unit
gives each F_i its own BN-ReLU and keeps the identity untouched. That is the authors' layout.

Stochastic depth (``drop_path_rate``) drops a block's whole residual sum per sample, with the
linear decay of Huang et al. 2016. Units 2..n of a stage are identical and run as one
``nn.scan`` (``scan_blocks``; parameters stacked under ``stage{s}/stacked/block``, unit 1 of
the stage is ``stage{s}/0``; :class:`~jaxcnn.layers.stage.Stage`), so depth costs no compile
time.

Registered row: ``multiresnet200_k5``, depth 200, k = 5 (bottleneck, width 1): 10.2M
parameters, 4.35 % CIFAR-10 / 20.42 % CIFAR-100 error, set against the 1001-layer pre-activation
ResNet of the same 10.2M. Reading: the figures are the paper's CIFAR results as the authors'
repository README tabulates them with parameter counts (masabdi/multi-resnet); the paper's
own table could not be consulted here; the authors' Torch code gives the layout. This layout counts 10,187,354 (tests/test_multiresnet.py recounts it by hand),
which rounds to 10.2M. Other rows are arguments of the same row:
  * depth 398, k = 5 (20.4M, 3.92 %): ``create_model('multiresnet200_k5', depth=398)`` counts
    20,388,314, which rounds to that 20.4M too (tested; not registered because its jitted
    training step costs twice the 200-layer one on the CPU test machine);
  * the wide rows, depth 26, k = 2 / 4, width 10 (3.96 % / 3.73 %): ``depth=26, k=2, width=10,
    block='basic'`` counts 72.7M (145.1M with k = 4); the README prints 72M and 154M, so these
    figures could not be confirmed and the rows are not registered.
"""

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from ..layers import (
    ClassifierHead,
    DropPath,
    batch_norm,
    check_image_batch,
    conv2d,
    drop_path_rates,
    tap,
)
from ..layers.stage import Stage, stage_blocks
from ..registry import CIFAR10_MEAN, CIFAR10_STD, register

EXPANSION = {'basic': 1, 'bottleneck': 4}
LAYERS_PER_UNIT = {'basic': 2, 'bottleneck': 3}


def units_per_stage(depth: int, block: str) -> int:
    """n of a 3-stage CIFAR network of ``depth`` layers: depth = 3 * layers_per_unit * n + 2."""
    per = 3 * LAYERS_PER_UNIT[block]
    n, rem = divmod(depth - 2, per)
    if rem or n < 1:
        raise ValueError(f'a {block} multi-residual network needs depth {per}n + 2, got {depth}')
    return n


class ResidualFunction(nn.Module):
    """One F_i: ``preact`` adds its own BN-ReLU in front (every unit but a stage's first)."""

    block: str
    planes: int
    stride: int = 1
    preact: bool = True
    dropout: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = lambda name: batch_norm(train, name=name, **kw)
        p = self.planes
        h = nn.relu(bn('bn1')(x)) if self.preact else x
        if self.block == 'bottleneck':
            h = conv2d(p, 1, self.stride, name='conv1', **kw)(h)
            h = conv2d(p, 3, name='conv2', **kw)(nn.relu(bn('bn2')(h)))
            return conv2d(4 * p, 1, name='conv3', **kw)(nn.relu(bn('bn3')(h)))
        h = conv2d(p, 3, self.stride, name='conv1', **kw)(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(bn('bn2')(h)))
        return conv2d(p, 3, name='conv2', **kw)(h)


class MultiResidualUnit(nn.Module):
    """x + sum_i F_i(x) with ``k`` functions ``f1`` .. ``fk``."""

    block: str
    planes: int
    k: int
    stride: int = 1
    first: bool = False  # a stage's first unit: shared pre-activation (+ projection)
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_ch = self.planes * EXPANSION[self.block]
        shortcut, h = x, x
        if self.first:
            h = nn.relu(batch_norm(train, name='bn', **kw)(x))
            if self.stride != 1 or x.shape[-1] != out_ch:
                shortcut = conv2d(out_ch, 1, self.stride, name='shortcut', **kw)(h)
        residual = [
            ResidualFunction(
                self.block,
                self.planes,
                self.stride,
                not self.first,
                self.dropout,
                name=f'f{i + 1}',
                **kw,
            )(h, train)
            for i in range(self.k)
        ]
        residual = sum(residual[1:], residual[0])
        return shortcut + DropPath(self.drop_path)(residual, train)


class MultiResNet(nn.Module):
    """CIFAR multi-residual network: ``depth`` layers, ``k`` residual functions per block.

    scan_blocks: run units 2..n of each stage as one ``nn.scan`` (``stage{s}/stacked``);
    remat: recompute each unit's activations in the backward pass (True, or a
    ``jax.checkpoint_policies`` name); see :class:`~jaxcnn.layers.stage.Stage`.
    """

    depth: int = 200
    k: int = 5
    block: str = 'bottleneck'
    width: int = 1
    widths: Sequence[int] = (16, 32, 64)  # planes per stage, before the ``width`` factor
    stem_width: int = 16
    block_dropout: float = 0.0
    scan_blocks: bool = True
    remat: Union[bool, str] = False
    num_classes: int = 10
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        if self.block not in EXPANSION:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        if len(self.widths) != 3:
            raise ValueError(
                f'widths gives the planes of the three CIFAR stages, got {self.widths}'
            )
        if self.k < 1:
            raise ValueError(f'k (residual functions per block) must be >= 1, got {self.k}')
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = units_per_stage(self.depth, self.block)
        check_image_batch(x, 4, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        x = conv2d(self.stem_width, 3, name='conv1', **kw)(x)
        tap(x, 'conv1')
        rates = drop_path_rates(self.drop_path_rate, len(self.widths) * n)
        for s, base in enumerate(self.widths):
            planes = base * self.width
            stage_rates = rates[s * n : (s + 1) * n]
            blocks = stage_blocks(
                MultiResidualUnit,
                [
                    dict(
                        block=self.block,
                        planes=planes,
                        k=self.k,
                        stride=(1 if s == 0 else 2) if u == 0 else 1,
                        first=u == 0,
                        dropout=self.block_dropout,
                        drop_path=stage_rates[u],
                        **kw,
                    )
                    for u in range(n)
                ],
            )
            x = Stage(blocks, scan=self.scan_blocks, remat=self.remat, name=f'stage{s + 1}')(
                x, train
            )
            tap(x, f'stage{s + 1}')
        x = nn.relu(batch_norm(train, name='final_bn', **kw)(x))
        if features_only:
            return x
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


_CIFAR = dict(
    family='multiresnet',
    input_size=(32, 32, 3),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    num_classes=10,
    min_input=8,
)
register(
    'multiresnet200_k5',
    MultiResNet,
    dict(depth=200, k=5, block='bottleneck'),
    reference='Abdi & Nahavandi 2016, Multi-Residual Networks, CIFAR comparison table '
    '(multi-resnet depth 200, k=5, 10.2M, 4.35 % CIFAR-10)',
    reference_params=10.2e6,
    params_rounding=1e5,
    **_CIFAR,
)
