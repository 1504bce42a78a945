"""XLA:CPU forms of convolutions: the same numbers as ``lax.conv_general_dilated``, stated in
shapes XLA:CPU runs fast. Each is chosen by the kernel policy (:mod:`jaxcnn.kernels`), and each
keeps every mode of differentiation: the forms with their own gradients are
:func:`~jaxcnn.kernels.autodiff.convolution_triple`\\ s, the rest plain lax. The measurements
that keep them are in BENCHMARKS.md ("Kernel forms on the CPU").

All functions take NHWC inputs, HWIO kernels and explicit ``pads`` ((top, bottom), (left, right)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .autodiff import convolution_triple

NHWC = ('NHWC', 'HWIO', 'NHWC')


@functools.lru_cache(maxsize=None)
def host() -> dict:
    """The host CPU as records name it: its model name and widest vector unit ('avx512', 'avx2'
    or ''), read from Linux's /proc/cpuinfo (empty elsewhere). Which forms win depends on it:
    oneDNN's kernels are tuned for AVX-512 (BENCHMARKS.md, "Kernel forms on the CPU")."""
    try:
        with open('/proc/cpuinfo') as f:
            text = f.read()
    except OSError:
        return {'model': '', 'vector_unit': ''}
    model = next(
        (
            line.split(':', 1)[1].strip()
            for line in text.splitlines()
            if line.startswith('model name')
        ),
        '',
    )
    flags = set(
        next(
            (
                line.split(':', 1)[1].split()
                for line in text.splitlines()
                if line.startswith('flags')
            ),
            [],
        )
    )
    unit = 'avx512' if 'avx512f' in flags else 'avx2' if 'avx2' in flags else ''
    return {'model': model, 'vector_unit': unit}


def output_hw(in_hw, pads, kernel_hw, strides, dilation=(1, 1)):
    """The spatial size of a convolution's output."""
    return tuple(
        (i + lo + hi - (k - 1) * d - 1) // s + 1
        for i, (lo, hi), k, d, s in zip(in_hw, pads, kernel_hw, dilation, strides)
    )


def explicit_pads(padding, in_hw, kernel_hw, strides, dilation):
    if isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_hw, dilation)]
        return tuple(tuple(p) for p in jax.lax.padtype_to_pads(in_hw, dilated, strides, padding))
    return tuple(tuple(int(v) for v in p) for p in padding)


def _pad(x, pads):
    return jax.lax.pad(
        x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0))
    )


def _tap_windows(xp, kernel_hw, out_hw, strides, dilation):
    """(i, j, the strided window of the padded input that kernel tap (i, j) sees)."""
    (kh, kw), (ho, wo), (sh, sw), (dh, dw_) = kernel_hw, out_hw, strides, dilation
    n, c = xp.shape[0], xp.shape[3]
    for i in range(kh):
        for j in range(kw):
            yield (
                i,
                j,
                jax.lax.slice(
                    xp,
                    (0, i * dh, j * dw_, 0),
                    (n, i * dh + sh * (ho - 1) + 1, j * dw_ + sw * (wo - 1) + 1, c),
                    (1, sh, sw, 1),
                ),
            )


def _input_gradient_pads(x_hw, kernel_hw, dy_hw, strides, pads, dilation):
    """Padding of dy, dilated by the stride, whose correlation with the flipped kernel is the
    input gradient (rows and columns the strided window never reaches get zeros)."""
    out = []
    for size, kk, o, s, (lo, hi), d in zip(x_hw, kernel_hw, dy_hw, strides, pads, dilation):
        rest = size + lo + hi - (kk - 1) * d - 1 - s * (o - 1)
        out.append((d * (kk - 1) - lo, d * (kk - 1) - hi + rest))
    return tuple(out)


# -- convolutions inside loops -------------------------------------------------------------------
# Differentiating a convolution gives two more with batch and channel roles swapped. XLA:CPU
# rewrites those into the NHWC form its fast kernels take, but not inside a loop body (a scanned
# stage, a reversible sequence), where they run as a slow generic loop. This triple states both
# gradients as NHWC convolutions (dense) or one product per kernel tap (grouped).


@functools.lru_cache(maxsize=1024)
def loop_triple(x_shape, k_shape, strides, pads, dilation, groups, precision):
    (kh, kw, cg, c_out), (n, h, w, _) = k_shape, x_shape
    og = c_out // groups
    ho, wo = output_hw((h, w), pads, (kh, kw), strides, dilation)

    def forward(x, k):
        return jax.lax.conv_general_dilated(
            x,
            k,
            strides,
            pads,
            rhs_dilation=dilation,
            dimension_numbers=NHWC,
            feature_group_count=groups,
            precision=precision,
        )

    def input_gradient(dy, k):
        # dy (dilated by the stride) correlated with the flipped kernel, its in and out channels
        # swapped within each group
        flipped = jnp.flip(k, (0, 1)).reshape(kh, kw, cg, groups, og).transpose(0, 1, 4, 3, 2)
        return jax.lax.conv_general_dilated(
            dy,
            flipped.reshape(kh, kw, og, groups * cg),
            (1, 1),
            _input_gradient_pads((h, w), (kh, kw), (ho, wo), strides, pads, dilation),
            lhs_dilation=strides,
            rhs_dilation=dilation,
            dimension_numbers=NHWC,
            feature_group_count=groups,
            precision=precision,
        )

    def kernel_gradient(x, dy):
        xp = _pad(x, pads)
        if groups == 1:
            # with batch and channels swapped (C, H, W, N), an NHWC convolution of the padded
            # input by dy (dilated by the stride), strided by the dilation
            dk = jax.lax.conv_general_dilated(
                xp.transpose(3, 1, 2, 0),
                dy.transpose(1, 2, 0, 3),
                dilation,
                'VALID',
                rhs_dilation=strides,
                dimension_numbers=NHWC,
                precision=precision,
            )
            return dk[:, :kh, :kw].transpose(1, 2, 0, 3)
        # grouped: one product per kernel tap of the window it sees and dy, summed over the batch
        # and positions within each group
        dy_g = dy.reshape(n, ho, wo, groups, og)
        acc = jnp.promote_types(k_dtype(x, dy), jnp.float32)  # accumulate as convolutions do
        taps = []
        for _, _, window in _tap_windows(xp, (kh, kw), (ho, wo), strides, dilation):
            window = window.reshape(n, ho, wo, groups, cg)
            taps.append(
                jnp.einsum(
                    'nhwgc,nhwgo->cgo',
                    window,
                    dy_g,
                    precision=precision,
                    preferred_element_type=acc,
                ).reshape(cg, c_out)
            )
        return jnp.stack(taps).reshape(kh, kw, cg, c_out).astype(k_dtype(x, dy))

    return convolution_triple(forward, input_gradient, kernel_gradient, 'cpu.loop_conv')


def k_dtype(x, dy):
    return jnp.result_type(x.dtype, dy.dtype)


# -- depthwise convolutions ----------------------------------------------------------------------
# XLA:CPU runs depthwise convolutions through its grouped-convolution kernels, 10-40x slower than
# PyTorch's at MobileNet sizes. As the sum over kernel taps of the strided input window times the
# tap's per-channel weights, XLA fuses them into one loop.

_BAND_ELEMENTS = 1 << 22  # products per band of the kernel gradient (a few MB)


def _padded_for_taps(x, c_out, pads):
    """The zero-padded input, each channel repeated once per output channel it feeds (the
    channel multiplier)."""
    c_in = x.shape[3]
    xp = _pad(x, pads)
    return jnp.repeat(xp, c_out // c_in, axis=3) if c_out != c_in else xp


def _depthwise_taps(x, k, strides, pads, dilation):
    acc = jnp.promote_types(x.dtype, jnp.float32)  # accumulate in fp32 (or wider), as convs do
    out_hw = output_hw(x.shape[1:3], pads, k.shape[:2], strides, dilation)
    y = None
    for i, j, window in _tap_windows(
        _padded_for_taps(x, k.shape[3], pads), k.shape[:2], out_hw, strides, dilation
    ):
        tap = window.astype(acc) * k[i, j, 0].astype(acc)
        y = tap if y is None else y + tap
    return y.astype(jnp.result_type(x.dtype, k.dtype))


@functools.lru_cache(maxsize=1024)
def depthwise_triple(x_shape, k_shape, strides, pads, dilation, banded):
    """The depthwise convolution and its gradients as tap sums. The input gradient is the same
    form on dy (correlation with the flipped kernel), ~5x faster for 7x7 kernels than what
    autodiff derives from the taps; the kernel gradient sums each tap's window times dy in bands
    of output rows small enough to stay in a CPU's cache (``banded``; summed over the whole batch
    at once, XLA:CPU writes every window out first, 4-5x slower at MobileNetV2's early sizes)."""
    (kh, kw, _, c_out), (n, h, w, c_in) = k_shape, x_shape
    (sh, sw), (dh, _) = strides, dilation
    ho, wo = output_hw((h, w), pads, (kh, kw), strides, dilation)

    def forward(x, k):
        return _depthwise_taps(x, k, strides, pads, dilation)

    def input_gradient(dy, k):
        (top, bottom), (left, right) = _input_gradient_pads(
            (h, w), (kh, kw), (ho, wo), strides, pads, dilation
        )
        dy_full = jax.lax.pad(
            dy,
            jnp.zeros((), dy.dtype),
            ((0, 0, 0), (top, bottom, sh - 1), (left, right, sw - 1), (0, 0, 0)),
        )
        dx = _depthwise_taps(dy_full, jnp.flip(k, (0, 1)), (1, 1), ((0, 0), (0, 0)), dilation)
        # a channel multiplier's outputs add up into their input channel
        return dx.reshape(n, h, w, c_in, c_out // c_in).sum(-1).astype(jnp.result_type(dy, k))

    def kernel_gradient(x, dy):
        acc = jnp.promote_types(k_dtype(x, dy), jnp.float32)
        xp = _padded_for_taps(x, c_out, pads)
        per_row = n * wo * c_out * kh * kw
        band = (
            max(
                d
                for d in range(1, ho + 1)
                if ho % d == 0 and (d == 1 or d * per_row <= _BAND_ELEMENTS)
            )
            if banded
            else ho
        )
        rows_in = (band - 1) * sh + (kh - 1) * dh + 1

        def band_sums(r):
            xs = jax.lax.dynamic_slice_in_dim(xp, r * band * sh, rows_in, 1)
            dys = jax.lax.dynamic_slice_in_dim(dy, r * band, band, 1).astype(acc)
            return jnp.stack(
                [
                    jnp.sum(window.astype(acc) * dys, axis=(0, 1, 2))
                    for _, _, window in _tap_windows(xs, (kh, kw), (band, wo), strides, dilation)
                ]
            )

        if band == ho:
            dk = band_sums(0)
        else:
            dk = jax.lax.scan(
                lambda total, r: (total + band_sums(r), None),
                jnp.zeros((kh * kw, c_out), acc),
                jnp.arange(ho // band),
            )[0]
        return dk.reshape(kh, kw, 1, c_out).astype(k_dtype(x, dy))

    return convolution_triple(forward, input_gradient, kernel_gradient, 'cpu.depthwise_taps')


# -- feature maps smaller than the kernel --------------------------------------------------------


def small_map(in_hw, out_hw, kernel_hw, dilation) -> bool:
    """Whether the input or the output is smaller than the (dilated) kernel in some dimension.
    XLA then makes the smaller operand the kernel (for the forward convolution, or for its input
    gradient, whose input is dy) and runs the result as a plain loop: on the 2-core machine a 3x3
    convolution of 8x2x2x512 takes 68 ms where the same work as a product takes 5 ms."""
    return any(
        i < (k - 1) * d + 1 or o < (k - 1) * d + 1
        for i, o, k, d in zip(in_hw, out_hw, kernel_hw, dilation)
    )


def _live_outputs(tap, dil, stride, n_out, lo, size):
    """Along one axis, the first and last output whose input through kernel tap ``tap`` lies
    inside the input rather than in its padding (first > last: none does)."""
    offset = tap * dil - lo  # the input index output 0 reads through the tap
    return max(0, -(offset // stride)), min(n_out - 1, (size - 1 - offset) // stride)


def conv_as_product(x, k, strides, pads, dilation, precision):
    """A dense convolution as one matrix product: the input windows of its kernel taps side by
    side along channels (im2col) times the kernel's rows. Taps whose window lies wholly in the
    padding are left out (on a 1x1 map a padded 3x3 convolution is its centre tap). Plain lax
    ops: every transformation applies, and the gradients are products too."""
    kh, kw, _, c_out = k.shape
    (h, w), (sh, sw), (dh, dw_) = x.shape[1:3], strides, dilation
    ho, wo = output_hw((h, w), pads, (kh, kw), strides, dilation)

    def live(*axis):  # some output sees a real input through it
        first, last = _live_outputs(*axis)
        return first <= last

    windows, rows = [], []
    for i, j, window in _tap_windows(_pad(x, pads), (kh, kw), (ho, wo), strides, dilation):
        if live(i, dh, sh, ho, pads[0][0], h) and live(j, dw_, sw, wo, pads[1][0], w):
            windows.append(window)
            rows.append(k[i, j])
    out_dtype = jnp.result_type(x.dtype, k.dtype)
    if not windows:  # no output sees the input
        return jnp.zeros((x.shape[0], ho, wo, c_out), out_dtype)
    acc = jnp.promote_types(out_dtype, jnp.float32)
    y = jax.lax.dot_general(
        jnp.concatenate(windows, axis=3),
        jnp.concatenate(rows, axis=0),
        (((3,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=acc,
    )
    return y.astype(out_dtype)


# -- block outputs -------------------------------------------------------------------------------


def stored(x):
    """``x``, written to memory once for all its readers.

    XLA fuses an element-wise producer into each consumer that reads it, recomputing it there.
    Down a chain of residual sums (x1 = relu(x0 + f(x0)), x2 = relu(x1 + g(x1)), ...) every later
    block's output is element-wise in all earlier ones, and the transposes that lay out each
    convolution's input for its kernel gradient recompute the whole chain, reading every operand
    in strided order: unrolled ResNet-152 spent 4.4 s of a 5.2 s CPU training step in them. A
    conditional on a predicate XLA cannot fold (always true: x == x or x != x) is a boundary no
    fusion crosses; its identity branch costs no copy. Plain lax: every transformation applies.
    """
    if x.size == 0:
        return x
    first = x[(0,) * x.ndim]
    always = (first == first) | (first != first)
    return jax.lax.cond(always, lambda v: v, lambda v: -v, x)


# -- XLA:CPU options -----------------------------------------------------------------------------
# XLA:CPU hands convolutions to YNNPACK by default. On the 2-core machine YNNPACK runs dense
# convolutions slower than XLA's Eigen ones but depthwise ones faster, and XLA has no
# per-operation switch. So a step without depthwise convolutions keeps YNNPACK's other default
# fusions (dots, reductions) and leaves its convolutions to Eigen; a step with them keeps the
# defaults. (With depthwise_taps on, depthwise convolutions are tap sums, not convolutions.)
DENSE_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'
}


@functools.lru_cache(maxsize=None)
def accepted(options: tuple) -> bool:
    """Whether this XLA takes the options (an older or newer one may not know them)."""
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile(compiler_options=dict(options))
    except Exception:  # noqa: BLE001  (XLA raises a backend-specific error for unknown options)
        return False
    return True


def sub_jaxprs(values):
    """The jaxprs inside an equation's parameters (scan, cond, custom_jvp and pjit bodies)."""
    for v in values:
        if hasattr(v, 'eqns'):
            yield v
        elif hasattr(getattr(v, 'jaxpr', None), 'eqns'):
            yield v.jaxpr
        elif isinstance(v, (tuple, list)):
            yield from sub_jaxprs(v)


def has_depthwise_conv(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'conv_general_dilated' and eqn.params['feature_group_count'] > 1:
            in_per_group = eqn.invars[1].aval.shape[eqn.params['dimension_numbers'].rhs_spec[1]]
            if in_per_group == 1:
                return True
        if any(has_depthwise_conv(sub) for sub in sub_jaxprs(eqn.params.values())):
            return True
    return False
