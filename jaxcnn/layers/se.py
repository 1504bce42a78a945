"""Squeeze-and-Excitation (Hu et al. 2018), one implementation for every family."""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from .activations import get_act
from .conv import make_divisible


class SqueezeExcite(nn.Module):
    """squeeze = global average, excitation = FC(C/r) - act - FC(C) - gate, then rescale.

    The two FCs are 1x1 convolutions with bias (``fc1``/``fc2``), as timm stores them.
    ``rd_channels`` overrides the reduced width; otherwise C * rd_ratio is rounded to a
    multiple of ``rd_divisor`` (timm's rule; rd_divisor=1 gives plain C/r).
    """

    rd_ratio: float = 1 / 16
    rd_channels: Optional[int] = None
    rd_divisor: int = 8
    act: str = 'relu'
    gate: str = 'sigmoid'
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        rd = self.rd_channels or make_divisible(c * self.rd_ratio, self.rd_divisor, round_limit=0.0)
        s = jnp.mean(
            x, axis=(1, 2), keepdims=True, dtype=jnp.promote_types(x.dtype, jnp.float32)
        ).astype(x.dtype)
        kw = dict(kernel_size=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype)
        s = nn.Conv(rd, name='fc1', **kw)(s)
        s = get_act(self.act)(s)
        s = nn.Conv(c, name='fc2', **kw)(s)
        return x * get_act(self.gate)(s)
