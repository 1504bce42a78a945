"""PolyNet's PolyInception modules (Zhang, Li, Loy & Lin 2017, CVPR, §3) and a small CIFAR PolyNet.

A residual unit computes (I + F) x. PolyNet replaces it by second-order polynomial structures
of Inception-ResNet residual functions (§3 and its figure of the PolyInception modules):

    poly-2   (I + F + F^2) x = x + F(x) + F(F(x))     F applied twice, one set of weights
    mpoly-2  (I + F + GF)  x = x + F(x) + G(F(x))     F and G with their own weights
    2-way    (I + F + G)   x = x + F(x) + G(x)        two parallel functions (first order)

Each is a module that *takes its units as attributes* (``Poly2(f=unit)``, ``MPoly2(f=u, g=v)``,
``TwoWay(f=u, g=v)``), so any residual function composes: the unit is bound under the
structure's ``f`` / ``g``. As in Inception-ResNet (Szegedy et al. 2017, §3.3) the residual
terms are scaled by ``scale`` (beta) before the addition and a ReLU follows it:
y = ReLU(x + beta * (sum of the terms)). ``drop_path`` drops each term per sample
independently (PolyNet's stochastic paths), with inverted scaling.

Sharing in poly-2: both applications of F use the same convolution weights and the same
BatchNorm scales and shifts, so poly-2 holds exactly one unit's parameters (a 2-way module holds
two). The BatchNorm *running statistics* are kept per application (``batch_stats`` under
``stats0`` / ``stats1``): F's second application normalises F(x), whose statistics are not
those of x, and one shared running average of both would be wrong for either at inference.

The units are Inception-ResNet-v2's residual functions (Szegedy et al. 2017, Fig. 16/17/19):
parallel branches of conv-BN-ReLU (1x1 bottlenecks, 3x3 / 1x7-7x1 / 1x3-3x1 factorised
kernels), concatenated and brought back to the stage width by a linear 1x1 convolution with
bias (no BN), plus the two reduction modules (Fig. 7/18) between stages. ``UNIT_A/B/C`` and
``REDUCTION_A/B`` are the branch tables; the small CIFAR network uses them at reduced widths.

``polynet_small_cifar``: a 3x3 stem conv to 64 channels at 32x32, then three stages -- A
(64 channels, 32x32), reduction A, B (128, 16x16), reduction B, C (256, 8x8) -- each made of
one module of every kind, (poly-2, mpoly-2, 2-way), beta = 0.3, then Inception-ResNet-v2's
final 1x1 conv-BN-ReLU (256 channels), global average pool, linear classifier. Without that
last normalised layer the classifier reads the raw residual stream (all positive, RMS ~1.7 at
initialisation) and the first SGD steps at lr 0.1 blow the loss up to ~14. The paper's
ImageNet PolyNet (hundreds of Inception units on a 299 px stem) is too large to check here;
the reference for this configuration is the module definitions of §3 and a hand count of its
layers, written out independently in tests/test_polynet.py. Section and figure numbers are
this file's reading of the papers (PolyNet CVPR 2017; Inception-v4 / Inception-ResNet AAAI
2017); the unit widths, beta and the mix of modules are choices for a small network, not
figures from either paper.
"""

from typing import Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..layers import (
    ClassifierHead,
    DropPath,
    check_image_batch,
    conv2d,
    drop_path_rates,
    max_pool,
    tap,
)
from ..layers.stage import Stage, stage_blocks
from ..registry import CIFAR10_MEAN, CIFAR10_STD, register

# Branch tables: each branch is a list of (channels, (kh, kw), stride) conv-BN-ReLU layers.
# The residual units end in a linear 1x1 to the stage width; the reductions concatenate a
# 3x3/2 max-pool of their input with the branches.
Branches = Tuple[Tuple[Tuple[int, Tuple[int, int], int], ...], ...]
UNIT_A: Branches = (
    ((8, (1, 1), 1),),  # IR-v2 A at 1/4
    ((8, (1, 1), 1), (8, (3, 3), 1)),
    ((8, (1, 1), 1), (12, (3, 3), 1), (16, (3, 3), 1)),
)
UNIT_B: Branches = (
    ((24, (1, 1), 1),),  # IR-v2 B at 1/8
    ((16, (1, 1), 1), (20, (1, 7), 1), (24, (7, 1), 1)),
)
UNIT_C: Branches = (
    ((32, (1, 1), 1),),  # IR-v2 C at ~1/6
    ((32, (1, 1), 1), (40, (1, 3), 1), (48, (3, 1), 1)),
)
REDUCTION_A: Branches = (
    ((32, (3, 3), 2),),  # 64 -> 128
    ((16, (1, 1), 1), (16, (3, 3), 1), (32, (3, 3), 2)),
)
REDUCTION_B: Branches = (
    ((32, (1, 1), 1), (48, (3, 3), 2)),  # 128 -> 256
    ((32, (1, 1), 1), (40, (3, 3), 2)),
    ((32, (1, 1), 1), (40, (3, 3), 1), (40, (3, 3), 2)),
)


class _Stats(nn.Module):
    """Running mean and variance of one application of a shared BatchNorm."""

    @nn.compact
    def __call__(self, channels: int):
        mean = self.variable('batch_stats', 'mean', jnp.zeros, (channels,), jnp.float32)
        var = self.variable('batch_stats', 'var', jnp.ones, (channels,), jnp.float32)
        return mean, var


class SharedBatchNorm(nn.Module):
    """BatchNorm with one scale/shift for every application and running statistics per
    ``application`` (PyTorch's defaults: decay 0.9, eps 1e-5; statistics over N, H, W)."""

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, application: int = 0):
        c = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean, ra_var = _Stats(name=f'stats{application}')(c)
        xf = x.astype(jnp.float32)
        if train:
            mean = jnp.mean(xf, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (xf - mean) * (jnp.asarray(scale, jnp.float32) * jax.lax.rsqrt(var + self.epsilon))
        return (y + jnp.asarray(bias, jnp.float32)).astype(self.dtype or x.dtype)


class ConvBNReLU(nn.Module):
    """Convolution (no bias) - shared BatchNorm - ReLU; ``application`` picks the BN statistics."""

    features: int
    kernel: Tuple[int, int] = (1, 1)
    stride: int = 1
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, application: int = 0):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv2d(self.features, tuple(self.kernel), self.stride, name='conv', **kw)(x)
        return nn.relu(SharedBatchNorm(name='bn', **kw)(x, train, application))


def _branches(module, x, table, train, application):
    outs = []
    for i, branch in enumerate(table):
        h = x
        for j, (ch, kernel, stride) in enumerate(branch):
            h = ConvBNReLU(
                ch,
                kernel,
                stride,
                name=f'branch{i}_{j}',
                dtype=module.dtype,
                param_dtype=module.param_dtype,
            )(h, train, application)
        outs.append(h)
    return outs


class InceptionResidual(nn.Module):
    """An Inception-ResNet residual function F: branches, concatenation, linear 1x1 to ``width``.

    Returns F(x) alone (no identity, no scaling): the polynomial structures combine it."""

    width: int
    branches: Branches = UNIT_A
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, application: int = 0):
        h = jnp.concatenate(_branches(self, x, self.branches, train, application), axis=-1)
        return conv2d(
            self.width, 1, use_bias=True, name='up', dtype=self.dtype, param_dtype=self.param_dtype
        )(h)


class Reduction(nn.Module):
    """Inception-ResNet reduction: 3x3/2 max-pool of the input next to strided conv branches."""

    branches: Branches = REDUCTION_A
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        return jnp.concatenate(
            [max_pool(x, 3, 2)] + _branches(self, x, self.branches, train, 0), -1
        )


def _poly_output(module, x, terms, train):
    """ReLU(x + beta * sum(terms)), each term dropped by stochastic depth: every structure's end."""
    terms = [DropPath(module.drop_path, name=f'drop{i}')(t, train) for i, t in enumerate(terms)]
    return nn.relu(x + module.scale * (terms[0] + terms[1]))


class Poly2(nn.Module):
    """poly-2: y = ReLU(x + beta * (F(x) + F(F(x)))), one F for both applications."""

    f: nn.Module
    scale: float = 1.0
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        fx = self.f(x, train, application=0)
        return _poly_output(self, x, (fx, self.f(fx, train, application=1)), train)


class MPoly2(nn.Module):
    """mpoly-2: y = ReLU(x + beta * (F(x) + G(F(x)))), F and G with their own weights."""

    f: nn.Module
    g: nn.Module
    scale: float = 1.0
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        fx = self.f(x, train)
        return _poly_output(self, x, (fx, self.g(fx, train)), train)


class TwoWay(nn.Module):
    """2-way: y = ReLU(x + beta * (F(x) + G(x))), two parallel residual functions."""

    f: nn.Module
    g: nn.Module
    scale: float = 1.0
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        return _poly_output(self, x, (self.f(x, train), self.g(x, train)), train)


STRUCTURES = {'poly2': 1, 'mpoly2': 2, '2way': 2}  # kind -> number of distinct units


def poly_module(kind: str, make_unit, scale: float, drop_path: float, name: str):
    """Build the ``kind`` structure over fresh units from ``make_unit()`` (unbound modules)."""
    if kind == 'poly2':
        return Poly2(make_unit(), scale, drop_path, name=name)
    if kind == 'mpoly2':
        return MPoly2(make_unit(), make_unit(), scale, drop_path, name=name)
    if kind == '2way':
        return TwoWay(make_unit(), make_unit(), scale, drop_path, name=name)
    raise ValueError(f"module kind must be one of {sorted(STRUCTURES)}, got {kind!r}")


class PolyBlock(nn.Module):
    """One module of a stage, as the stage helper builds it: the ``kind`` structure over fresh
    Inception-residual units of ``width`` and ``branches`` (module ``{kind}`` inside the block)."""

    kind: str
    width: int
    branches: Branches
    scale: float = 1.0
    drop_path: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        make_unit = lambda: InceptionResidual(
            self.width, self.branches, parent=None, dtype=self.dtype, param_dtype=self.param_dtype
        )
        return poly_module(self.kind, make_unit, self.scale, self.drop_path, name=self.kind)(
            x, train
        )


class PolyNet(nn.Module):
    """A PolyNet from a stage table: (width, unit branches, module kinds, reduction after).
    Stage s's modules run through :class:`~jaxcnn.layers.stage.Stage` (module i is
    ``stage{s}/{i}/{kind}``); ``remat`` (True or a ``jax.checkpoint_policies`` name) recomputes
    their activations in the backward pass instead of storing them.

    The default table is the small CIFAR configuration of ``polynet_small_cifar``."""

    stages: Sequence[tuple] = (
        (64, UNIT_A, ('poly2', 'mpoly2', '2way'), REDUCTION_A),
        (128, UNIT_B, ('poly2', 'mpoly2', '2way'), REDUCTION_B),
        (256, UNIT_C, ('poly2', 'mpoly2', '2way'), None),
    )
    stem_width: int = 64
    final_width: int = 256
    residual_scale: float = 0.3
    num_classes: int = 10
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: Union[bool, str] = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_image_batch(x, 4, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        x = ConvBNReLU(self.stem_width, (3, 3), name='conv1', **kw)(x, train)
        tap(x, 'conv1')
        rates = drop_path_rates(self.drop_path_rate, sum(len(s[2]) for s in self.stages))
        m = 0
        for s, (width, unit, kinds, reduction) in enumerate(self.stages):
            if x.shape[-1] != width:
                raise ValueError(
                    f'stage {s + 1} is {width} wide but receives {x.shape[-1]} channels'
                )
            blocks = stage_blocks(
                PolyBlock,
                [
                    dict(
                        kind=kind,
                        width=width,
                        branches=unit,
                        scale=self.residual_scale,
                        drop_path=rates[m + i],
                        **kw,
                    )
                    for i, kind in enumerate(kinds)
                ],
            )
            x = Stage(blocks, remat=self.remat, name=f'stage{s + 1}')(x, train)
            m += len(kinds)
            if reduction is not None:
                tap(x, f'stage{s + 1}')  # the last stage's map feeds only final_conv
                x = Reduction(reduction, name=f'reduction{s + 1}', **kw)(x, train)
        # Inception-ResNet-v2's last layer before pooling: a 1x1 conv-BN-ReLU, so the classifier
        # sees normalised features rather than the raw residual stream
        x = ConvBNReLU(self.final_width, (1, 1), name='final_conv', **kw)(x, train)
        tap(x, 'final_conv')
        if features_only:
            return x
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


# The parameter count is the hand count of tests/test_polynet.py (module definitions of §3
# over the unit tables above), not a figure from the paper.
register(
    'polynet_small_cifar',
    PolyNet,
    {},
    family='polynet',
    input_size=(32, 32, 3),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    num_classes=10,
    min_input=8,
    reference='Zhang et al. 2017, §3 modules (small CIFAR configuration)',
    reference_params=516_714,
)
