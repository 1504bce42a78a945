"""Conv -> BatchNorm -> activation as one unit: torchvision's ``BasicConv2d`` (GoogLeNet,
Inception-v3) and timm's ``ConvNormAct`` both name its parts ``conv`` and ``bn``, so weights
convert with no rename below the unit.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from .conv import conv2d, he_normal_fan_out
from .norm import batch_norm


class ConvBnAct(nn.Module):
    """``conv`` (no bias) -> ``bn`` -> ``act``; ``act=None`` leaves the BN output linear.

    ``kernel_size`` may be rectangular ((1, 7) for Inception's factorised convolutions);
    ``padding`` takes :func:`conv2d`'s forms ('torch' keeps the size at stride 1, 'valid' none).
    ``eps``: BatchNorm epsilon (1e-3 for torchvision's Inception nets, PyTorch's 1e-5 otherwise).
    """

    features: int
    kernel_size: Any = 1
    stride: int = 1
    padding: Any = 'torch'
    groups: int = 1
    eps: float = 1e-5
    act: Optional[Callable] = nn.relu
    kernel_init: Callable = he_normal_fan_out
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv2d(
            self.features,
            self.kernel_size,
            self.stride,
            padding=self.padding,
            groups=self.groups,
            kernel_init=self.kernel_init,
            name='conv',
            **kw,
        )(x)
        x = batch_norm(train, epsilon=self.eps, name='bn', **kw)(x)
        return x if self.act is None else self.act(x)
