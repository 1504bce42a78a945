"""Reversible couplings: backpropagation that rebuilds activations instead of storing them.

The additive coupling of Gomez et al. 2017 ("The Reversible Residual Network", eq. 1-2),
for any two Flax modules F and G with signature ``module(x, train)``::

    y1 = x1 + F(x2)            x2 = y2 - G(y1)
    y2 = x2 + G(y1)            x1 = y1 - F(x2)

:class:`ReversibleSequence` stacks ``num_blocks`` such couplings (parameters stacked on a
leading axis and run through ``lax.scan``, so compile time does not grow with depth). Its
gradient is a ``jax.custom_vjp`` whose residuals are the final outputs, the parameters and
the per-block random keys only; the backward pass walks the blocks in reverse, rebuilds each
block's inputs from its outputs (Gomez et al. 2017, Algorithm 1) and returns the stacked
parameter gradients. Activation memory is therefore that of one block, whatever the depth.

Randomness. Every block gets its own key, split once from the module's 'dropout' stream; the
forward pass and the backward recomputation pass the very same key to F and G (their inner
``nn.Dropout``/``DropPath`` draw from it) and to the coupling's own stochastic depth, so the
recomputed function is the function that was differentiated.

BatchNorm. The recomputation runs F and G in the same mode as the forward pass: in training
BN normalises with the statistics of the (reconstructed) batch, which equal the forward's up
to rounding, so the recomputed function is the forward's function. The running-average
update it produces is thrown away: only the forward pass's updated ``batch_stats`` leave the
module, so the running statistics move once per step, exactly as with ordinary autodiff.

``reversible=False`` runs the same scan under ordinary autodiff (activations stored), for
comparison and as a fallback.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .conv import loop_body


def _raw_key(key):
    """A legacy uint32 key: plain arrays cross custom_vjp boundaries without float0 fuss."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def drop_path_mask(x, key, rate):
    """Per-sample stochastic depth (Huang et al. 2016) with inverted scaling; ``rate`` may be traced."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class _Coupling:
    """The pure functions of one coupling, given the two (unbound) modules and the mode.

    Block variables are dicts ``{'params': ..., 'batch_stats': ...}`` (no batch_stats key when
    the branch has none); ``key`` is a raw uint32 key, ``rate`` the block's stochastic-depth rate.
    """

    def __init__(self, f: nn.Module, g: nn.Module, train: bool, use_drop_path: bool):
        self.f, self.g, self.train, self.use_drop_path = f, g, train, use_drop_path

    def branch(self, module, params, stats, x, key, rate):
        """module(x) with the given key; returns (output, updated batch_stats)."""
        inner_key, path_key = jax.random.split(key)
        variables = {'params': params, **({'batch_stats': stats} if stats else {})}
        out, state = module.apply(variables, x, self.train, rngs={'dropout': inner_key},
                                  mutable=['batch_stats'])
        if self.use_drop_path and self.train:
            out = drop_path_mask(out, path_key, rate)
        # the residual stream keeps its dtype whatever the branch computes in
        return out.astype(x.dtype), state.get('batch_stats', {})

    def forward(self, v, key, rate, x1, x2):
        kf, kg = jax.random.split(key)
        fx, sf = self.branch(self.f, v['f']['params'], v['f'].get('batch_stats'), x2, kf, rate)
        y1 = x1 + fx
        gy, sg = self.branch(self.g, v['g']['params'], v['g'].get('batch_stats'), y1, kg, rate)
        y2 = x2 + gy
        return y1, y2, {'f': sf, 'g': sg}

    def inverse(self, v, key, rate, y1, y2):
        kf, kg = jax.random.split(key)
        gy, _ = self.branch(self.g, v['g']['params'], v['g'].get('batch_stats'), y1, kg, rate)
        x2 = y2 - gy
        fx, _ = self.branch(self.f, v['f']['params'], v['f'].get('batch_stats'), x2, kf, rate)
        return y1 - fx, x2


def _scan_forward(coupling, variables, keys, rates, x1, x2, unroll=1):
    """All blocks in order under ordinary autodiff; returns (y1, y2, stacked new batch_stats)."""
    def step(carry, xs):
        v, key, rate = xs
        y1, y2, stats = coupling.forward(v, key, rate, *carry)
        return (y1, y2), stats
    with loop_body():
        (y1, y2), stats = jax.lax.scan(step, (x1, x2), (variables, keys, rates), unroll=unroll)
    return y1, y2, stats


def _scan_inverse(coupling, variables, keys, rates, y1, y2, unroll=1):
    def step(carry, xs):
        v, key, rate = xs
        return coupling.inverse(v, key, rate, *carry), None
    with loop_body():
        (x1, x2), _ = jax.lax.scan(step, (y1, y2), (variables, keys, rates), reverse=True,
                                   unroll=unroll)
    return x1, x2


def reversible_scan(coupling, variables, keys, rates, x1, x2, unroll=1):
    """The blocks' forward pass with the memory-free custom VJP (see the module docstring).

    ``variables`` holds the blocks' stacked params and batch_stats; gradients flow to the
    params and to (x1, x2). Returns (y1, y2, stacked updated batch_stats).
    """
    params = {k: v['params'] for k, v in variables.items()}
    stats = {k: {'batch_stats': v['batch_stats']} if 'batch_stats' in v else {}
             for k, v in variables.items()}

    def merge(p, s):
        return {k: {'params': p[k], **s[k]} for k in p}

    @jax.custom_vjp
    def run(params, stats, keys, rates, x1, x2):
        return _scan_forward(coupling, merge(params, stats), keys, rates, x1, x2, unroll)

    def fwd(params, stats, keys, rates, x1, x2):
        y1, y2, new_stats = run(params, stats, keys, rates, x1, x2)
        # the residuals: outputs, parameters and keys only -- no per-block activations
        return (y1, y2, new_stats), (params, stats, keys, rates, y1, y2)

    def bwd(res, cts):
        params, stats, keys, rates, y1, y2 = res
        dy1, dy2, _ = cts   # running statistics carry no gradient

        def step(carry, xs):
            y1, y2, dy1, dy2 = carry
            p, s, key, rate = xs
            kf, kg = jax.random.split(key)
            g_stats, f_stats = s['g'].get('batch_stats'), s['f'].get('batch_stats')
            # G first: rebuild x2 = y2 - G(y1) and pull dy2 back through G
            gy, g_vjp = jax.vjp(
                lambda q, z: coupling.branch(coupling.g, q, g_stats, z, kg, rate)[0], p['g'], y1)
            x2 = y2 - gy
            dpg, dz = g_vjp(dy2)
            dz = dy1 + dz                      # total cotangent of y1 (= of x1)
            # then F: rebuild x1 = y1 - F(x2) and pull dz back through F
            fx, f_vjp = jax.vjp(
                lambda q, z: coupling.branch(coupling.f, q, f_stats, z, kf, rate)[0], p['f'], x2)
            x1 = y1 - fx
            dpf, dx2 = f_vjp(dz)
            return (x1, x2, dz, dy2 + dx2), {'f': dpf, 'g': dpg}

        with loop_body():
            (_, _, dx1, dx2), dparams = jax.lax.scan(
                step, (y1, y2, dy1, dy2), (params, stats, keys, rates), reverse=True, unroll=unroll)
        zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
        key_ct = np.zeros(keys.shape, jax.dtypes.float0)
        return dparams, zeros(stats), key_ct, zeros(rates), dx1, dx2

    run.defvjp(fwd, bwd)
    return run(params, stats, keys, rates, x1, x2)


class ReversibleSequence(nn.Module):
    """``num_blocks`` additive couplings (x1, x2) -> (y1, y2) with F and G as given.

    f_block, g_block: templates of F and G (any modules called as ``m(x, train)``; F maps
      x2's shape to x1's, G maps x1's shape to x2's). Each block gets its own parameters,
      stored stacked under ``f`` and ``g`` (and running statistics under ``batch_stats``).
    drop_path_rates: per-block stochastic-depth rate applied to both branch outputs
      (empty: none). The coupling stays exactly invertible: the mask is a function of the key.
    reversible: True recomputes activations in the backward pass (memory independent of
      depth); False stores them (ordinary autodiff), for comparison.

    ``__call__(x1, x2, train, inverse=True)`` runs the inverse map, (y1, y2) -> (x1, x2).
    """
    f_block: nn.Module
    g_block: nn.Module
    num_blocks: int
    drop_path_rates: Sequence[float] = ()
    reversible: bool = True
    unroll: Any = 1

    def _stacked_init(self, module, x, name):
        """Independent initial variables for every block, stacked on a leading axis."""
        def init_all(rng):
            keys = jax.random.split(rng, self.num_blocks)
            return jax.vmap(lambda k: module.init({'params': k, 'dropout': k}, x, False))(keys)
        params = self.param(name, lambda rng: init_all(rng)['params'])
        variables = {'params': params}
        shapes = jax.eval_shape(init_all, jax.random.key(0))
        if 'batch_stats' in shapes:
            stats = self.variable('batch_stats', name,
                                  lambda: init_all(jax.random.key(0))['batch_stats'])
            variables['batch_stats'] = stats.value
            return variables, stats
        return variables, None

    @nn.compact
    def __call__(self, x1, x2, train: bool = False, inverse: bool = False):
        if self.drop_path_rates and len(self.drop_path_rates) != self.num_blocks:
            raise ValueError(f'drop_path_rates has {len(self.drop_path_rates)} entries for '
                             f'{self.num_blocks} blocks')
        f, g = self.f_block.clone(parent=None), self.g_block.clone(parent=None)
        f_vars, f_stats = self._stacked_init(f, x2, 'f')
        g_vars, g_stats = self._stacked_init(g, x1, 'g')
        variables = {'f': f_vars, 'g': g_vars}
        use_drop_path = any(r > 0 for r in self.drop_path_rates)
        rates = jnp.asarray(self.drop_path_rates or [0.0] * self.num_blocks, jnp.float32)
        if train and self.has_rng('dropout'):
            keys = _raw_key(jax.random.split(self.make_rng('dropout'), self.num_blocks))
        else:
            keys = jnp.zeros((self.num_blocks, 2), jnp.uint32)
        coupling = _Coupling(f, g, train, use_drop_path)

        if inverse:
            return _scan_inverse(coupling, variables, keys, rates, x1, x2, self.unroll)
        if self.reversible and not self.is_initializing():
            y1, y2, new_stats = reversible_scan(coupling, variables, keys, rates, x1, x2, self.unroll)
        else:
            y1, y2, new_stats = _scan_forward(coupling, variables, keys, rates, x1, x2, self.unroll)
        if train and not self.is_initializing():
            for holder, name in ((f_stats, 'f'), (g_stats, 'g')):
                if holder is not None and self.is_mutable_collection('batch_stats'):
                    holder.value = new_stats[name]
        return y1, y2


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
