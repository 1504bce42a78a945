"""Layers whose convolution weights are computed, not stored: CondConv, dynamic filters.

CondConv (Yang et al. 2019, "CondConv: Conditionally Parameterized Convolutions", eq. 1):
  each sample gets the kernel ``sum_e r_e(x) W_e``, a mixture of ``num_experts`` expert kernels
  with routing weights ``r(x) = sigmoid(FC(GAP(x)))``. :class:`CondConv` takes the routing
  weights as an argument (timm's ``CondConv2d(x, routing_weights)``: EfficientNet-CondConv
  blocks compute them once from the block input and share them between the block's three
  convolutions, see :class:`CondConvRouting`), or computes them itself when called without.

Dynamic filter networks (Jia, De Brabandere et al. 2016, "Dynamic Filter Networks", §3): a
filter-generating network conditioned on the input produces the filters.
  * :class:`DynamicConv` - dynamic convolutional layer (§3.2): one filter per sample, applied
    like an ordinary convolution to that sample (Klein et al. 2015's dynamic convolution).
  * :class:`DynamicLocalFilter` - dynamic local filtering layer (§3.2): one filter per sample
    *and* position, a weighted sum over the K x K neighbourhood of each pixel (:func:`local_filter`).

Static hypernetwork (Ha, Dai & Le 2016, "HyperNetworks", §3.1 eq. 2-3): conv kernels made from
learned layer embeddings by one small generator shared by all layers.
  * :class:`HyperKernelGenerator` - g(z): z -> a 16 x 16 (basic block) f x f kernel.
  * :class:`HyperConv` - a conv whose (16 a) x (16 b) kernel is tiled from a x b basic kernels,
    each g(z_ij) of its own embedding z_ij (eq. 3).

Every per-sample kernel goes through :func:`per_sample_conv`: B convolutions with B different
kernels, as kh x kw shifted batched matmuls (or as one grouped convolution with the batch folded
into the channel groups, ``method='grouped'``).
"""

import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .conv import _pair, he_normal_fan_out, resolve_padding


# ---------------------------------------------------------------------------------------------
# Per-sample convolution


def _explicit_padding(padding, spatial, kernel_size, stride, dilation):
    """((lo, hi), (lo, hi)) for any padding spec of :func:`jaxcnn.layers.conv2d` ('same' is
    TensorFlow's: the odd extra pixel goes bottom/right, as ``lax`` pads 'SAME')."""
    ks, ds = _pair(kernel_size), _pair(dilation)
    pad = resolve_padding(padding, ks, dilation)
    if isinstance(pad, str):
        window = tuple(d * (k - 1) + 1 for k, d in zip(ks, ds))
        pad = jax.lax.padtype_to_pads(spatial, window, _pair(stride), pad)
    return tuple(tuple(p) for p in pad)


def per_sample_conv(
    x,
    kernels,
    stride=1,
    padding: Any = 'torch',
    dilation=1,
    groups: int = 1,
    precision=None,
    method: str = 'shift',
):
    """Convolve sample ``b`` of ``x`` with its own kernel ``kernels[b]``.

    x: (B, H, W, C_in) NHWC; kernels: (B, kh, kw, C_in // groups, C_out) (HWIO per sample).
    padding: as :func:`jaxcnn.layers.conv2d` ('torch', 'same', 'valid', int or pairs).
    Returns (B, H', W', C_out). Two exact implementations:

    * 'shift' (default): for each of the kh x kw taps, the shifted (strided) input times that
      tap's per-sample C_in x C_out matrix, accumulated - batched matmuls only.
    * 'grouped': one convolution of a (1, H, W, B * C_in) input with ``B * groups`` feature
      groups, so sample b's channels only meet sample b's kernel (what ``jax.vmap`` of a conv
      and timm's CondConv2d do). XLA:CPU differentiates such a convolution ~100x slower than
      'shift' (6.6 s vs 0.055 s for a 32 x 28 x 28 x 16 -> 16 3x3 backward pass).
    """
    b, h, w, c = x.shape
    kb, kh, kw, ci, co = kernels.shape
    if kb != b:
        raise ValueError(f'per_sample_conv: {b} samples but {kb} kernels')
    if c != ci * groups or co % groups:
        raise ValueError(
            f'per_sample_conv: input has {c} channels, kernel expects {ci} x {groups} '
            f'groups (and {co} outputs must divide into the groups)'
        )
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    pads = _explicit_padding(padding, (h, w), (kh, kw), stride, dilation)
    if method not in ('shift', 'grouped'):
        raise ValueError(f"per_sample_conv: method must be 'shift' or 'grouped', got {method!r}")
    if method == 'grouped' or b == 1:  # (a batch of one is an ordinary convolution)
        lhs = jnp.transpose(x, (1, 2, 0, 3)).reshape(1, h, w, b * c)
        rhs = jnp.transpose(kernels, (1, 2, 3, 0, 4)).reshape(kh, kw, ci, b * co)
        y = jax.lax.conv_general_dilated(
            lhs,
            rhs,
            (sh, sw),
            pads,
            rhs_dilation=(dh, dw),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            feature_group_count=b * groups,
            precision=precision,
        )
        _, ho, wo, _ = y.shape
        return jnp.transpose(y.reshape(ho, wo, b, co), (2, 0, 1, 3))
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    ho = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    k = kernels.reshape(b, kh, kw, ci, groups, co // groups)
    y = 0
    for u in range(kh):
        for v in range(kw):
            tap = xp[
                :,
                u * dh : u * dh + (ho - 1) * sh + 1 : sh,
                v * dw : v * dw + (wo - 1) * sw + 1 : sw,
                :,
            ]
            tap = tap.reshape(b, ho, wo, groups, ci)
            y = y + jnp.einsum('bhwgc,bcgo->bhwgo', tap, k[:, u, v], precision=precision)
    return y.reshape(b, ho, wo, co)


def _per_expert(init):
    """Apply a kernel initialiser to each expert's (kh, kw, in, out) slice separately, so fans
    are those of one expert kernel, not of the stacked array."""

    def expert_init(key, shape, dtype=jnp.float32):
        keys = jax.random.split(key, shape[0])
        return jax.vmap(lambda k: init(k, tuple(shape[1:]), dtype))(keys)

    return expert_init


# ---------------------------------------------------------------------------------------------
# CondConv


class CondConvRouting(nn.Module):
    """CondConv's routing function r(x) = sigmoid(FC(GAP(x))): (B, H, W, C) -> (B, E).

    The FC is ``fc`` (kernel (C, E) + bias), timm's ``routing_fn`` (nn.Linear, weight transposed).
    An EfficientNet-CondConv block (timm's ``CondConvResidual``) routes once from its input and
    shares the weights between its convolutions (norms and activations omitted)::

        r = CondConvRouting(E, name='routing_fn')(x)
        h = CondConv(mid, 1, num_experts=E, name='conv_pw')(x, r)
        h = CondConv(mid, 3, stride, 'same', groups=mid, num_experts=E, name='conv_dw')(h, r)
        h = CondConv(out, 1, num_experts=E, name='conv_pwl')(h, r)
    """

    num_experts: int
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pooled = jnp.mean(x, axis=(1, 2), dtype=jnp.promote_types(x.dtype, jnp.float32)).astype(
            x.dtype
        )
        logits = nn.Dense(
            self.num_experts, dtype=self.dtype, param_dtype=self.param_dtype, name='fc'
        )(pooled)
        return nn.sigmoid(logits)


class CondConv(nn.Module):
    """Conditionally parameterised convolution: per-sample kernel ``sum_e r_e W_e``.

    Drop-in for :func:`jaxcnn.layers.conv2d` (same arguments, NHWC in and out) plus
    ``num_experts``. Call as ``CondConv(...)(x, routing_weights)`` with routing weights of shape
    (B, num_experts) shared with other layers, or as ``CondConv(...)(x)`` to route internally
    through a :class:`CondConvRouting` submodule named ``routing`` (then E x (C_in + 1) more
    parameters).

    Parameters: ``kernel`` (E, kh, kw, C_in // groups, C_out) - each expert an HWIO kernel -
    and, with ``use_bias``, ``bias`` (E, C_out) mixed by the same weights. timm's
    ``CondConv2d.weight`` is (E, C_out * C_in/groups * kh * kw), each row an OIHW kernel
    flattened: :func:`condconv_kernel_from_timm` converts it. Each expert is initialised as a
    separate kernel with ``kernel_init`` (He fan-out by default).
    """

    features: int
    kernel_size: Union[int, Sequence[int]] = 3
    stride: Union[int, Sequence[int]] = 1
    padding: Any = 'torch'
    dilation: Union[int, Sequence[int]] = 1
    groups: int = 1
    num_experts: int = 4
    use_bias: bool = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Any = he_normal_fan_out
    precision: Any = None
    method: str = 'shift'  # per_sample_conv's implementation: 'shift' | 'grouped'

    @nn.compact
    def __call__(self, x, routing_weights=None):
        c_in = x.shape[-1]
        if c_in % self.groups or self.features % self.groups:
            raise ValueError(
                f'CondConv: {c_in} inputs / {self.features} outputs do not divide '
                f'into {self.groups} groups'
            )
        if routing_weights is None:
            routing_weights = CondConvRouting(
                self.num_experts, dtype=self.dtype, param_dtype=self.param_dtype, name='routing'
            )(x)
        if routing_weights.shape != (x.shape[0], self.num_experts):
            raise ValueError(
                f'CondConv: routing weights must be (batch, {self.num_experts}), '
                f'got {routing_weights.shape}'
            )
        kh, kw = _pair(self.kernel_size)
        kernel = self.param(
            'kernel',
            _per_expert(self.kernel_init),
            (self.num_experts, kh, kw, c_in // self.groups, self.features),
            self.param_dtype,
        )
        bias = (
            self.param(
                'bias', nn.initializers.zeros, (self.num_experts, self.features), self.param_dtype
            )
            if self.use_bias
            else None
        )
        x, kernel, bias, routing_weights = nn.dtypes.promote_dtype(
            x, kernel, bias, routing_weights, dtype=self.dtype
        )
        mixed = jnp.einsum('be,ehwio->bhwio', routing_weights, kernel, precision=self.precision)
        y = per_sample_conv(
            x,
            mixed,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            precision=self.precision,
            method=self.method,
        )
        if bias is not None:
            y = y + jnp.einsum('be,eo->bo', routing_weights, bias)[:, None, None, :]
        return y


def condconv_kernel_from_timm(weight, out_channels: int, in_per_group: int, kernel_size):
    """timm ``CondConv2d.weight`` (E, O * I * kh * kw) -> :class:`CondConv` ``kernel``
    (E, kh, kw, I, O). ``in_per_group`` is C_in // groups."""
    kh, kw = _pair(kernel_size)
    w = np.asarray(weight)
    w = w.reshape(w.shape[0], out_channels, in_per_group, kh, kw)
    return np.transpose(w, (0, 3, 4, 2, 1))


def condconv_param_count(
    in_channels: int,
    out_channels: int,
    kernel_size,
    num_experts: int,
    groups: int = 1,
    use_bias: bool = False,
    routing: bool = False,
) -> int:
    """Parameters of one CondConv layer (Yang et al. 2019 eq. 1): E expert kernels (+ E biases),
    plus the routing FC (C_in x E + E) when it is counted with the layer."""
    kh, kw = _pair(kernel_size)
    n = num_experts * out_channels * (in_channels // groups) * kh * kw
    n += num_experts * out_channels if use_bias else 0
    n += (in_channels + 1) * num_experts if routing else 0
    return n


# ---------------------------------------------------------------------------------------------
# Dynamic filter networks


def local_filter(x, filters, kernel_size, dilation=1, padding: Any = 'torch'):
    """Dynamic local filtering: ``y[b, i, j, c] = sum_{u, v} f[b, i, j, u, v(, c)] x[b, i+u, j+v, c]``.

    x: (B, H, W, C). filters: (B, H', W', kh * kw) - one filter per sample and output position,
    shared by all channels (DFN §3.2) - or (B, H', W', kh * kw, C), one per channel too.
    Taps are ordered row-major over the (kh, kw) window, whose top-left corner for output
    (i, j) is input (i - pad_top, j - pad_left) (stride 1: H' = H with 'torch' padding).
    Computed as kh * kw shifted multiply-adds: no (B, H, W, C, kh * kw) patch tensor.
    """
    kh, kw = _pair(kernel_size)
    dh, dw = _pair(dilation)
    b, h, w, c = x.shape
    pad = _explicit_padding(padding, (h, w), (kh, kw), 1, dilation)
    xp = jnp.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    ho, wo = xp.shape[1] - dh * (kh - 1), xp.shape[2] - dw * (kw - 1)
    if filters.shape[:4] != (b, ho, wo, kh * kw):
        raise ValueError(
            f'local_filter: filters must be ({b}, {ho}, {wo}, {kh * kw}[, {c}]), '
            f'got {filters.shape}'
        )
    per_channel = filters.ndim == 5
    out = 0
    for u in range(kh):
        for v in range(kw):
            patch = xp[:, u * dh : u * dh + ho, v * dw : v * dw + wo, :]
            f = filters[:, :, :, u * kw + v]
            out = out + patch * (f if per_channel else f[..., None])
    return out


def _kernel_bias_init(kernel_shape, init=he_normal_fan_out):
    """Initialise a flat generator bias as a (kh, kw, in, out) kernel: at init the generated
    kernel is an ordinary He-initialised one plus a small input-dependent part."""

    def bias_init(key, shape, dtype=jnp.float32):
        return init(key, kernel_shape, dtype).reshape(shape)

    return bias_init


class DynamicConv(nn.Module):
    """Dynamic convolution (DFN §3.2, dynamic convolutional layer): a filter-generating network
    maps each sample to its own kernel, which then convolves that sample (:func:`per_sample_conv`).

    Filter-generating network: GAP(cond) -> ``gen_fc1`` (hidden) -> ReLU -> ``gen_fc2``
    (kh * kw * C_in/groups * features), reshaped to an HWIO kernel. ``cond`` is the
    conditioning input, the layer's own input by default (it may be any NHWC map with the
    same batch, or a (B, D) vector). The bias of ``gen_fc2`` is the sample-independent part of
    the kernel and starts as a He-initialised kernel; ``gen_fc2``'s weights start small
    (``gen_init_scale``), so the layer starts as an ordinary convolution.

    Parameters: D * hidden + hidden (fc1) + (hidden + 1) * kh * kw * C_in/groups * features
    (fc2), + features with ``use_bias`` (a static bias).
    """

    features: int
    kernel_size: Union[int, Sequence[int]] = 3
    stride: Union[int, Sequence[int]] = 1
    padding: Any = 'torch'
    dilation: Union[int, Sequence[int]] = 1
    groups: int = 1
    hidden: int = 16
    use_bias: bool = False
    gen_init_scale: float = 0.1
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32
    precision: Any = None
    method: str = 'shift'  # per_sample_conv's implementation: 'shift' | 'grouped'

    @nn.compact
    def __call__(self, x, cond=None):
        cond = x if cond is None else cond
        if cond.ndim == 4:
            cond = jnp.mean(
                cond, axis=(1, 2), dtype=jnp.promote_types(cond.dtype, jnp.float32)
            ).astype(cond.dtype)
        kh, kw = _pair(self.kernel_size)
        c_in = x.shape[-1]
        if c_in % self.groups or self.features % self.groups:
            raise ValueError(
                f'DynamicConv: {c_in} inputs / {self.features} outputs do not divide '
                f'into {self.groups} groups'
            )
        kshape = (kh, kw, c_in // self.groups, self.features)
        kw_ = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.relu(nn.Dense(self.hidden, name='gen_fc1', **kw_)(cond))
        scale = self.gen_init_scale * np.sqrt(2.0 / math.prod(kshape[:3]))
        flat = nn.Dense(
            math.prod(kshape),
            name='gen_fc2',
            kernel_init=nn.initializers.normal(scale / np.sqrt(self.hidden)),
            bias_init=_kernel_bias_init(kshape),
            **kw_,
        )(h)
        kernels = flat.reshape((x.shape[0],) + kshape)
        x, kernels = nn.dtypes.promote_dtype(x, kernels, dtype=self.dtype)
        y = per_sample_conv(
            x,
            kernels,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            precision=self.precision,
            method=self.method,
        )
        if self.use_bias:
            y = y + self.param(
                'bias', nn.initializers.zeros, (self.features,), self.param_dtype
            ).astype(y.dtype)
        return y


class DynamicLocalFilter(nn.Module):
    """Dynamic local filtering (DFN §3.2): a filter per sample and pixel, applied to the pixel's
    K x K neighbourhood (:func:`local_filter`), then optionally a 1x1 convolution.

    Filter-generating network (fully convolutional, on ``cond``, the input by default):
    ``gen_conv1`` 3x3 (hidden, bias) -> ReLU -> ``gen_conv2`` 1x1 (K*K, or K*K*C with
    ``per_channel``, bias), normalised over the K*K taps by a softmax (``normalize='softmax'``,
    as DFN does for its prediction tasks; 'none' leaves them free). With ``features`` a 1x1
    convolution ``pointwise`` (no bias) maps C -> features, which makes the layer a drop-in for
    a K x K convolution (stride 1) - a dynamic depthwise-separable convolution.
    """

    kernel_size: int = 3
    features: Optional[int] = None
    hidden: int = 16
    dilation: int = 1
    per_channel: bool = False
    normalize: str = 'softmax'
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond=None):
        cond = x if cond is None else cond
        if cond.shape[:3] != x.shape[:3]:
            raise ValueError(
                f'DynamicLocalFilter: conditioning map {cond.shape} must share '
                f'batch and spatial size with the input {x.shape}'
            )
        k, c = self.kernel_size, x.shape[-1]
        taps = k * k
        kw_ = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.relu(
            nn.Conv(self.hidden, (3, 3), padding=((1, 1), (1, 1)), name='gen_conv1', **kw_)(cond)
        )
        f = nn.Conv(taps * (c if self.per_channel else 1), (1, 1), name='gen_conv2', **kw_)(h)
        if self.per_channel:
            f = f.reshape(f.shape[:3] + (taps, c))
        if self.normalize == 'softmax':
            f = jax.nn.softmax(f.astype(jnp.promote_types(f.dtype, jnp.float32)), axis=3).astype(
                f.dtype
            )
        elif self.normalize != 'none':
            raise ValueError(f"normalize must be 'softmax' or 'none', got {self.normalize!r}")
        x, f = nn.dtypes.promote_dtype(x, f, dtype=self.dtype)
        y = local_filter(x, f, k, self.dilation)
        if self.features is not None:
            y = nn.Conv(
                self.features,
                (1, 1),
                use_bias=False,
                kernel_init=he_normal_fan_out,
                name='pointwise',
                **kw_,
            )(y)
        return y


# ---------------------------------------------------------------------------------------------
# Static hypernetwork


class HyperKernelGenerator(nn.Module):
    """The static hypernetwork g of Ha et al. 2016, eq. 2: a two-layer linear network shared
    by every generated layer, mapping an embedding z (N_z) to one basic kernel.

        a_i = W_i z + B_i                  i = 1..in_size   (W_i: d x N_z, B_i: d)
        K_i = <W_out, a_i> + B_out         (W_out: f x out_size f x d, B_out: f x out_size f)
        K   = (K_1 ... K_in_size)          -> returned as an HWIO (f, f, in_size, out_size) kernel

    Both layers are ``nn.DenseGeneral``: ``fc1`` (kernel (N_z, in_size, d) = the W_i side by
    side, bias (in_size, d) = the B_i) and ``fc2`` (kernel (d, f, f, out_size) = W_out, bias
    (f, f, out_size) = B_out): d (N_z + 1) in_size + f^2 out_size (d + 1) parameters, the
    paper's count. Any leading axes of z are kept: (..., N_z) -> (..., f, f, in, out).
    Initialised so that z ~ N(0, 1) gives kernels of He fan-in scale for a basic block.
    """

    z_dim: int = 64
    hidden: int = 64  # the paper's d (= N_z in its experiments)
    kernel_size: int = 3
    in_size: int = 16
    out_size: int = 16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        f, d = self.kernel_size, self.hidden
        z = jnp.asarray(z, self.param_dtype)
        a = nn.DenseGeneral(
            (self.in_size, d),
            param_dtype=self.param_dtype,
            name='fc1',
            kernel_init=nn.initializers.normal(1.0 / np.sqrt(self.z_dim)),
        )(z)
        std = np.sqrt(2.0 / (f * f * self.in_size) / d)
        k = nn.DenseGeneral(
            (f, f, self.out_size),
            param_dtype=self.param_dtype,
            name='fc2',
            kernel_init=nn.initializers.normal(std),
        )(a)  # (..., in, f, f, out)
        return jnp.moveaxis(k, -4, -2)


class HyperConv(nn.Module):
    """A convolution whose kernel is generated by a shared :class:`HyperKernelGenerator`.

    Call as ``HyperConv(features, ...)(x, generator)``. A (16 a in) x (16 b out) kernel is
    tiled from a x b basic kernels (Ha et al. eq. 3: row blocks over input channels, column
    blocks over output channels), each from its own embedding: the parameter ``z`` of shape
    (a, b, N_z) is the layer's only weight, plus ``bias`` (features) with ``use_bias``.
    Channels must be multiples of the generator's basic size. The kernel is generated in the
    parameter dtype and cast to ``dtype`` for the convolution.

    ``fan_in_scale``: multiply the tiled kernel by the constant sqrt(in_size / C_in). The
    generator is shared by layers of different fan-in, so without it a layer tiled from ``a``
    row blocks starts with ``a`` times the weight variance of a basic kernel and the activations
    of a deep pre-activation net grow by that factor per layer (inference with fresh BatchNorm
    statistics overflows float32 by depth 40). Not in Ha et al.'s eq. 2; a fixed factor, not a
    parameter (as the He constant of Karras et al.'s equalised learning rate).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Any = 'torch'
    use_bias: bool = False
    fan_in_scale: bool = True
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, generator: HyperKernelGenerator):
        c_in, bi, bo = x.shape[-1], generator.in_size, generator.out_size
        if c_in % bi or self.features % bo or generator.kernel_size != self.kernel_size:
            raise ValueError(
                f'HyperConv: a {c_in} -> {self.features} {self.kernel_size}x'
                f'{self.kernel_size} kernel cannot be tiled from {bi} x {bo} '
                f'{generator.kernel_size}x{generator.kernel_size} basic kernels'
            )
        a, b = c_in // bi, self.features // bo
        z = self.param('z', nn.initializers.normal(1.0), (a, b, generator.z_dim), self.param_dtype)
        kernel = self.generate(z, generator)
        if self.fan_in_scale:
            kernel = kernel * np.sqrt(bi / c_in).astype(kernel.dtype)
        y = jax.lax.conv_general_dilated(
            *nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype),
            _pair(self.stride),
            resolve_padding(self.padding, self.kernel_size),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        )
        if self.use_bias:
            y = y + self.param(
                'bias', nn.initializers.zeros, (self.features,), self.param_dtype
            ).astype(y.dtype)
        return y

    @staticmethod
    def generate(z, generator):
        """Embeddings (a, b, N_z) -> the tiled HWIO kernel (f, f, a * in_size, b * out_size)."""
        a, b = z.shape[:2]
        basic = generator(z)  # (a, b, f, f, in, out)
        f, bi, bo = basic.shape[2], basic.shape[4], basic.shape[5]
        return jnp.transpose(basic, (2, 3, 0, 4, 1, 5)).reshape(f, f, a * bi, b * bo)
