"""Hand-written reverse passes that keep every mode of differentiation.

A kernel form with its own backward pass (a oneDNN call, a convolution restated for XLA:CPU)
is usually written with ``jax.custom_vjp``. That loses forward mode: ``jax.jvp`` and
``jax.linearize`` raise TypeError through a custom VJP, and with them the Hessian-vector
products of curvature research. ``jax.custom_derivatives.linear_call`` gives a linear function
its own transpose, but its JVP asserts that the function's non-linear operands carry no tangent,
so differentiating a reverse pass built from it (forward-over-reverse) fails as well. JAX has no
public API for "this linear map, with this transpose, differentiable in its other operands"; this
module is that, in two pieces:

* :func:`linear` calls ``apply(residuals, operands)``, a function linear in ``operands``, as one
  primitive whose transpose is ``transpose(residuals, cotangents)``. Its JVP in the operands is the
  primitive again (it is linear), and in the residuals JAX's own JVP of ``apply``.
* :func:`bilinear` makes ``f(a, b)``, bilinear, from its implementation and the two maps that
  transpose it in ``a`` and in ``b``: one primitive whose tangent is ``f(da, b) + f(a, db)`` and
  whose transposes are those maps. Under ``jax.grad`` the transposes run; under ``jax.jvp`` the
  implementation does; ``jax.linearize``, ``jax.vmap``, ``lax.scan``, ``jax.checkpoint`` and any
  nesting compose.

A convolution and its two gradients are three such functions, each transposing into the others
(:func:`convolution_triple`), so reverse mode nests to any order with the fast forms.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching, mlir

linear_p = jax.extend.core.Primitive('jaxcnn_linear')
linear_p.multiple_results = True


class _Rule:
    """What one :func:`linear` call binds: the two functions and the operands' tree structure.
    Compared by identity, like the functions it holds."""

    def __init__(self, apply, transpose, res_tree, lin_tree, out_tree, out_avals):
        self.apply, self.transpose = apply, transpose
        self.res_tree, self.lin_tree, self.out_tree = res_tree, lin_tree, out_tree
        self.out_avals = out_avals
        self.num_res = res_tree.num_leaves

    def split(self, flat):
        res = jax.tree.unflatten(self.res_tree, flat[: self.num_res])
        lin = jax.tree.unflatten(self.lin_tree, flat[self.num_res :])
        return res, lin

    def __call__(self, *flat):
        return jax.tree.leaves(self.apply(*self.split(flat)))


def linear(apply: Callable, transpose: Callable, residuals, operands):
    """``apply(residuals, operands)``, which must be linear in ``operands`` (any pytree), with
    ``transpose(residuals, cotangents)`` as its transpose in ``operands`` (the cotangents have the
    output's structure; the result has the operands')."""
    res_flat, res_tree = jax.tree.flatten(residuals)
    lin_flat, lin_tree = jax.tree.flatten(operands)
    out_shape = jax.eval_shape(apply, residuals, operands)
    out_flat, out_tree = jax.tree.flatten(out_shape)
    avals = tuple(jax.core.ShapedArray(o.shape, o.dtype) for o in out_flat)
    rule = _Rule(apply, transpose, res_tree, lin_tree, out_tree, avals)
    out = linear_p.bind(*res_flat, *lin_flat, rule=rule)
    return jax.tree.unflatten(out_tree, out)


linear_p.def_impl(lambda *flat, rule: rule(*flat))
linear_p.def_abstract_eval(lambda *avals, rule: rule.out_avals)
mlir.register_lowering(
    linear_p, mlir.lower_fun(lambda *flat, rule: rule(*flat), multiple_results=True)
)


def _zeros_like(t, primal):
    """An instantiated tangent: zeros of the primal's tangent type (float0 for integers)."""
    if type(t) is not ad.Zero:
        return t
    if jnp.issubdtype(primal.dtype, jnp.inexact):
        return jnp.zeros_like(primal)
    return np.zeros(primal.shape, jax.dtypes.float0)


def _linear_jvp(primals, tangents, rule):
    n = rule.num_res
    out = linear_p.bind(*primals, rule=rule)
    res, lin = rule.split(primals)
    lin_dot = [_zeros_like(t, p) for t, p in zip(tangents[n:], primals[n:])]
    out_dot = linear_p.bind(*primals[:n], *lin_dot, rule=rule)
    if not all(type(t) is ad.Zero for t in tangents[:n]):
        # the map itself moves with its residuals: JAX's JVP of ``apply`` in them
        res_dot = jax.tree.unflatten(
            rule.res_tree, [_zeros_like(t, p) for t, p in zip(tangents[:n], primals[:n])]
        )
        moved = jax.jvp(lambda r: rule.apply(r, lin), (res,), (res_dot,))[1]
        out_dot = [a + b for a, b in zip(out_dot, jax.tree.leaves(moved))]
    return out, out_dot


def _linear_transpose(cts, *flat, rule):
    n = rule.num_res
    if any(ad.is_undefined_primal(x) for x in flat[:n]):
        raise ValueError('jaxcnn.kernels.linear is not linear in its residuals')
    cts = [
        jnp.zeros(a.shape, a.dtype) if type(c) is ad.Zero else c
        for c, a in zip(cts, rule.out_avals)
    ]
    res = jax.tree.unflatten(rule.res_tree, flat[:n])
    lin_cts = jax.tree.leaves(rule.transpose(res, jax.tree.unflatten(rule.out_tree, cts)))
    # operands that are constants here (instantiated zero tangents) take no cotangent
    return [None] * n + [
        ct if ad.is_undefined_primal(x) else None for ct, x in zip(lin_cts, flat[n:])
    ]


def _linear_batch(args, dims, rule):
    n = rule.num_res
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    res = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args[:n], dims[:n])]
    res_axes = [None if d is None else 0 for d in dims[:n]]
    # every operand batched, so that the transpose's cotangents are per example too
    lin = [
        jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        for a, d in zip(args[n:], dims[n:])
    ]
    res_tree_axes = jax.tree.unflatten(rule.res_tree, res_axes)
    apply = jax.vmap(rule.apply, in_axes=(res_tree_axes, 0))
    transpose = jax.vmap(rule.transpose, in_axes=(res_tree_axes, 0))
    out = linear(
        apply,
        transpose,
        jax.tree.unflatten(rule.res_tree, res),
        jax.tree.unflatten(rule.lin_tree, lin),
    )
    return jax.tree.leaves(out), [0] * len(rule.out_avals)


ad.primitive_jvps[linear_p] = _linear_jvp
ad.primitive_transposes[linear_p] = _linear_transpose
batching.primitive_batchers[linear_p] = _linear_batch


bilinear_p = jax.extend.core.Primitive('jaxcnn_bilinear')


class _Bilinear:
    """What one :func:`bilinear` function binds: its implementation, its two transposes and its
    output's type. Compared by identity; printed in jaxprs by its name."""

    def __init__(self, name, impl, transpose_a, transpose_b, out_aval):
        self.name, self.impl, self.transpose_a, self.transpose_b = (
            name,
            impl,
            transpose_a,
            transpose_b,
        )
        self.out_aval = out_aval

    def __repr__(self):
        return self.name


def bilinear(
    impl: Callable, transpose_a: Callable, transpose_b: Callable, name: str = 'bilinear'
) -> Callable:
    """``f(a, b) = impl(a, b)``, bilinear, differentiable in every mode: ``transpose_a(b, ct)`` is
    its transpose in ``a`` (the cotangent of ``a``), ``transpose_b(a, ct)`` its transpose in ``b``.
    Both should be built from functions of this kind (or plain lax) for higher orders to keep
    the fast forms. It is a primitive rather than a ``jax.custom_jvp``: partial evaluation (the
    reverse pass of a ``lax.scan`` or of ``jax.checkpoint``) inlines a custom JVP's primal,
    which would leave the implementation undifferentiable under forward-over-reverse."""

    def f(a, b):
        out = jax.eval_shape(impl, a, b)
        rule = _Bilinear(
            name, impl, transpose_a, transpose_b, jax.core.ShapedArray(out.shape, out.dtype)
        )
        return bilinear_p.bind(a, b, rule=rule)

    return f


bilinear_p.def_impl(lambda a, b, rule: rule.impl(a, b))
bilinear_p.def_abstract_eval(lambda a, b, rule: rule.out_aval)
mlir.register_lowering(
    bilinear_p, mlir.lower_fun(lambda a, b, rule: rule.impl(a, b), multiple_results=False)
)
ad.defbilinear(
    bilinear_p,
    lambda ct, a, b, rule: rule.transpose_a(b, ct),
    lambda ct, a, b, rule: rule.transpose_b(a, ct),
)


def _bilinear_batch(args, dims, rule):
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    # both operands batched, so that each transpose's cotangent is per example too
    a, b = (
        jnp.broadcast_to(x, (size, *x.shape)) if d is None else jnp.moveaxis(x, d, 0)
        for x, d in zip(args, dims)
    )
    batched = bilinear(
        jax.vmap(rule.impl),
        jax.vmap(rule.transpose_a),
        jax.vmap(rule.transpose_b),
        f'vmap({rule.name})',
    )
    return batched(a, b), 0


batching.primitive_batchers[bilinear_p] = _bilinear_batch


def convolution_triple(
    forward: Callable, input_gradient: Callable, kernel_gradient: Callable, name: str = 'conv'
):
    """``(conv, conv_input_gradient, conv_kernel_gradient)`` from the implementations of a
    convolution ``y = forward(x, k)``, its input gradient ``dx = input_gradient(dy, k)`` and its
    kernel gradient ``dk = kernel_gradient(x, dy)`` (for fixed shapes and geometry). Each of the
    three is bilinear and each one's transposes are the other two:
    <conv(x, k), dy> = <x, dgrad(dy, k)> = <k, wgrad(x, dy)>."""
    conv = bilinear(forward, lambda k, dy: dgrad(dy, k), lambda x, dy: wgrad(x, dy), name)
    dgrad = bilinear(
        input_gradient,
        lambda k, g: conv(g, k),
        lambda dy, g: wgrad(g, dy),
        f'{name}.input_gradient',
    )
    wgrad = bilinear(
        kernel_gradient,
        lambda dy, g: dgrad(dy, g),
        lambda x, g: conv(x, g),
        f'{name}.kernel_gradient',
    )
    return conv, dgrad, wgrad
