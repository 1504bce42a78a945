"""The classifier head: global pool, dropout, Dense named ``fc`` (params['head']['fc'])."""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from .conv import global_avg_pool


class ClassifierHead(nn.Module):
    """Pool -> dropout -> linear. ``num_classes=0`` returns the pooled features."""

    num_classes: int
    drop_rate: float = 0.0
    pool: str = 'avg'
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim == 4:
            if self.pool == 'avg':
                x = global_avg_pool(x)
            elif self.pool == 'max':
                x = jnp.max(x, axis=(1, 2))
            elif self.pool == 'flatten':
                x = x.reshape(x.shape[0], -1)
            else:
                raise ValueError(f"pool must be 'avg', 'max' or 'flatten', got {self.pool!r}")
        if self.num_classes == 0:
            return x
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        return nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            name='fc',
        )(x)
