"""Normalisation layers behind one factory, so every family can switch norm by name."""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp


class LocalResponseNorm(nn.Module):
    """Local Response Normalisation across channels (Krizhevsky et al. 2012, §3.3).

    b = a / (k + alpha / n * sum_{neighbours} a^2) ** beta, with the PyTorch convention
    of dividing alpha by the window size n (torch.nn.LocalResponseNorm).
    """

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        sq = jnp.square(x.astype(jnp.float32))
        pad = ((0, 0),) * (x.ndim - 1) + ((self.size // 2, (self.size - 1) // 2),)
        sq = jnp.pad(sq, pad)
        c = x.shape[-1]
        window = sum(sq[..., i : i + c] for i in range(self.size))
        div = (self.k + self.alpha / self.size * window) ** self.beta
        return (x.astype(jnp.float32) / div).astype(x.dtype)


class Norm(nn.Module):
    """Normalisation by name: 'batch', 'layer', 'group', 'instance', 'lrn' or 'none'.

    BatchNorm follows PyTorch's defaults (momentum 0.1 there = 0.9 decay here, eps 1e-5) so
    converted statistics mean the same thing; its running statistics live in ``batch_stats``.
    """

    kind: str = 'batch'
    epsilon: Optional[float] = None
    momentum: float = 0.9
    num_groups: int = 32
    scale_init: nn.initializers.Initializer = nn.initializers.ones
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = self.epsilon
        if self.kind == 'batch':
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=self.momentum,
                epsilon=1e-5 if eps is None else eps,
                scale_init=self.scale_init,
                name='bn',
                **common,
            )(x)
        if self.kind == 'layer':
            return nn.LayerNorm(
                epsilon=1e-6 if eps is None else eps,
                scale_init=self.scale_init,
                name='ln',
                **common,
            )(x)
        if self.kind == 'group':
            return nn.GroupNorm(
                num_groups=self.num_groups,
                epsilon=1e-5 if eps is None else eps,
                scale_init=self.scale_init,
                name='gn',
                **common,
            )(x)
        if self.kind == 'instance':
            # InstanceNorm = GroupNorm with one channel per group.
            return nn.GroupNorm(
                num_groups=None,
                group_size=1,
                epsilon=1e-5 if eps is None else eps,
                scale_init=self.scale_init,
                name='in',
                **common,
            )(x)
        if self.kind == 'lrn':
            return LocalResponseNorm(name='lrn')(x)
        if self.kind == 'none':
            return x
        raise ValueError(
            f"unknown norm {self.kind!r}; choose 'batch', 'layer', 'group', "
            "'instance', 'lrn' or 'none'"
        )


def batch_norm(
    train: bool,
    *,
    name=None,
    dtype=None,
    param_dtype=jnp.float32,
    zero_init: bool = False,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
):
    """A BatchNorm configured like PyTorch's, called directly in compact modules.

    Kept flat (not wrapped in :class:`Norm`) where a family converts weights from PyTorch,
    so parameter paths mirror the reference's module names.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
    )
