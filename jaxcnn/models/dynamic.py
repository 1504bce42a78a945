"""CIFAR networks whose convolution weights depend on the input.

* :class:`CondConvResNet` - CIFAR ResNet (He et al. 2016 §4.2, option A shortcuts) whose 3x3
  block convolutions are CondConv layers (Yang et al. 2019): each conv mixes ``num_experts``
  expert kernels with its own routing weights r(x) = sigmoid(FC(GAP(x))) computed from its
  input (eq. 1-2). The stem stays an ordinary conv (its 3-channel input gives a weak routing
  signal). ``condconv_resnet20``: ResNet-20 with 4 experts.
* :class:`DynamicFilterNet` - a small CIFAR net built on the two layers of Dynamic Filter
  Networks (Jia, De Brabandere et al. 2016): in every stage a residual dynamic-convolution
  block (one 3x3 kernel per sample from a filter-generating network, §3.2) and a residual
  dynamic-local-filtering block (one 3x3 filter per pixel, then a 1x1 conv, §3.2).
  ``dynconv_cifar``: widths 16/32/64.

The CIFAR ResNet of :mod:`jaxcnn.models.resnet` builds its convolutions directly (no conv
factory field), so these blocks are written here rather than by reusing ``ResidualBlock``.
Both models are counted by hand in ``tests/test_dynamic.py``. Their residual blocks run through
:class:`~jaxcnn.layers.stage.Stage` (``layer{s}/{b}``; ``stage{s}/0`` and ``stage{s}/1``), whose
``remat`` recomputes each block's activations in the backward pass.
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
from ..layers.dynamic import CondConv, DynamicConv, DynamicLocalFilter
from ..layers.stage import Stage, stage_blocks
from ..registry import CIFAR10_MEAN, CIFAR10_STD, register
from .hypernet import zero_pad_shortcut


class CondConvBlock(nn.Module):
    """Post-activation basic block (conv-BN-ReLU-conv-BN, + shortcut, ReLU) with CondConv 3x3s."""

    features: int
    stride: int = 1
    num_experts: int = 4
    drop_path: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shortcut = zero_pad_shortcut(x, self.features, self.stride)
        h = CondConv(
            self.features, 3, self.stride, num_experts=self.num_experts, name='conv1', **kw
        )(x)
        h = nn.relu(batch_norm(train, name='bn1', **kw)(h))
        h = CondConv(self.features, 3, 1, num_experts=self.num_experts, name='conv2', **kw)(h)
        h = batch_norm(train, name='bn2', **kw)(h)
        return nn.relu(DropPath(self.drop_path)(h, train) + shortcut)


class CondConvResNet(nn.Module):
    """CIFAR ResNet-(6n+2) with CondConv block convolutions (per-layer routing); block b of
    stage s (from 1) is ``layer{s}/{b}``. ``remat``: True or a ``jax.checkpoint_policies`` name."""

    layers: Sequence[int] = (3, 3, 3)
    widths: Sequence[int] = (16, 32, 64)
    stem_width: int = 16
    num_experts: int = 4
    num_classes: int = 10
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: Union[bool, str] = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_image_batch(x, 8, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        x = nn.relu(
            batch_norm(train, name='bn1', **kw)(conv2d(self.stem_width, 3, name='conv1', **kw)(x))
        )
        tap(x, 'bn1')
        rates = iter(drop_path_rates(self.drop_path_rate, sum(self.layers)))
        for s, (n, width) in enumerate(zip(self.layers, self.widths)):
            blocks = stage_blocks(
                CondConvBlock,
                [
                    dict(
                        features=width,
                        stride=2 if (s > 0 and b == 0) else 1,
                        num_experts=self.num_experts,
                        drop_path=next(rates),
                        **kw,
                    )
                    for b in range(n)
                ],
            )
            x = Stage(blocks, remat=self.remat, name=f'layer{s + 1}')(x, train)
            tap(x, f'layer{s + 1}')
        if features_only:
            return x
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


class DynamicConvBlock(nn.Module):
    """x + BN(DynamicConv(w, 3x3)(x)), ReLU: a residual block with a per-sample kernel."""

    features: int
    hidden: int = 16
    drop_path: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = DynamicConv(self.features, 3, hidden=self.hidden, name='dynconv', **kw)(x)
        h = batch_norm(train, name='dynconv_bn', **kw)(h)
        return nn.relu(x + DropPath(self.drop_path)(h, train))


class LocalFilterBlock(nn.Module):
    """x + BN(DynamicLocalFilter(k, features=w)(x)), ReLU: a residual block with a per-pixel
    filter (then a 1x1 conv)."""

    features: int
    kernel_size: int = 3
    hidden: int = 16
    per_channel: bool = False
    drop_path: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = DynamicLocalFilter(
            self.kernel_size,
            self.features,
            self.hidden,
            per_channel=self.per_channel,
            name='local',
            **kw,
        )(x)
        h = batch_norm(train, name='local_bn', **kw)(h)
        return nn.relu(x + DropPath(self.drop_path)(h, train))


class DynamicFilterNet(nn.Module):
    """Stage s: [stem 3x3 conv | 3x3/2 conv] - BN - ReLU, then two residual blocks
    (``stage{s}/0`` and ``stage{s}/1``, from s = 1):

      dynamic conv:   x + BN(DynamicConv(w, 3x3)(x)), ReLU          (per-sample kernel)
      local filter:   x + BN(DynamicLocalFilter(3, features=w)(x)), ReLU   (per-pixel filter + 1x1)

    ``hidden``: width of the dynamic conv's filter-generating MLP; ``local_hidden``: of the local
    filter's 3x3 generating conv. ``per_channel``: one local filter per channel (K*K*C taps).
    ``remat``: recompute each block's activations in the backward pass (True or a
    ``jax.checkpoint_policies`` name).
    """

    widths: Sequence[int] = (16, 32, 64)
    hidden: int = 16
    local_kernel: int = 3
    local_hidden: int = 16
    per_channel: bool = False
    num_classes: int = 10
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: Union[bool, str] = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_image_batch(x, 8, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        rates = drop_path_rates(self.drop_path_rate, 2 * len(self.widths))
        for s, w in enumerate(self.widths):
            name = 'stem' if s == 0 else f'down{s}'
            x = conv2d(w, 3, 1 if s == 0 else 2, name=f'{name}_conv', **kw)(x)
            x = nn.relu(batch_norm(train, name=f'{name}_bn', **kw)(x))
            if s == 0:
                tap(x, 'stem_bn')
            blocks = stage_blocks(
                DynamicConvBlock,
                [dict(features=w, hidden=self.hidden, drop_path=rates[2 * s], **kw)],
            ) + stage_blocks(
                LocalFilterBlock,
                [
                    dict(
                        features=w,
                        kernel_size=self.local_kernel,
                        hidden=self.local_hidden,
                        per_channel=self.per_channel,
                        drop_path=rates[2 * s + 1],
                        **kw,
                    )
                ],
            )
            x = Stage(blocks, remat=self.remat, name=f'stage{s + 1}')(x, train)
            tap(x, f'stage{s + 1}')  # before the next stage's stride-2 conv
        if features_only:
            return x
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


_CIFAR = dict(
    input_size=(32, 32, 3), mean=CIFAR10_MEAN, std=CIFAR10_STD, num_classes=10, min_input=8
)

# Hand counts (tests/test_dynamic.py): ResNet-20's 18 block convs as 4-expert CondConv layers
# (4 x 267,264 kernel weights + 4 x (C_in + 1) routing weights each), stem, BN and head as ResNet-20.
register(
    'condconv_resnet20',
    CondConvResNet,
    dict(layers=(3, 3, 3), num_experts=4),
    family='condconv',
    reference='hand count from Yang et al. 2019 (CondConv) eq. (1)-(2) '
    'applied to ResNet-20 (He et al. 2016 §4.2), 4 experts',
    reference_params=1_074_082,
    **_CIFAR,
)
register(
    'dynconv_cifar',
    DynamicFilterNet,
    dict(widths=(16, 32, 64)),
    family='dynamic_filter',
    reference='hand count from Jia, De Brabandere et al. 2016 (Dynamic '
    'Filter Networks) §3.1-3.2 filter-generating networks on this 3-stage net',
    reference_params=871_173,
    **_CIFAR,
)
