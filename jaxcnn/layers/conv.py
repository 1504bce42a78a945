"""Convolution helpers shared by every family.

Two padding conventions matter when weights come from elsewhere:
  * 'torch': symmetric padding of ``dilation * (k - 1) // 2`` on each side, as PyTorch's
    ``nn.Conv2d(padding=k // 2)`` does; with stride 2 on an even input this drops the last
    row/column rather than padding it.
  * 'same': TensorFlow's dynamic "SAME" padding (extra pad goes bottom/right), which the
    ``tf_`` ports in timm reproduce with ``Conv2dSame``.
"""
import contextlib
import contextvars
import functools
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import onednn

# He et al. 2015 init with fan-out, as torchvision initialises ResNet convolutions.
he_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def torch_padding(kernel_size, dilation=1):
    """Symmetric (lo, hi) padding per spatial dim that keeps size at stride 1 (odd kernels)."""
    ks, ds = _pair(kernel_size), _pair(dilation)
    return tuple((d * (k - 1) // 2, d * (k - 1) // 2) for k, d in zip(ks, ds))


def resolve_padding(padding, kernel_size, dilation=1):
    """Turn a padding spec ('torch', 'same', 'valid', int or explicit pairs) into nn.Conv's form."""
    if padding == 'torch':
        return torch_padding(kernel_size, dilation)
    if padding == 'same':
        return 'SAME'
    if padding == 'valid':
        return 'VALID'
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding, (tuple, list)):
        return tuple(_pair(p) for p in padding)
    raise ValueError(f"padding must be 'torch', 'same', 'valid', an int or pairs, got {padding!r}")


_NHWC = ('NHWC', 'HWIO', 'NHWC')
# conv_general_dilated's custom gradient forms on the CPU; False restores lax's own (and with it
# forward-mode differentiation, which a custom VJP does not support).
CPU_GRADIENT_FORMS = True
_IN_LOOP = contextvars.ContextVar('jaxcnn_conv_in_loop', default=False)


@contextlib.contextmanager
def loop_body():
    """Convolutions traced in this context are the body of a loop (``lax.scan``, ``nn.scan``):
    on the CPU they take the gradient forms of :func:`conv_general_dilated`."""
    token = _IN_LOOP.set(True)
    try:
        yield
    finally:
        _IN_LOOP.reset(token)


# residual_output's boundary on the CPU; False leaves XLA's fusion to decide (for A/B timing)
CPU_MATERIALIZE_RESIDUALS = True
# depthwise convolutions as fused per-tap sums on the CPU (conv_general_dilated); False keeps
# XLA's grouped convolutions (for A/B timing)
CPU_DEPTHWISE_TAPS = True
# dense convolutions on feature maps smaller than their kernel as one matrix product on the CPU
# (conv_general_dilated); False keeps XLA's convolutions (for A/B timing)
CPU_SMALL_MAP_PRODUCTS = True
# dense convolutions with many channels on maps where a large share of the kernel's taps fall on
# padding (3x3 on 4x4: 31 %) as one product per tap over only the outputs it sees inside the
# input, on the CPU (conv_general_dilated); False keeps XLA's convolutions (for A/B timing)
CPU_PADDED_TAP_PRODUCTS = True
# dense float32 convolutions through oneDNN on the CPU (layers/onednn.py), where it could be built;
# False keeps XLA's (Eigen's) convolutions and the forms below (for A/B timing)
CPU_ONEDNN_CONVOLUTIONS = True
# depthwise convolutions as the same per-tap sums on a GPU. Off until measured: on an H100 the
# models with depthwise convolutions trained at 0.44-0.99x timm's speed with cuDNN's grouped
# convolutions, and XLA derives their kernel gradient as a dense-sized convolution
# (jax-ml/jax#13800). A/B: python -m jaxcnn.experiments.depthwise_taps_gpu
GPU_DEPTHWISE_TAPS = False
_SWITCHES = ('CPU_GRADIENT_FORMS', 'CPU_MATERIALIZE_RESIDUALS', 'CPU_DEPTHWISE_TAPS',
             'CPU_SMALL_MAP_PRODUCTS', 'CPU_PADDED_TAP_PRODUCTS', 'CPU_ONEDNN_CONVOLUTIONS',
             'GPU_DEPTHWISE_TAPS')


@contextlib.contextmanager
def switches(**values):
    """The switches above set to ``values`` (e.g. ``switches(CPU_GRADIENT_FORMS=False)``) for what
    is traced inside, and restored to what they were after. They are read while tracing, so a
    function traced inside keeps its forms wherever it is compiled and run."""
    unknown = sorted(set(values) - set(_SWITCHES))
    if unknown:
        raise ValueError(f'unknown switch {", ".join(unknown)}; the switches are {", ".join(_SWITCHES)}')
    saved = {name: globals()[name] for name in values}
    globals().update(values)
    try:
        yield
    finally:
        globals().update(saved)


def residual_output(x):
    """A residual block's output, which XLA:CPU writes to memory once for all its readers.

    XLA fuses an element-wise producer into each consumer that reads it, recomputing it there.
    Down a chain of residual sums (x1 = relu(x0 + f(x0)), x2 = relu(x1 + g(x1)), ...) every later
    block's output is element-wise in all earlier ones, and the transposes that lay out each
    convolution's input for its kernel gradient recompute the whole chain, reading every operand
    in strided order: unrolled ResNet-152 spent 4.4 s of a 5.2 s CPU training step in them
    (`python -m jaxcnn.experiments.cpu_step_profile`). A conditional on a predicate XLA cannot fold
    (always true: x == x or x != x) is a boundary no fusion crosses; its identity branch costs no
    copy. Off the CPU, inside loops (a loop carry is stored anyway) and for arrays on meshes with
    Explicit axes, ``x`` is returned as is.
    Plain lax ops: every transformation (vjp, jvp, vmap) keeps working.
    """
    if (not (CPU_MATERIALIZE_RESIDUALS and jax.default_backend() == 'cpu') or _IN_LOOP.get()
            or x.size == 0 or _explicitly_sharded(x)):
        return x
    return _stored(x)


def _stored(x):
    """``x``, written to memory once: a conditional on a predicate XLA cannot fold (always true)
    is a boundary no fusion crosses, so consumers read ``x`` rather than recompute it."""
    first = x[(0,) * x.ndim]
    always = (first == first) | (first != first)
    return jax.lax.cond(always, lambda v: v, lambda v: -v, x)


# XLA:CPU hands convolutions to YNNPACK by default. On the 2-core test machine YNNPACK runs dense
# convolutions slower than XLA's Eigen ones but depthwise ones faster (training steps, batch 32,
# 112 px: ResNet-18 964 ms with YNNPACK's convolutions, 667 ms without; ConvNeXt-T 4,968 ms
# with, 6,851 ms without; `python -m jaxcnn.bench train --xla-options defaults|dense`, records
# in benchmarks/results/cpu_xla_options_*.json), and XLA has no per-operation switch. So a
# step without depthwise convolutions keeps YNNPACK's other default fusions (dots, reductions)
# and leaves its convolutions to Eigen; a step with them keeps the defaults. (Under
# CPU_GRADIENT_FORMS depthwise convolutions are per-tap sums, not convolutions, so every step
# gets Eigen's dense convolutions.)
_DENSE_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type':
                      'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}


@functools.lru_cache(maxsize=None)
def _accepted(options: Tuple[Tuple[str, str], ...]) -> bool:
    try:            # an XLA without these options compiles with its defaults
        jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile(compiler_options=dict(options))
    except Exception:  # noqa: BLE001  (XLA raises a backend-specific error for unknown options)
        return False
    return True


def _has_depthwise_conv(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'conv_general_dilated':
            groups = eqn.params['feature_group_count']
            in_per_group = eqn.invars[1].aval.shape[eqn.params['dimension_numbers'].rhs_spec[1]]
            if groups > 1 and in_per_group == 1:
                return True
        if any(_has_depthwise_conv(sub) for sub in _sub_jaxprs(eqn.params.values())):
            return True
    return False


def _sub_jaxprs(values):
    """The jaxprs inside an equation's parameters (scan, cond, custom_vjp and pjit bodies)."""
    for v in values:
        if hasattr(v, 'eqns'):
            yield v
        elif hasattr(getattr(v, 'jaxpr', None), 'eqns'):
            yield v.jaxpr
        elif isinstance(v, (tuple, list)):
            yield from _sub_jaxprs(v)


def compiler_options(fn=None, *example_args) -> dict:
    """``jax.jit(..., compiler_options=...)`` for a step that runs ``fn`` (e.g. a model's forward
    pass; ``example_args`` may be ``jax.ShapeDtypeStruct``s): on the CPU backend, when ``fn`` has
    no depthwise convolution, XLA's own convolutions instead of YNNPACK's (see above); otherwise,
    and on other backends, no options."""
    if jax.default_backend() != 'cpu':
        return {}
    if fn is not None and _has_depthwise_conv(jax.make_jaxpr(fn)(*example_args).jaxpr):
        return {}
    options = tuple(_DENSE_CPU_OPTIONS.items())
    return dict(options) if _accepted(options) else {}


def model_compiler_options(model, variables, image_shape, dtype=jnp.float32) -> dict:
    """:func:`compiler_options` for the training and inference steps of a Flax ``model``, from
    its inference forward pass on one ``image_shape`` (H, W, C) image."""
    return compiler_options(lambda v, x: model.apply(v, x, train=False), variables,
                            jax.ShapeDtypeStruct((1, *image_shape), dtype))


def _explicit_pads(padding, in_hw, kernel_hw, strides, dilation):
    if isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_hw, dilation)]
        return tuple(jax.lax.padtype_to_pads(in_hw, dilated, strides, padding))
    return tuple(tuple(p) for p in padding)


def _tap_windows(xp, kernel_hw, out_hw, strides, dilation):
    """(i, j, the strided window of the padded input that kernel tap (i, j) sees)."""
    (kh, kw), (ho, wo), (sh, sw), (dh, dw_) = kernel_hw, out_hw, strides, dilation
    n, c = xp.shape[0], xp.shape[3]
    for i in range(kh):
        for j in range(kw):
            yield i, j, jax.lax.slice(xp, (0, i * dh, j * dw_, 0),
                                      (n, i * dh + sh * (ho - 1) + 1, j * dw_ + sw * (wo - 1) + 1, c),
                                      (1, sh, sw, 1))


def _input_gradient_pads(x_hw, kernel_hw, dy_hw, strides, pads, dilation):
    """Padding of dy, dilated by the stride, whose correlation with the flipped kernel is the
    input gradient (rows and columns the strided window never reaches get zeros)."""
    out = []
    for size, kk, o, s, (lo, hi), d in zip(x_hw, kernel_hw, dy_hw, strides, pads, dilation):
        rest = size + lo + hi - (kk - 1) * d - 1 - s * (o - 1)
        out.append((d * (kk - 1) - lo, d * (kk - 1) - hi + rest))
    return tuple(out)


def _dense_kernel_gradient(x, dy, kernel_hw, strides, pads, dilation, precision):
    """A dense convolution's kernel gradient in the form XLA:CPU runs fast inside loops too:
    with batch and channels swapped (C, H, W, N) it is an ordinary NHWC convolution of the padded
    input by dy (dilated by the stride), strided by the dilation."""
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    dk = jax.lax.conv_general_dilated(
        xp.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), dilation, 'VALID',
        rhs_dilation=strides, dimension_numbers=_NHWC, precision=precision)
    return dk[:, :kernel_hw[0], :kernel_hw[1]].transpose(1, 2, 0, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv_canonical_grads(x, k, strides, pads, dilation, groups, precision):
    return jax.lax.conv_general_dilated(x, k, strides, pads, rhs_dilation=dilation,
                                        dimension_numbers=_NHWC, feature_group_count=groups,
                                        precision=precision)


def _conv_fwd(x, k, strides, pads, dilation, groups, precision):
    return _conv_canonical_grads(x, k, strides, pads, dilation, groups, precision), (x, k)


def _conv_bwd(strides, pads, dilation, groups, precision, res, dy):
    x, k = res
    (kh, kw, cg, c_out), (n, h, w, _) = k.shape, x.shape
    og, (ho, wo) = c_out // groups, dy.shape[1:3]
    # input gradient: dy (dilated by the stride) correlated with the flipped kernel, its in and
    # out channels swapped within each group
    flipped = jnp.flip(k, (0, 1)).reshape(kh, kw, cg, groups, og).transpose(0, 1, 4, 3, 2)
    dx = jax.lax.conv_general_dilated(
        dy, flipped.reshape(kh, kw, og, groups * cg), (1, 1),
        _input_gradient_pads((h, w), (kh, kw), (ho, wo), strides, pads, dilation),
        lhs_dilation=strides, rhs_dilation=dilation, dimension_numbers=_NHWC,
        feature_group_count=groups, precision=precision)
    if groups == 1:
        return dx, _dense_kernel_gradient(x, dy, (kh, kw), strides, pads, dilation, precision)
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    # grouped and depthwise: one product per kernel tap of the input window it sees and dy,
    # summed over batch and positions within each group
    dy_g = dy.reshape(n, ho, wo, groups, og)
    acc = jnp.promote_types(k.dtype, jnp.float32)     # accumulate in fp32 (or wider), as convs do
    taps = []
    for _, _, window in _tap_windows(xp, (kh, kw), (ho, wo), strides, dilation):
        window = window.reshape(n, ho, wo, groups, cg)
        if cg == 1:
            tap = jnp.sum(window * dy_g, (0, 1, 2), dtype=acc)[None]
        else:
            tap = jnp.einsum('nhwgc,nhwgo->cgo', window, dy_g, precision=precision,
                             preferred_element_type=acc)
        taps.append(tap.reshape(cg, c_out))
    return dx, jnp.stack(taps).reshape(kh, kw, cg, c_out).astype(k.dtype)


_conv_canonical_grads.defvjp(_conv_fwd, _conv_bwd)


def _explicitly_sharded(x) -> bool:
    # arrays on a mesh with Explicit axes type-check every op's output sharding; the batch-
    # contracting gradient forms would need it spelled out, so those keep lax's own rule
    sharding = getattr(jax.typeof(x), 'sharding', None)
    mesh = getattr(sharding, 'mesh', None)
    return bool(mesh is not None and not mesh.empty and any(
        t == jax.sharding.AxisType.Explicit for t in mesh.axis_types))


def _output_hw(in_hw, pads, kernel_hw, strides, dilation=(1, 1)):
    """The spatial size of a convolution's (or pooling's) output."""
    return tuple((i + lo + hi - (k - 1) * d - 1) // s + 1
                 for i, (lo, hi), k, d, s in zip(in_hw, pads, kernel_hw, dilation, strides))


def _padded_for_taps(x, k, strides, pads, dilation):
    """The zero-padded input, each channel repeated once per output channel it feeds (the
    channel multiplier), and the output's spatial size."""
    (kh, kw, _, c_out), c_in = k.shape, x.shape[3]
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    if c_out != c_in:          # output channel g * m + j reads input channel g
        xp = jnp.repeat(xp, c_out // c_in, axis=3)
    return xp, _output_hw(x.shape[1:3], pads, (kh, kw), strides, dilation)


def _depthwise_taps(x, k, strides, pads, dilation):
    acc = jnp.promote_types(x.dtype, jnp.float32)   # accumulate in fp32 (or wider), as convs do
    xp, out_hw = _padded_for_taps(x, k, strides, pads, dilation)
    y = None
    for i, j, window in _tap_windows(xp, k.shape[:2], out_hw, strides, dilation):
        tap = window.astype(acc) * k[i, j, 0].astype(acc)
        y = tap if y is None else y + tap
    return y.astype(jnp.result_type(x.dtype, k.dtype))


_BAND_ELEMENTS = 1 << 22    # products per band of the depthwise kernel gradient (a few MB)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise(x, k, strides, pads, dilation):
    """A depthwise convolution (NHWC input, HWIO kernel with one input channel per group) as the
    sum over kernel taps of the strided input window times that tap's per-channel weights.
    XLA:CPU fuses the taps into one loop; its grouped-convolution kernels are 10-40x slower at
    MobileNet sizes.
    The input gradient is the same form on dy (correlation with the flipped kernel), which for
    7x7 kernels runs ~5x faster than the pads autodiff would derive from the taps."""
    return _depthwise_taps(x, k, strides, pads, dilation)


def _depthwise_fwd(x, k, strides, pads, dilation):
    return _depthwise_taps(x, k, strides, pads, dilation), (x, k)


def _depthwise_bwd(strides, pads, dilation, res, dy):
    x, k = res
    (kh, kw, _, c_out), (n, h, w, c_in) = k.shape, x.shape
    (sh, sw), (dh, _), (ho, wo) = strides, dilation, dy.shape[1:3]
    # input gradient: dy, dilated by the stride and padded, correlated tap by tap with the
    # flipped kernel; a channel multiplier's outputs add up into their input channel
    (top, bottom), (left, right) = _input_gradient_pads((h, w), (kh, kw), (ho, wo), strides, pads,
                                                        dilation)
    dy_full = jax.lax.pad(dy, jnp.zeros((), dy.dtype), (
        (0, 0, 0), (top, bottom, sh - 1), (left, right, sw - 1), (0, 0, 0)))
    dx = _depthwise_taps(dy_full, jnp.flip(k, (0, 1)), (1, 1), ((0, 0), (0, 0)), dilation)
    dx = dx.reshape(n, h, w, c_in, c_out // c_in).sum(-1).astype(x.dtype)
    # kernel gradient: per tap, the sum of its input window times dy; in bands of output rows
    # small enough to stay in cache (summed over the whole batch at once, XLA:CPU writes every
    # tap's window out to memory first: 4-5x slower at MobileNetV2's early sizes)
    acc = jnp.promote_types(k.dtype, jnp.float32)
    xp, _ = _padded_for_taps(x, k, strides, pads, dilation)
    per_row = n * wo * c_out * kh * kw
    band = ho if jax.default_backend() != 'cpu' else max(   # bands are for a CPU's cache
        d for d in range(1, ho + 1) if ho % d == 0 and (d == 1 or d * per_row <= _BAND_ELEMENTS))
    rows_in = (band - 1) * sh + (kh - 1) * dh + 1

    def band_sums(r):
        xs = jax.lax.dynamic_slice_in_dim(xp, r * band * sh, rows_in, 1)
        dys = jax.lax.dynamic_slice_in_dim(dy, r * band, band, 1).astype(acc)
        return jnp.stack([jnp.sum(window.astype(acc) * dys, axis=(0, 1, 2)) for _, _, window
                          in _tap_windows(xs, (kh, kw), (band, wo), strides, dilation)])
    if band == ho:
        dk = band_sums(0)
    else:
        dk = jax.lax.scan(lambda total, r: (total + band_sums(r), None),
                          jnp.zeros((kh * kw, c_out), acc), jnp.arange(ho // band))[0]
    dk = dk.reshape(kh, kw, 1, c_out).astype(k.dtype)
    return dx, dk


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def _small_map(in_hw, out_hw, kernel_hw, dilation) -> bool:
    """Whether the input or the output is smaller than the (dilated) kernel in some dimension.
    XLA then makes the smaller operand the kernel (for the forward convolution, or for its input
    gradient, whose input is dy) and runs the result as a plain loop: on this CPU a 3x3
    convolution of 8x2x2x512 takes 68 ms where the same work as a product takes 5 ms."""
    return any(i < (k - 1) * d + 1 or o < (k - 1) * d + 1
               for i, o, k, d in zip(in_hw, out_hw, kernel_hw, dilation))


def _live_outputs(tap, dil, stride, n_out, lo, size):
    """Along one axis, the first and last output whose input through kernel tap ``tap`` lies
    inside the input rather than in its padding (first > last: none does)."""
    offset = tap * dil - lo                   # the input index output 0 reads through the tap
    return max(0, -(offset // stride)), min(n_out - 1, (size - 1 - offset) // stride)


def _padding_share(in_hw, out_hw, kernel_hw, strides, pads, dilation) -> float:
    """The share of a convolution's multiply-adds that fall on its zero padding."""
    live = 1
    for size, n_out, kk, s, (lo, _), d in zip(in_hw, out_hw, kernel_hw, strides, pads, dilation):
        live *= sum(max(0, last - first + 1) for first, last in
                    (_live_outputs(t, d, s, n_out, lo, size) for t in range(kk)))
    return 1 - live / (np.prod(kernel_hw) * np.prod(out_hw))


# _padded_taps is used from this many input channels and this padding share on. ResNet-18's 3x3
# convolutions on 4x4 maps (512 channels, 31 % padding) and the strided one into them run faster
# as tap products (python -m jaxcnn.experiments.conv_kernels_cpu, with and without
# --xla-padded-maps; BENCHMARKS.md); in trials, with 128 channels on 4x4 maps, or 16-18 % padding
# on 7x7 and 8x8 maps, the separate products cost as much as they saved or more.
_TAP_MIN_CHANNELS = 256
_TAP_MIN_PADDING_SHARE = 0.25


def _tap_products(x, k, strides, pads, dilation, precision):
    """A dense convolution as the sum over kernel taps of the input window each tap sees times
    its rows of the kernel, each product over only the outputs whose input through that tap is
    inside the image: the work on zero padding is left out. The sum of the products is element-
    wise, which XLA would recompute in every consumer it fuses into; the caller stores it."""
    kh, kw, c_in, c_out = k.shape
    n, h, w, _ = x.shape
    ho, wo = _output_hw((h, w), pads, (kh, kw), strides, dilation)
    out_dtype = jnp.result_type(x.dtype, k.dtype)
    acc = jnp.promote_types(out_dtype, jnp.float32)
    y = jnp.zeros((n, ho, wo, c_out), acc)
    (sh, sw), (dh, dw_), (top_pad, left_pad) = strides, dilation, (pads[0][0], pads[1][0])
    for i in range(kh):
        r0, r1 = _live_outputs(i, dh, sh, ho, top_pad, h)
        for j in range(kw):
            c0, c1 = _live_outputs(j, dw_, sw, wo, left_pad, w)
            if r0 > r1 or c0 > c1:
                continue
            top, left = r0 * sh + i * dh - top_pad, c0 * sw + j * dw_ - left_pad
            window = jax.lax.slice(x, (0, top, left, 0), (n, top + (r1 - r0) * sh + 1,
                                                          left + (c1 - c0) * sw + 1, c_in),
                                   (1, sh, sw, 1))
            tap = jax.lax.dot_general(window, k[i, j], (((3,), (0,)), ((), ())),
                                      precision=precision, preferred_element_type=acc)
            y = y + jax.lax.pad(tap, jnp.zeros((), acc), ((0, 0, 0), (r0, ho - 1 - r1, 0),
                                                          (c0, wo - 1 - c1, 0), (0, 0, 0)))
    return y.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _padded_taps(x, k, strides, pads, dilation, precision, in_loop):
    """:func:`_tap_products`, whose input gradient is the same form (on dy, with the kernel's
    rows transposed) and whose kernel gradient is XLA's convolution, which runs faster than one
    product per tap (inside loops: :func:`_dense_kernel_gradient`)."""
    return _stored(_tap_products(x, k, strides, pads, dilation, precision))


def _padded_taps_fwd(x, k, strides, pads, dilation, precision, in_loop):
    return _padded_taps(x, k, strides, pads, dilation, precision, in_loop), (x, k)


def _padded_taps_bwd(strides, pads, dilation, precision, in_loop, res, dy):
    x, k = res
    # the transposed products, summed into the input's shape (and stored, as the output is);
    # the forward products this vjp traces are unused and compiled away
    dx = _stored(jax.vjp(lambda x: _tap_products(x, k, strides, pads, dilation, precision), x)[1](dy)[0])
    if in_loop:
        return dx, _dense_kernel_gradient(x, dy, k.shape[:2], strides, pads, dilation, precision)
    dk = jax.vjp(lambda k: jax.lax.conv_general_dilated(
        x, k, strides, pads, rhs_dilation=dilation, dimension_numbers=_NHWC,
        precision=precision), k)[1](dy)[0]
    return dx, dk


_padded_taps.defvjp(_padded_taps_fwd, _padded_taps_bwd)


def _conv_as_product(x, k, strides, pads, dilation, out_hw, precision):
    """A dense convolution as one matrix product: the input windows of its kernel taps side by
    side along channels (im2col) times the kernel's rows. Taps whose window lies wholly in the
    padding are left out (on a 1x1 map a padded 3x3 convolution is its centre tap). Plain lax ops,
    so every transformation applies; the gradients are products too."""
    kh, kw, c_in, c_out = k.shape
    (h, w), (sh, sw), (dh, dw_) = x.shape[1:3], strides, dilation
    (ho, wo) = out_hw
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))

    def live(*axis):                                  # some output sees a real input through it
        first, last = _live_outputs(*axis)
        return first <= last
    windows, rows = [], []
    for i, j, window in _tap_windows(xp, (kh, kw), (ho, wo), strides, dilation):
        if live(i, dh, sh, ho, pads[0][0], h) and live(j, dw_, sw, wo, pads[1][0], w):
            windows.append(window)
            rows.append(k[i, j])
    out_dtype = jnp.result_type(x.dtype, k.dtype)
    if not windows:                                   # no output sees the input
        return jnp.zeros((x.shape[0], ho, wo, c_out), out_dtype)
    acc = jnp.promote_types(out_dtype, jnp.float32)
    y = jax.lax.dot_general(jnp.concatenate(windows, axis=3), jnp.concatenate(rows, axis=0),
                            (((3,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=acc)
    return y.astype(out_dtype)


def _onednn_applies(x, k, pads) -> bool:
    """Whether :func:`onednn.conv` takes this dense convolution: float32, non-negative padding,
    a non-empty batch, and one device (XLA's partitioner cannot split a foreign call by batch; it
    would gather the whole batch onto every device)."""
    return (x.dtype == k.dtype == jnp.float32 and min(min(p) for p in pads) >= 0
            and min(x.shape) > 0 and min(k.shape) > 0 and jax.device_count() == 1
            and onednn.available())


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` whose gradients XLA:CPU also runs fast inside loops.

    Differentiating a convolution gives two more convolutions with batch and channel roles
    swapped. XLA:CPU rewrites those into the NHWC form its fast kernels take, but not inside a
    loop body, where they fall back to a slow loop (measured on 6-layer stacks, batch 32: 3x3
    convolutions trained 35x slower scanned than unrolled, depthwise 7x7 40x slower). For
    convolutions traced under :func:`loop_body` this function, on the CPU backend, states the
    input gradient as a plain NHWC (grouped) convolution and the kernel gradient as one NHWC
    convolution (dense) or one product per kernel tap (grouped, depthwise), in a custom VJP
    with the same numbers. Elsewhere (other backends, unrolled convolutions, input dilation,
    arrays on meshes with Explicit axes) it is ``lax.conv_general_dilated``. (The per-tap form
    would also speed up unrolled grouped convolutions' kernel gradient ~10x, but adds ~40 % to
    their compile time, so it is kept to loops.) On the CPU, in loops or not, dense float32
    convolutions on one device are oneDNN's (:func:`onednn.conv`; ResNet-18's take a quarter
    less time than XLA's) where it could be built. Depthwise convolutions are the per-tap sums
    of :func:`_depthwise` instead, and, without oneDNN, dense convolutions on maps smaller than
    their kernel (:func:`_small_map`) one matrix product (:func:`_conv_as_product`),
    and those with many channels and much of their kernel on padding one product per tap over
    the outputs it sees inside the input (:func:`_padded_taps`). The custom VJPs support reverse
    mode only; trace inside ``switches(CPU_GRADIENT_FORMS=False)`` for forward mode.
    """
    nd = len(window_strides)
    plain = (nd == 2 and not kwargs and not _explicitly_sharded(lhs) and not any(d != 1 for d in (lhs_dilation or (1,) * nd))
             and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    cpu_forms = plain and CPU_GRADIENT_FORMS and jax.default_backend() == 'cpu'
    dilation = tuple(rhs_dilation or (1, 1))
    depthwise = 1 < feature_group_count == lhs.shape[3] and rhs.shape[2] == 1
    if depthwise and ((cpu_forms and CPU_DEPTHWISE_TAPS) or (
            plain and GPU_DEPTHWISE_TAPS and jax.default_backend() == 'gpu')):
        pads = _explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], window_strides, dilation)
        return _depthwise(lhs, rhs, tuple(window_strides), pads, dilation)
    if cpu_forms and feature_group_count == 1:
        pads = _explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], window_strides, dilation)
        out_hw = _output_hw(lhs.shape[1:3], pads, rhs.shape[:2], window_strides, dilation)
        if min(out_hw) > 0:               # an empty output is lax's to make
            if CPU_ONEDNN_CONVOLUTIONS and _onednn_applies(lhs, rhs, pads):
                return onednn.conv(lhs, rhs, tuple(window_strides), dilation, pads)
            if CPU_SMALL_MAP_PRODUCTS and _small_map(lhs.shape[1:3], out_hw, rhs.shape[:2], dilation):
                return _conv_as_product(lhs, rhs, tuple(window_strides), pads, dilation, out_hw,
                                        precision)
            if (CPU_PADDED_TAP_PRODUCTS and lhs.shape[3] >= _TAP_MIN_CHANNELS
                    and _padding_share(lhs.shape[1:3], out_hw, rhs.shape[:2], window_strides, pads,
                                       dilation) >= _TAP_MIN_PADDING_SHARE):
                return _padded_taps(lhs, rhs, tuple(window_strides), pads, dilation, precision,
                                    _IN_LOOP.get())
    if not (cpu_forms and _IN_LOOP.get()):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                            rhs_dilation, dimension_numbers, feature_group_count,
                                            precision=precision, **kwargs)
    pads = _explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], window_strides, dilation)
    return _conv_canonical_grads(lhs, rhs, tuple(window_strides), pads, dilation,
                                 feature_group_count, precision)


def conv2d(features: int, kernel_size: Union[int, Sequence[int]] = 3, stride=1, *,
           padding: Any = 'torch', groups: int = 1, dilation=1, use_bias: bool = False,
           dtype=None, param_dtype=jnp.float32, kernel_init=he_normal_fan_out,
           name: Optional[str] = None) -> nn.Conv:
    """A 2-D convolution (NHWC, HWIO kernel). ``groups == in_channels`` makes it depthwise."""
    return nn.Conv(features, _pair(kernel_size), strides=_pair(stride),
                   padding=resolve_padding(padding, kernel_size, dilation),
                   kernel_dilation=_pair(dilation), feature_group_count=groups,
                   use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                   kernel_init=kernel_init, conv_general_dilated=conv_general_dilated, name=name)


def depthwise_conv2d(channels: int, kernel_size=3, stride=1, **kwargs) -> nn.Conv:
    """Depthwise convolution: one filter per input channel."""
    return conv2d(channels, kernel_size, stride, groups=channels, **kwargs)


def max_pool(x, window=3, stride=2, padding='torch'):
    """Max pooling with the same padding conventions as :func:`conv2d`.

    PyTorch pads max-pool with -inf, which is what ``nn.max_pool`` does with explicit pads.
    On the CPU backend it is the maximum of the window's strided slices, with a custom VJP that
    sends each output's gradient to the first input (row-major in the window) holding the
    maximum, as PyTorch does. XLA:CPU runs ``reduce_window``'s gradient as an argmax over four
    index tensors; with this form ResNet-18's training step (batch 32, 112 px) takes 635 ms
    instead of 680 ms (``python -m jaxcnn.experiments.maxpool_form_cpu``).
    Traced inside ``switches(CPU_GRADIENT_FORMS=False)`` it is ``nn.max_pool``.
    """
    window, stride = _pair(window), _pair(stride)
    padding = resolve_padding(padding, window)
    if not (CPU_GRADIENT_FORMS and jax.default_backend() == 'cpu'
            and jnp.issubdtype(x.dtype, jnp.floating) and x.ndim == 4):
        return nn.max_pool(x, window, stride, padding)
    pads = _explicit_pads(padding, x.shape[1:3], window, stride, (1, 1))
    return _max_pool_taps(x, window, stride, pads)


def _pool_windows(x, window, stride, pads):
    """The -inf padded input and, per window tap (row-major), its (offset, strided slice)."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw) = window, stride
    ho, wo = _output_hw((h, w), pads, window, stride)
    xp = jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype),
                     ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    taps = [((i, j), jax.lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                                   (1, sh, sw, 1)))
            for i in range(kh) for j in range(kw)]
    return xp, taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_taps(x, window, stride, pads):
    _, taps = _pool_windows(x, window, stride, pads)
    return functools.reduce(jnp.maximum, [t for _, t in taps])


def _max_pool_fwd(x, window, stride, pads):
    y = _max_pool_taps(x, window, stride, pads)
    return y, (x, y)


def _max_pool_bwd(window, stride, pads, res, dy):
    x, y = res
    xp, taps = _pool_windows(x, window, stride, pads)
    (sh, sw), hp, wp = stride, xp.shape[1], xp.shape[2]
    span_h, span_w = sh * (y.shape[1] - 1) + 1, sw * (y.shape[2] - 1) + 1
    free = jnp.ones(y.shape, bool)          # outputs whose gradient is not yet given to an input
    dxp = jnp.zeros(xp.shape, dy.dtype)
    for (i, j), t in taps:
        hit = free & (t == y)
        free = free & ~hit
        # scatter back to the tap's strided positions: interior padding by stride - 1
        dxp = dxp + jax.lax.pad(jnp.where(hit, dy, 0).astype(dy.dtype), jnp.zeros((), dy.dtype),
                                ((0, 0, 0), (i, hp - i - span_h, sh - 1),
                                 (j, wp - j - span_w, sw - 1), (0, 0, 0)))
    (top, _), (left, _) = pads
    return (dxp[:, top:top + x.shape[1], left:left + x.shape[2]],)


_max_pool_taps.defvjp(_max_pool_fwd, _max_pool_bwd)


def avg_pool(x, window=2, stride=2, padding='valid', count_include_pad=True):
    return nn.avg_pool(x, _pair(window), _pair(stride), resolve_padding(padding, window),
                       count_include_pad=count_include_pad)



def _adaptive_matrix(n_in: int, n_out: int) -> np.ndarray:
    # PyTorch's bins: output j averages input [floor(j n_in / n_out), ceil((j + 1) n_in / n_out))
    m = np.zeros((n_out, n_in), np.float32)
    for j in range(n_out):
        lo, hi = (j * n_in) // n_out, -(-((j + 1) * n_in) // n_out)
        m[j, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x, output_size):
    """``torch.nn.AdaptiveAvgPool2d`` on NHWC: any input size to ``output_size`` bins
    (a 1x1 map is replicated, as torchvision's AlexNet/VGG do at small inputs)."""
    oh, ow = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * 2
    if x.shape[1:3] == (oh, ow):
        return x
    mh, mw = _adaptive_matrix(x.shape[1], oh), _adaptive_matrix(x.shape[2], ow)
    y = jnp.einsum('ih,nhwc,jw->nijc', mh, x.astype(jnp.float32), mw,
                   precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def ceil_mode_padding(size: int, window: int, stride: int) -> Tuple[int, int]:
    """(0, extra) padding that makes an unpadded pool give PyTorch's ``ceil_mode=True`` size
    (Caffe's rounding, used by ZFNet and NiN)."""
    out = -(-(size - window) // stride) + 1
    if (out - 1) * stride >= size:      # PyTorch drops a last window that starts past the input
        out -= 1
    return 0, max((out - 1) * stride + window - size, 0)


def ceil_max_pool(x, window=3, stride=2):
    pads = tuple(ceil_mode_padding(s, window, stride) for s in x.shape[1:3])
    return max_pool(x, window, stride, padding=pads)   # pads with -inf: never selected


def global_avg_pool(x):
    """Mean over H and W, accumulated in float32 for bf16 inputs."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def channel_shuffle(x, groups: int):
    """ShuffleNet's channel shuffle: (g, c/g) -> (c/g, g) interleave of the channel axis."""
    n, h, w, c = x.shape
    return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    """Round channels to a multiple of ``divisor`` without dropping more than 10 % (MobileNet rule)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def check_image_batch(x, min_size: int = 1, model: str = 'model'):
    """Fail with one readable line for inputs that are not an NHWC batch."""
    shape = getattr(x, 'shape', None)
    if shape is None or len(shape) != 4:
        raise ValueError(f'{model} expects an NHWC image batch (N, H, W, C), got shape {shape}; '
                         'add a batch axis with x[None] or move channels last')
    if shape[1] < min_size or shape[2] < min_size:
        raise ValueError(f'{model} needs inputs of at least {min_size}x{min_size}, got '
                         f'{shape[1]}x{shape[2]}; resize or pad the images')
