"""How a model's convolutions run: one immutable policy, chosen per backend, set with a context
manager.

Models say what they compute (:mod:`jaxcnn.layers`: ``lax`` convolutions, pools, norms), and the
stage helper (:mod:`jaxcnn.layers.stage`) says which blocks run inside a loop and where a block
ends. Nothing in a model names a backend. This package decides how each convolution runs on the
backend at hand, through one :class:`Policy`: on XLA:CPU, oneDNN's kernels for dense float32
convolutions (:mod:`.onednn`), per-tap sums for depthwise ones and restated gradients inside
loops (:mod:`.cpu`), a boundary after each unrolled block, and the XLA options for the step.
Each form gives ``lax``'s numbers and keeps every mode of differentiation (``jax.grad`` to any
order, ``jax.jvp``, ``jax.linearize``, Hessian-vector products; :mod:`.autodiff`).

The policy is read while a function is traced, so a function jitted inside ``use(...)`` keeps
its forms wherever it runs; jit a new function to trace under another policy::

    with jaxcnn.kernels.use(jaxcnn.kernels.PLAIN):     # lax exactly as the model states it
        jaxpr = jax.make_jaxpr(lambda x: model.apply(variables, x))(x)
    with jaxcnn.kernels.use(onednn=False):             # today's policy with one form off
        step = jax.jit(train_step)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp

from . import cpu, onednn
from .cpu import sub_jaxprs

XLA_OPTIONS = ('auto', 'defaults', 'dense')


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which form each convolution takes (BENCHMARKS.md, "Kernel forms on the CPU", keeps the
    measurements behind each).

    onednn: dense float32 convolutions through oneDNN's kernels (the CPU, one device).
    depthwise_taps: depthwise convolutions as sums over kernel taps, with their own gradients.
    loop_gradients: inside loop bodies, convolution gradients stated as NHWC convolutions.
    small_map_products: dense convolutions on maps smaller than the kernel as one product.
    block_boundary: each unrolled block's output written to memory once (XLA:CPU's fusion would
      recompute chains of residual sums in every reader).
    xla_options: 'auto' (XLA:CPU's own convolutions instead of YNNPACK's when the step has no
      depthwise convolution), 'defaults' (XLA's) or 'dense' (Eigen's convolutions whatever the
      step).
    """

    onednn: bool = False
    depthwise_taps: bool = False
    loop_gradients: bool = False
    small_map_products: bool = False
    block_boundary: bool = False
    xla_options: str = 'auto'

    def __post_init__(self):
        if self.xla_options not in XLA_OPTIONS:
            raise ValueError(
                f"xla_options must be one of {', '.join(XLA_OPTIONS)}, got {self.xla_options!r}"
            )


PLAIN = Policy()
CPU = Policy(
    onednn=True,
    depthwise_taps=True,
    loop_gradients=True,
    small_map_products=True,
    block_boundary=True,
)
# cuDNN through XLA as the model states it; the depthwise tap sums are the GPU suite's candidate
GPU = Policy()
_DEFAULTS = {'cpu': CPU, 'gpu': GPU, 'cuda': GPU, 'rocm': GPU}

_POLICY = contextvars.ContextVar('jaxcnn_kernel_policy', default=None)
_IN_LOOP = contextvars.ContextVar('jaxcnn_loop_body', default=False)


def default(backend: str | None = None) -> Policy:
    """The library's policy for ``backend`` (default: JAX's default backend)."""
    return _DEFAULTS.get(backend or jax.default_backend(), PLAIN)


def current() -> Policy:
    """The policy in force: the innermost :func:`use`, else the backend's default."""
    policy = _POLICY.get()
    return default() if policy is None else policy


@contextlib.contextmanager
def use(policy: Policy | None = None, **changes):
    """Trace what runs inside under ``policy`` (default: the current one) with ``changes``
    applied, e.g. ``use(PLAIN)``, ``use(onednn=False)``; the previous policy is back after."""
    base = current() if policy is None else policy
    try:
        chosen = dataclasses.replace(base, **changes)
    except TypeError:
        names = ', '.join(f.name for f in dataclasses.fields(Policy))
        raise ValueError(
            f'unknown policy field in {sorted(changes)}; the fields are {names}'
        ) from None
    token = _POLICY.set(chosen)
    try:
        yield chosen
    finally:
        _POLICY.reset(token)


@contextlib.contextmanager
def loop_body():
    """What is traced inside is the body of a loop (a scanned stage, a reversible sequence)."""
    token = _IN_LOOP.set(True)
    try:
        yield
    finally:
        _IN_LOOP.reset(token)


def _explicitly_sharded(x) -> bool:
    # arrays on a mesh with Explicit axes type-check every op's output sharding, which the forms
    # do not spell out: those keep lax's convolution
    sharding = getattr(jax.typeof(x), 'sharding', None)
    mesh = getattr(sharding, 'mesh', None)
    return bool(
        mesh is not None
        and not mesh.empty
        and any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    )


def _onednn_applies(x, k, pads) -> bool:
    """float32 on the CPU, non-negative padding, a non-empty batch, one device (XLA's partitioner
    cannot split a foreign call by batch: it would gather the whole batch onto every device)."""
    return (
        x.dtype == k.dtype == jnp.float32
        and jax.default_backend() == 'cpu'
        and min(min(p) for p in pads) >= 0
        and min(x.shape) > 0
        and min(k.shape) > 0
        and jax.device_count() == 1
        and onednn.available()
    )


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """``lax.conv_general_dilated`` in the form the current policy picks for it (the signature
    ``flax.linen.Conv`` calls). Forms apply to 2-D NHWC/HWIO convolutions without input dilation;
    everything else is lax's."""
    policy = current()
    nd = len(window_strides)
    formable = (
        nd == 2
        and not kwargs
        and not any(d != 1 for d in (lhs_dilation or (1,) * nd))
        and policy != PLAIN
        and not _explicitly_sharded(lhs)
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, cpu.NHWC)
    )
    if formable:
        strides, dilation = tuple(window_strides), tuple(rhs_dilation or (1, 1))
        pads = cpu.explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], strides, dilation)
        out_hw = cpu.output_hw(lhs.shape[1:3], pads, rhs.shape[:2], strides, dilation)
        depthwise = 1 < feature_group_count == lhs.shape[3] and rhs.shape[2] == 1
        if min(out_hw) > 0 and min(lhs.shape) > 0:  # an empty output is lax's to make
            if depthwise and policy.depthwise_taps:
                return cpu.depthwise_triple(
                    lhs.shape, rhs.shape, strides, pads, dilation, jax.default_backend() == 'cpu'
                )[0](lhs, rhs)
            # maps smaller than the kernel first: one product beats any convolution kernel there
            if (
                feature_group_count == 1
                and policy.small_map_products
                and cpu.small_map(lhs.shape[1:3], out_hw, rhs.shape[:2], dilation)
            ):
                return cpu.conv_as_product(lhs, rhs, strides, pads, dilation, precision)
            if feature_group_count == 1 and policy.onednn and _onednn_applies(lhs, rhs, pads):
                return onednn.conv(lhs, rhs, strides, dilation, pads)
            if policy.loop_gradients and _IN_LOOP.get():
                return cpu.loop_triple(
                    lhs.shape, rhs.shape, strides, pads, dilation, feature_group_count, precision
                )[0](lhs, rhs)
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        precision=precision,
        **kwargs,
    )


def block_output(x):
    """A block's output as the policy stores it: written once for all its readers under
    ``block_boundary`` (outside loops, whose carry is stored anyway), else ``x`` itself."""
    if not current().block_boundary or _IN_LOOP.get() or _explicitly_sharded(x):
        return x
    return cpu.stored(x)


def compiler_options(fn=None, *example_args) -> dict:
    """``jax.jit(..., compiler_options=...)`` for a step that runs ``fn`` (e.g. a model's forward
    pass; ``example_args`` may be ``jax.ShapeDtypeStruct``\\ s), by the policy's ``xla_options``.
    'auto': on the CPU backend, when ``fn`` (traced under the policy) has no depthwise
    convolution, XLA's own convolutions instead of YNNPACK's; otherwise no options."""
    choice = current().xla_options
    if choice == 'defaults' or jax.default_backend() != 'cpu':
        return {}
    if (
        choice == 'auto'
        and fn is not None
        and cpu.has_depthwise_conv(jax.make_jaxpr(fn)(*example_args).jaxpr)
    ):
        return {}
    options = tuple(cpu.DENSE_OPTIONS.items())
    return dict(options) if cpu.accepted(options) else {}


def model_compiler_options(model, variables, image_shape, dtype=jnp.float32) -> dict:
    """:func:`compiler_options` for the training and inference steps of a Flax ``model``, from
    its inference forward pass on one ``image_shape`` (H, W, C) image."""
    return compiler_options(
        lambda v, x: model.apply(v, x, train=False),
        variables,
        jax.ShapeDtypeStruct((1, *image_shape), dtype),
    )


def describe() -> str:
    """What the current policy runs a CPU step's dense convolutions on, in one line for a log;
    empty off the CPU, where the policy is lax as the model states it."""
    if jax.default_backend() != 'cpu':
        return ''
    if not current().onednn:
        return "dense convolutions: XLA's kernels (the policy's onednn is off)"
    if not onednn.available():
        return (
            f"dense convolutions: XLA's kernels (oneDNN unavailable: {onednn.unavailable_reason()})"
        )
    if jax.device_count() > 1:
        return (
            f"dense convolutions: XLA's kernels (oneDNN's run on one device; this run has "
            f'{jax.device_count()})'
        )
    return "dense convolutions: oneDNN's kernels"


__all__ = [
    'Policy',
    'PLAIN',
    'CPU',
    'GPU',
    'default',
    'current',
    'use',
    'loop_body',
    'conv_general_dilated',
    'block_output',
    'compiler_options',
    'model_compiler_options',
    'describe',
    'sub_jaxprs',
]
