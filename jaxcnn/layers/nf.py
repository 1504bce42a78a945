"""Normaliser-free building blocks (Brock et al. 2021a, arXiv:2101.08692; 2021b, arXiv:2102.06171).

* :class:`ScaledStdConv` -- Scaled Weight Standardisation: each output unit's kernel is
  standardised over its fan-in (H, W, C_in), scaled by ``gamma / sqrt(fan_in)`` and a learned
  per-output-channel ``gain``, so a unit-variance input gives a unit-variance output at any width.
* :func:`activation_gamma` / :func:`gamma_act` -- the constant gamma that brings an activation's
  output back to unit variance when its input is N(0, 1).

How the gammas are computed
---------------------------
For z ~ N(0, 1), gamma_g = 1 / sqrt(Var[g(z)]) with Var[g(z)] = E[g(z)^2] - E[g(z)]^2. Both
expectations are integrals of g against the standard normal density phi; we evaluate them with
composite Simpson's rule on [-12, 12] with step 1e-4 (z = 0 is a node, so the kink of ReLU-like
functions sits on a grid point and costs no accuracy; the tails beyond |z| = 12 weigh < 1e-32).
The activation itself is evaluated in float64 NumPy for the closed-form ones (ReLU, exact GELU,
SiLU, tanh, ...), so the results are exact to ~1e-10; ``ReLU`` even has the closed form
Var = 1/2 - 1/(2 pi), gamma = 1.712859...

DeepMind's published constants (``DEEPMIND_GAMMA``, copied from the NFNet reference code) were
estimated by Monte Carlo sampling and differ from the exact values in the 4th digit (ReLU:
1.713959 published vs 1.712859 exact). Pretrained NFNet weights were trained with the published
numbers, so models that must reproduce them (the registered ``nfnet_f*`` / ``nf_resnet50``)
take ``gamma_source='deepmind'``; ``'computed'`` gives the exact values.
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .activations import get_act
from ..kernels import conv_general_dilated
from .conv import resolve_padding

# The NFNet reference code's constants (deepmind-research/nfnets/base.py), Monte Carlo estimates;
# used only where converted weights must give the reference's logits.
DEEPMIND_GAMMA = {
    'identity': 1.0,
    'relu': 1.7139588594436646,
    'gelu': 1.7015043497085571,
    'silu': 1.7881293296813965,
    'swish': 1.7881293296813965,
    'elu': 1.2716004848480225,
    'selu': 1.0008515119552612,
    'tanh': 1.5939117670059204,
    'sigmoid': 4.803835391998291,
    'relu6': 1.7131484746932983,
    'leaky_relu': 1.70590341091156,
}

# float64 NumPy versions of the activations (the jax ones run in float32).
_erf = np.vectorize(math.erf, otypes=[np.float64])
_NUMPY_ACTS = {
    'identity': lambda z: z,
    'relu': lambda z: np.maximum(z, 0.0),
    'relu6': lambda z: np.clip(z, 0.0, 6.0),
    'leaky_relu': lambda z: np.where(z > 0, z, 0.01 * z),
    'gelu': lambda z: 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0))),
    'gelu_tanh': lambda z: (
        0.5 * z * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    ),
    'silu': lambda z: z / (1.0 + np.exp(-z)),
    'swish': lambda z: z / (1.0 + np.exp(-z)),
    'sigmoid': lambda z: 1.0 / (1.0 + np.exp(-z)),
    'tanh': np.tanh,
    'elu': lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0.0))),
}


def normal_moments(fn, half_width: float = 12.0, step: float = 1e-4):
    """(E[fn(z)], E[fn(z)^2]) for z ~ N(0, 1) by composite Simpson's rule on a grid through 0."""
    n = int(round(half_width / step))
    z = np.linspace(-half_width, half_width, 2 * n + 1)  # 2n intervals, z[n] == 0
    w = np.ones_like(z)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    w *= step / 3.0 * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    y = np.asarray(fn(z), np.float64)
    return float(np.sum(w * y)), float(np.sum(w * y * y))


@functools.lru_cache(maxsize=None)
def computed_gamma(act: str) -> float:
    """1 / sqrt(Var[act(z)]), z ~ N(0, 1), integrated numerically (see the module docstring).

    Activations without a float64 NumPy form are evaluated through :func:`get_act` in float32.
    """
    fn = _NUMPY_ACTS.get(act)
    if fn is None:
        jfn = get_act(act)
        fn = lambda z: np.asarray(jfn(jnp.asarray(z, jnp.float32)), np.float64)  # noqa: E731
    m1, m2 = normal_moments(fn)
    return 1.0 / math.sqrt(m2 - m1 * m1)


def activation_gamma(act: str, source: str = 'computed') -> float:
    """The variance-preserving gain of ``act``: 'computed' (exact) or 'deepmind' (published)."""
    if source == 'computed':
        return computed_gamma(act)
    if source == 'deepmind':
        if act not in DEEPMIND_GAMMA:
            raise ValueError(f'no published gamma for {act!r}; use gamma_source="computed"')
        return DEEPMIND_GAMMA[act]
    raise ValueError(f"gamma source must be 'computed' or 'deepmind', got {source!r}")


def gamma_act(act: str, gamma: float):
    """``x -> act(x) * gamma`` (gamma 1 returns the plain activation)."""
    fn = get_act(act)
    if gamma == 1.0:
        return fn
    return lambda x: fn(x) * jnp.asarray(gamma, x.dtype)


class ScaledStdConv(nn.Module):
    """Conv2d with Scaled Weight Standardisation (NHWC input, HWIO ``kernel``).

    W_hat = gain * gamma * (W - mean(W)) / sqrt(fan_in * var(W)), statistics per output unit
    over (H, W, C_in/groups). ``eps`` regularises the variance:
      * ``eps_mode='add'``: divide by sqrt(fan_in) * sqrt(var + eps), timm's ``ScaledStdConv2d``
        (the dm_nfnet ports use eps = 1e-5), which the registered models follow so converted
        weights reproduce timm's logits;
      * ``eps_mode='max'``: multiply by rsqrt(max(fan_in * var, eps)), the DeepMind reference
        (eps = 1e-4).
    ``gamma`` folds an activation gain into the weights (timm's nf_resnet layout); it is 1 when
    the activations carry it themselves. ``gain`` starts at ``gain_init`` (0 zero-inits a branch).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Any = 'torch'
    groups: int = 1
    use_bias: bool = True
    gamma: float = 1.0
    eps: float = 1e-5
    eps_mode: str = 'add'
    gain_init: float = 1.0
    kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
        1.0, 'fan_in', 'normal'
    )
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    def standardized_kernel(self, kernel, gain):
        k = kernel.astype(jnp.float32)
        fan_in = int(np.prod(k.shape[:-1]))
        mean = jnp.mean(k, axis=(0, 1, 2), keepdims=True)
        var = jnp.var(k, axis=(0, 1, 2), keepdims=True)
        if self.eps_mode == 'add':
            scale = jax.lax.rsqrt(var + self.eps) * (self.gamma / math.sqrt(fan_in))
        elif self.eps_mode == 'max':
            scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, self.eps)) * self.gamma
        else:
            raise ValueError(f"eps_mode must be 'add' or 'max', got {self.eps_mode!r}")
        return (k - mean) * (scale * gain.astype(jnp.float32))

    @nn.compact
    def __call__(self, x):
        in_ch = x.shape[-1]
        if in_ch % self.groups:
            raise ValueError(f'{in_ch} input channels do not split into {self.groups} groups')
        ks = (self.kernel_size, self.kernel_size)
        kernel = self.param(
            'kernel', self.kernel_init, (*ks, in_ch // self.groups, self.features), self.param_dtype
        )
        gain = self.param(
            'gain', nn.initializers.constant(self.gain_init), (self.features,), self.param_dtype
        )
        dtype = self.dtype or jnp.float32
        w = self.standardized_kernel(kernel, gain).astype(dtype)
        y = conv_general_dilated(
            x.astype(dtype),
            w,
            (self.stride, self.stride),
            resolve_padding(self.padding, self.kernel_size),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            feature_group_count=self.groups,
        )
        if self.use_bias:
            bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y
