"""The activation zoo of the lectures, looked up by name so a model can take ``act='silu'``."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

# SELU constants from Klambauer et al. 2017, eq. (14): the fixed point of mean 0 / variance 1.
SELU_LAMBDA = 1.0507009873554805
SELU_ALPHA = 1.6732632423543772


def relu6(x):
    return jnp.clip(x, 0, 6)


def hard_sigmoid(x):
    """MobileNetV3's ReLU6(x + 3) / 6."""
    return relu6(x + 3.0) / 6.0


def hard_swish(x):
    """MobileNetV3's x * ReLU6(x + 3) / 6."""
    return x * hard_sigmoid(x)


def selu(x):
    return SELU_LAMBDA * jnp.where(x > 0, x, SELU_ALPHA * jnp.expm1(jnp.minimum(x, 0)))


def gelu(x):
    """Exact (erf) GELU, as torch.nn.GELU() computes by default."""
    return jax.nn.gelu(x, approximate=False)


def mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


def maxout(x, pieces: int = 2):
    """Maxout over groups of ``pieces`` consecutive channels (Goodfellow et al. 2013)."""
    c = x.shape[-1]
    if c % pieces:
        raise ValueError(f'maxout needs channels ({c}) divisible by pieces ({pieces})')
    return x.reshape(*x.shape[:-1], c // pieces, pieces).max(axis=-1)


class PReLU(nn.Module):
    """Parametric ReLU with one learned slope per channel (He et al. 2015)."""

    init_slope: float = 0.25
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        a = self.param(
            'slope', nn.initializers.constant(self.init_slope), (x.shape[-1],), self.param_dtype
        )
        return jnp.where(x >= 0, x, a.astype(x.dtype) * x)


ACTIVATIONS = {
    'relu': nn.relu,
    'relu6': relu6,
    'leaky_relu': functools.partial(nn.leaky_relu, negative_slope=0.01),
    'elu': nn.elu,
    'selu': selu,
    'sigmoid': nn.sigmoid,
    'tanh': jnp.tanh,
    'swish': nn.silu,
    'silu': nn.silu,
    'hard_swish': hard_swish,
    'hard_sigmoid': hard_sigmoid,
    'gelu': gelu,
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'mish': mish,
    'maxout': maxout,
    'identity': lambda x: x,
}


def get_act(name):
    """Activation function by name (a callable is returned unchanged)."""
    if callable(name):
        return name
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f'unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)} '
            "(use layers.PReLU as a module for 'prelu')"
        ) from None
