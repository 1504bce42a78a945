"""Reversible couplings: backpropagation that rebuilds activations instead of storing them.

The additive coupling of Gomez et al. 2017 ("The Reversible Residual Network", eq. 1-2),
for two instances F and G of one branch module::

    y1 = x1 + F(x2)            x2 = y2 - G(y1)
    y2 = x2 + G(y1)            x1 = y1 - F(x2)

:class:`Coupling` is one such block, a module like any other: unrolled or scanned by
:class:`~jaxcnn.layers.stage.Stage` it trains with ordinary autodiff. With
``Stage(reversible=True)`` the stage's stacked couplings run through :func:`run_couplings`
instead: the same parameters, their gradient taken by a backward pass whose residuals are the
final outputs, the parameters and the per-block random keys only. It walks the blocks in reverse,
rebuilds each block's inputs from its outputs (Gomez et al. 2017, Algorithm 1) and returns the
stacked parameter gradients, so activation memory is that of one block, whatever the depth.
It is a :func:`jaxcnn.kernels.autodiff.linear` map, so forward mode (``jax.jvp``,
``jax.linearize``) and forward-over-reverse Hessian-vector products work through it too.

Randomness. Every block gets its own key, split once from the stage's 'dropout' stream; the
forward pass and the backward recomputation pass the very same key to the coupling (its
branches' ``nn.Dropout`` and its stochastic depth draw from it), so the recomputed function is
the function that was differentiated.

BatchNorm. The recomputation runs F and G in the same mode as the forward pass: in training
BN normalises with the statistics of the (reconstructed) batch, which equal the forward's up
to rounding, so the recomputed function is the forward's function. The running-average
update it produces is thrown away: only the forward pass's updated ``batch_stats`` leave the
stage, so the running statistics move once per step, exactly as with ordinary autodiff.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import kernels
from ..kernels.autodiff import linear
from .drop import DropPath


class Coupling(nn.Module):
    """One additive coupling (x1, x2) -> (y1, y2), its F and G two instances ``f`` and ``g`` of
    ``branch(**branch_fields)`` (any module called ``branch(x, train)``; F maps x2's shape to
    x1's, G x1's to x2's). ``drop_path``: stochastic depth on both branch outputs; the coupling
    stays exactly invertible, its mask a function of the key."""

    branch: Any
    branch_fields: tuple = ()
    drop_path: float = 0.0

    def setup(self):
        self.f = self.branch(**dict(self.branch_fields))
        self.g = self.branch(**dict(self.branch_fields))
        self.drop_f, self.drop_g = DropPath(self.drop_path), DropPath(self.drop_path)

    def residual_f(self, x2, train: bool = False):
        # the residual stream keeps its dtype whatever the branch computes in
        return self.drop_f(self.f(x2, train), train).astype(x2.dtype)

    def residual_g(self, y1, train: bool = False):
        return self.drop_g(self.g(y1, train), train).astype(y1.dtype)

    def __call__(self, x, train: bool = False):
        x1, x2 = x
        y1 = x1 + self.residual_f(x2, train)
        return y1, x2 + self.residual_g(y1, train)

    def inverse(self, y, train: bool = False):
        y1, y2 = y
        x2 = y2 - self.residual_g(y1, train)
        return y1 - self.residual_f(x2, train), x2


def _raw_key(key):
    """A legacy uint32 key: plain arrays cross differentiation boundaries without float0 fuss."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


class _Blocks:
    """The stacked couplings as pure functions of one block's variables, key and numbers."""

    def __init__(self, cls, static, train, stats):
        self.cls, self.static, self.train, self.stats = cls, dict(static), train, stats

    def variables(self, params, stats):
        return {'params': params, **({'batch_stats': stats} if self.stats else {})}

    def apply(self, params, stats, key, nums, x, method=None):
        """(output, updated batch_stats) of one block's ``method``."""
        out, state = self.cls(**self.static, **nums).apply(
            self.variables(params, stats),
            *x,
            self.train,
            method=method,
            rngs={'dropout': jax.random.wrap_key_data(key)},
            mutable=['batch_stats'],
        )
        return out, state.get('batch_stats', {})

    def forward(self, params, stats, keys, nums, x, unroll):
        def step(h, xs):
            p, s, key, num = xs
            h, new = self.apply(p, s, key, num, (h,))
            return h, new

        with kernels.loop_body():
            return jax.lax.scan(step, x, (params, stats, keys, nums), unroll=unroll)

    def inverse(self, params, stats, keys, nums, y, unroll):
        def step(h, xs):
            p, s, key, num = xs
            return self.apply(p, s, key, num, (h,), method=self.cls.inverse)[0], None

        with kernels.loop_body():
            return jax.lax.scan(step, y, (params, stats, keys, nums), reverse=True, unroll=unroll)[
                0
            ]

    def backward(self, params, stats, keys, nums, y, dy, unroll):
        """(parameter cotangents, input cotangents) from the outputs: each block's inputs are
        rebuilt and its branches differentiated, G first, then F."""

        def step(carry, xs):
            (y1, y2), (dy1, dy2) = carry
            p, s, key, num = xs
            g = lambda q, z: self.apply(q, s, key, num, (z,), self.cls.residual_g)[0]
            f = lambda q, z: self.apply(q, s, key, num, (z,), self.cls.residual_f)[0]
            gy, g_vjp = jax.vjp(g, p, y1)  # rebuild x2 = y2 - G(y1), pull dy2 back
            x2 = y2 - gy
            dpg, dz = g_vjp(dy2)
            dz = dy1 + dz  # the whole cotangent of y1 (= of x1)
            fx, f_vjp = jax.vjp(f, p, x2)  # rebuild x1 = y1 - F(x2), pull dz back
            dpf, dx2 = f_vjp(dz)
            return ((y1 - fx, x2), (dz, dy2 + dx2)), jax.tree.map(jnp.add, dpf, dpg)

        with kernels.loop_body():
            (_, dx), dparams = jax.lax.scan(
                step, (y, dy), (params, stats, keys, nums), reverse=True, unroll=unroll
            )
        return dparams, dx


def run_couplings(
    cls, static, variables, nums, x, train, rng=None, inverse=False, recompute=True, unroll=1
):
    """The stacked couplings ``cls(**static, **nums[b])`` on ``x = (x1, x2)``: ``variables``
    holds their stacked 'params' (and 'batch_stats'), ``nums`` the per-block numbers, ``rng``
    the key their randomness comes from (None: no randomness). Returns (y, the stacked updated
    batch_stats). ``recompute=False`` takes ordinary autodiff of the same scan (the same keys),
    for comparison; ``inverse=True`` maps outputs back to inputs."""
    params, stats = variables['params'], variables.get('batch_stats', {})
    n = jax.tree.leaves(params)[0].shape[0]
    keys = (
        _raw_key(jax.random.split(rng, n))
        if rng is not None
        else _raw_key(jax.random.split(jax.random.key(0), n))
    )
    blocks = _Blocks(cls, static, train, bool(stats))
    if inverse:
        return blocks.inverse(params, stats, keys, nums, x, unroll), stats
    if not recompute:
        return blocks.forward(params, stats, keys, nums, x, unroll)

    @jax.custom_jvp
    def run(params, x, stats, keys, nums):
        return blocks.forward(params, stats, keys, nums, x, unroll)

    def tangent(res, t):  # the outputs' tangent, linear in the (params, inputs) tangent
        p, s, k, m, y = res
        x = blocks.inverse(p, s, k, m, y, unroll)
        return jax.jvp(lambda p, x: blocks.forward(p, s, k, m, x, unroll)[0], (p, x), t)[1]

    def transpose(res, ct):  # its transpose: the reversible backward pass
        p, s, k, m, y = res
        return blocks.backward(p, s, k, m, y, ct, unroll)

    @run.defjvp
    def run_jvp(primals, tangents):
        params, x, stats, keys, nums = primals
        y, new_stats = run(*primals)
        # the residuals are the outputs, parameters, statistics, keys and numbers, no activations;
        # the statistics, keys and numbers are not differentiated
        dy = linear(tangent, transpose, (params, stats, keys, nums, y), tangents[:2])
        return (y, new_stats), (dy, jax.tree.map(jnp.zeros_like, new_stats))

    return run(params, x, stats, keys, nums)


def space_to_depth(x, block: int = 2):
    """Invertible downsampling (Jacobsen et al. 2018, §3.1): each block x block patch -> channels."""
    n, h, w, c = x.shape
    if h % block or w % block:
        raise ValueError(f'space_to_depth needs H and W divisible by {block}, got {h}x{w}')
    x = x.reshape(n, h // block, block, w // block, block, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // block, w // block, block * block * c)


def depth_to_space(x, block: int = 2):
    """The exact inverse of :func:`space_to_depth`."""
    n, h, w, c = x.shape
    c_out = c // (block * block)
    x = x.reshape(n, h, w, block, block, c_out)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * block, w * block, c_out)
