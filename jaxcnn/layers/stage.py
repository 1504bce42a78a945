"""How a stage's blocks run, for every family: unrolled, scanned, rematerialised or reversible.

A family says what its stage computes: a list of blocks, each a module class and its fields,
the way a paper's stage table lists them. :class:`Stage` says how they run:

* unrolled (the default): one module per block, named by its index in the stage (``0``, ``1``,
  ...), each output through the kernel policy's block boundary (:func:`jaxcnn.kernels.block_output`);
* ``scan=True``: after the ``unrolled`` leading blocks (which change the shape), the blocks that
  differ only in real numbers (a drop-path rate, NFNet's beta) run as one ``nn.scan`` body, module
  ``stacked/block``, whose parameters carry one leading axis over those blocks; the numbers that
  differ are its scanned inputs. Compile time then stops growing with depth;
* ``remat=True`` (or the name of a ``jax.checkpoint_policies`` policy): each block's
  activations are recomputed in the backward pass instead of stored;
* ``reversible=True``: the stacked blocks are additive couplings (:class:`~jaxcnn.layers.reversible.Coupling`)
  whose backward pass rebuilds their inputs from their outputs (:mod:`jaxcnn.layers.reversible`).
  Their parameters are laid out exactly as under ``scan=True``.

One naming rule marks stacked parameters, and it lives here: a module named :data:`STACKED`
holds its stage's blocks ``unrolled..n-1`` stacked on the leading axis (:func:`is_stacked`,
:func:`stacked_target`). The optimiser's masks, AGC, the weight converter and the summary read
it through these functions.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from .. import kernels

STACKED = 'stacked'


def is_stacked(path: Union[str, Sequence[str]]) -> bool:
    """Whether the parameter at ``path`` ('/'-joined, or its parts) is stacked over blocks."""
    parts = path.split('/') if isinstance(path, str) else tuple(path)
    return STACKED in parts[:-1]


def stacked_target(key: Tuple[str, ...], flat) -> Tuple[Tuple[str, ...], int] | None:
    """Where the weights of unrolled block ``.../<stage>/<b>/...`` live in a model that stacks
    that stage: (the stacked key in ``flat``, the model's variables flattened to tuples, and the
    index on its leading axis), or None. Blocks ``0..u-1`` stay unrolled, with ``u`` the number
    of them the model holds; block ``b >= u`` is index ``b - u`` of ``<stage>/stacked/block``."""
    for i, part in enumerate(key[:-1]):
        if not part.isdigit() or i == 0:
            continue
        prefix, rest = key[:i], key[i + 1 :]
        target = (*prefix, STACKED, 'block', *rest)
        if target in flat:
            unrolled = {k[i] for k in flat if len(k) > i and k[:i] == prefix and k[i].isdigit()}
            return target, int(part) - len(unrolled)
    return None


def stack_like(tree, target, complete: bool = True):
    """``tree`` (a pytree of an unrolled model's variables, gradients or masks, nested dicts) in the
    layout of ``target`` (the stacked model's, or their shapes): each stacked leaf is the
    corresponding unrolled blocks' leaves stacked in block order. ``complete=False`` accepts a
    ``tree`` that holds only some of ``target``'s leaves."""
    flat, want = traverse_util.flatten_dict(tree), traverse_util.flatten_dict(target)
    out, parts = {}, {}
    for key, value in flat.items():
        if key in want:
            out[key] = value
            continue
        hit = stacked_target(key, want)
        if hit is None:
            raise ValueError(f'{"/".join(key)} has no place in the stacked layout')
        parts.setdefault(hit[0], {})[hit[1]] = value
    for key, blocks in parts.items():
        out[key] = jnp.stack([jnp.asarray(blocks[i]) for i in range(len(blocks))])
    missing = sorted('/'.join(k) for k in set(want) - set(out))
    if missing and complete:
        raise ValueError(f'the unrolled tree lacks {missing[:4]}')
    return traverse_util.unflatten_dict(out)


def stage_blocks(cls, fields: Sequence[dict]) -> tuple:
    """The ``blocks`` of a :class:`Stage`: one ``cls`` block per dict of fields (tuples of
    blocks of different classes concatenate)."""
    return tuple(_field_items((cls, f)) for f in fields)


def _field_items(block) -> tuple:
    cls, fields = block
    return cls, tuple(sorted(dict(fields).items()))


def _stack_plan(blocks, unrolled: int):
    """(first stacked index, static fields, names of the fields that differ) for the blocks after
    the first ``unrolled``, when there are any, of one class, differing only in real numbers (a
    rate, a gain; integers such as widths, kernels and strides shape the block); else None."""
    run = blocks[unrolled:]
    if not run or len({cls for cls, _ in run}) > 1:
        return None
    keys = {tuple(k for k, _ in fields) for _, fields in run}
    if len(keys) > 1:
        return None
    names = next(iter(keys))
    varying = tuple(n for i, n in enumerate(names) if len({f[i][1] for _, f in run}) > 1)
    values = [dict(fields) for _, fields in run]
    if not all(
        isinstance(v[n], numbers.Real) and not isinstance(v[n], numbers.Integral)
        for v in values
        for n in varying
    ):
        return None
    static = tuple((n, v) for n, v in run[0][1] if n not in varying)
    return unrolled, static, varying


class _Body(nn.Module):
    """One stacked block as the body of ``nn.scan``: carry = activations, scanned input = the
    block's numbers that differ between the stacked blocks."""

    block: Any
    static: tuple
    train: bool
    inverse: bool = False

    @nn.compact
    def __call__(self, x, numbers_):
        block = self.block(**dict(self.static), **numbers_, name='block')
        return (block.inverse(x, self.train) if self.inverse else block(x, self.train)), None


def _remat_policy(remat):
    if remat is True:
        return None
    policy = getattr(jax.checkpoint_policies, remat, None)
    if policy is None:
        raise ValueError(f'remat={remat!r} is neither True nor a jax.checkpoint_policies name')
    return policy


class Stage(nn.Module):
    """A stage's blocks, run as the fields below say (see the module docstring).

    blocks: ``((module class, ((field, value), ...)), ...)``, one entry per block, in order.
      Each block is called ``block(x, train)`` and returns the next ``x`` (any pytree: RevNet's
      is the pair of halves); with ``inverse=True``, ``block.inverse(x, train)``.
    unrolled: the leading blocks that always run unrolled (a stage's first block usually
      changes the shape).
    """

    blocks: Tuple[Tuple[Any, tuple], ...]
    unrolled: int = 1
    scan: bool = False
    remat: Union[bool, str] = False
    reversible: bool = False
    recompute: bool = True  # reversible=True only; False: ordinary autodiff of the same
    # scan with the same keys (activations stored), to compare
    unroll: int = 1  # lax.scan's unroll of the stacked blocks
    every_output: bool = False  # return the list of every block's output (unrolled stages):
    # feature levels that lie between blocks are tapped by the model from it

    @nn.compact
    def __call__(self, x, train: bool = False, inverse: bool = False):
        blocks = tuple(_field_items(b) for b in self.blocks)
        plan = None
        if self.reversible or self.scan:
            plan = _stack_plan(blocks, self.unrolled)
            if self.reversible and plan is None and len(blocks) > self.unrolled:
                raise ValueError(
                    f'a reversible stage needs couplings of one kind after its first '
                    f'{self.unrolled} block(s), differing only in numbers'
                )
        first = plan[0] if plan else len(blocks)
        units = []
        for b, (cls, fields) in enumerate(blocks[:first]):
            if self.remat:
                # outside a loop XLA would merge the recomputation with the forward pass (CSE)
                # and keep every activation: the barrier that prevents it is what remat needs
                cls = nn.remat(
                    cls, static_argnums=(2,), policy=_remat_policy(self.remat), prevent_cse=True
                )
            units.append(cls(**dict(fields), name=str(b)))
        if inverse:
            if plan:
                x = self._stacked(blocks, plan, x, train, inverse=True)
            for unit in reversed(units):
                x = unit.inverse(x, train)
            return x
        if self.every_output and plan:
            raise ValueError('every_output needs an unrolled stage (no scan, not reversible)')
        outputs = []
        for unit in units:
            x = jax.tree.map(kernels.block_output, unit(x, train))
            outputs.append(x)
        if self.every_output:
            return outputs
        return self._stacked(blocks, plan, x, train) if plan else x

    def _stacked(self, blocks, plan, x, train, inverse=False):
        first, static, varying = plan
        run = blocks[first:]
        numbers_ = {n: jnp.asarray([dict(f)[n] for _, f in run], jnp.float32) for n in varying}
        if self.reversible and not self.is_initializing():
            from .reversible import run_couplings  # the couplings' memory-free executor

            variables = {c: v[STACKED]['block'] for c, v in self.variables.items() if STACKED in v}
            rng = self.make_rng('dropout') if train and self.has_rng('dropout') else None
            x, stats = run_couplings(
                run[0][0],
                static,
                variables,
                numbers_,
                x,
                train,
                rng,
                inverse=inverse,
                recompute=self.recompute,
                unroll=self.unroll,
            )
            if stats and train and not inverse and self.is_mutable_collection('batch_stats'):
                self.put_variable('batch_stats', STACKED, {'block': stats})
            return x
        body = _Body
        if self.remat and not self.reversible:
            body = nn.remat(_Body, policy=_remat_policy(self.remat), prevent_cse=False)
        scan = nn.scan(
            body,
            variable_axes={'params': 0, 'batch_stats': 0},
            split_rngs={'params': True, 'dropout': True},
            length=len(run),
            reverse=inverse,
            unroll=self.unroll,
        )
        with kernels.loop_body():
            x, _ = scan(run[0][0], static, train, inverse, name=STACKED)(x, numbers_)
        return x
