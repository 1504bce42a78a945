"""Network in Network for CIFAR-10 (Lin, Chen & Yan 2014, §3 and §4.2).

An mlpconv layer is a spatial convolution followed by a micro-MLP shared across positions,
i.e. 1x1 convolutions, every layer ReLU-activated (eq. 2). Three mlpconv layers; the last
produces one map per class, and global average pooling of those maps gives the logits -- no
fully connected classifier (§3.2). Widths, kernels and the pools between mlpconv layers (3x3/2
max, then 3x3/2 average, rounded up as Caffe does: 32 -> 16 -> 8) follow the authors' released
CIFAR-10 model; dropout 0.5 follows the first two mlpconv layers (§4.1).

The class-map layer is the head: a Dense applied per pixel (= 1x1 convolution) named
``head/fc``, then ReLU (eq. 2) and the global average.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ..layers import (
    avg_pool,
    batch_norm,
    ceil_max_pool,
    ceil_mode_padding,
    check_image_batch,
    conv2d,
    global_avg_pool,
    tap,
)
from ..registry import CIFAR10_MEAN, CIFAR10_STD, register

# (spatial conv width, kernel, micro-MLP widths, pool after); the last block's final 1x1 layer
# (num_classes maps) is the head.
NIN_CIFAR = ((192, 5, (160, 96), 'max'), (192, 5, (192, 192), 'avg'), (192, 3, (192,), None))


class MlpConv(nn.Module):
    """``use_bn``: BatchNorm between each convolution and its ReLU (not in the paper)."""

    width: int
    kernel: int
    mlp: Sequence[int]
    use_bn: bool = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(use_bias=not self.use_bn, dtype=self.dtype, param_dtype=self.param_dtype)
        layers = [('conv', self.width, self.kernel)] + [
            (f'cccp{j + 1}', w, 1) for j, w in enumerate(self.mlp)
        ]
        for name, width, kernel in layers:
            x = conv2d(width, kernel, name=name, **kw)(x)
            if self.use_bn:
                x = batch_norm(
                    train, name=f'{name}_bn', dtype=self.dtype, param_dtype=self.param_dtype
                )(x)
            x = nn.relu(x)
        return x


class ClassMapHead(nn.Module):
    """One ReLU map per class from a per-pixel linear layer, globally averaged.
    ``num_classes=0`` returns the globally averaged input features."""

    num_classes: int
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.num_classes:
            x = nn.relu(
                nn.Dense(
                    self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name='fc'
                )(x)
            )
        return global_avg_pool(x)


class NiN(nn.Module):
    """``use_bn`` adds BatchNorm inside the mlpconv layers, a later variant that trains in
    a few hundred steps where the paper's network (no normalisation) needs thousands."""

    blocks: Sequence[tuple] = NIN_CIFAR
    use_bn: bool = False
    num_classes: int = 10
    drop_rate: float = 0.5
    drop_path_rate: float = 0.0  # no residual blocks to drop; accepted for a uniform surface
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_image_batch(x, 8, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        for b, (width, kernel, mlp, pool) in enumerate(self.blocks):
            x = MlpConv(width, kernel, tuple(mlp), self.use_bn, name=f'mlpconv{b + 1}', **kw)(
                x, train
            )
            tap(x, f'mlpconv{b + 1}')  # before its pool
            if pool == 'max':
                x = ceil_max_pool(x, 3, 2)
            elif pool == 'avg':
                # Caffe's ceil-mode average: a clipped last window averages what it covers
                pads = tuple(ceil_mode_padding(s, 3, 2) for s in x.shape[1:3])
                x = avg_pool(x, 3, 2, pads, count_include_pad=False)
            if pool:
                x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        if features_only:
            return x
        return ClassMapHead(self.num_classes, name='head', **kw)(x)


# Weights + biases of the released layout (tests/test_classic.py recounts it from the layer
# formula): 14,592 + 30,880 + 15,456 | 460,992 + 37,056 + 37,056 | 331,968 + 37,056 + 1,930.
register(
    'nin_cifar',
    NiN,
    family='nin',
    input_size=(32, 32, 3),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    num_classes=10,
    min_input=8,
    reference='Lin et al. 2014, Network In Network, §3-4 (CIFAR-10: three mlpconv layers '
    '192-160-96 / 192-192-192 / 192-192-10 + global average pooling; hand count)',
    reference_params=966_986,
)
