"""Layer scale (Touvron et al. 2021, CaiT §3): a learned per-channel gain on a residual branch."""

import flax.linen as nn
import jax.numpy as jnp


class LayerScale(nn.Module):
    """y = gamma * x with one gamma per channel (last axis), initialised to ``init_value``.

    A small init (1e-6 in ConvNeXt) makes every residual block start close to the identity,
    which is what lets deep stacks of them train without warm-up tricks. The parameter is
    named ``gamma`` as timm names it, so converted weights need no rename.
    """

    init_value: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        gamma = self.param(
            'gamma', nn.initializers.constant(self.init_value), (x.shape[-1],), self.param_dtype
        )
        return x * gamma.astype(x.dtype)
