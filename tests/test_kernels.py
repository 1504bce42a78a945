"""The kernel policy (jaxcnn/kernels): every form gives lax's convolution, PyTorch's gradients,
and every mode of differentiation; the policy is set and restored by its context manager."""

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxcnn import kernels, layers
from jaxcnn.kernels import autodiff
from jaxcnn.kernels import cpu as cpu_forms

RNG = np.random.RandomState(0)
DN = ('NHWC', 'HWIO', 'NHWC')


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def _close(got, want, rtol=1e-4):
    """Equal up to float32 rounding, against the array's scale (sums of hundreds of products
    round differently in each form's order)."""
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(
            g, e, rtol=rtol, atol=rtol * max(1.0, float(jnp.max(jnp.abs(e))))
        )


@pytest.mark.parametrize(
    'k,s,d,size,padding,groups,cout',
    [
        (3, 1, 1, 9, 'torch', 1, 6),
        (3, 2, 1, 10, 'torch', 1, 6),
        (3, 2, 1, 11, 'torch', 1, 6),
        (7, 2, 1, 16, 'torch', 1, 6),
        (1, 2, 1, 7, 'torch', 1, 6),
        (3, 1, 2, 11, 'torch', 1, 6),
        (5, 3, 2, 17, 'torch', 1, 6),
        (3, 2, 1, 10, 'same', 1, 6),
        (4, 4, 1, 14, 'same', 1, 6),
        (3, 2, 1, 9, ((0, 2), (1, 0)), 1, 6),
        # maps smaller than the kernel (without oneDNN one matrix product): 2x2 and 1x1 maps, 4 -> 2
        # strided, a valid 5x5 on 5x5 (LeNet's C5), a 7x7 stem on 6x6, a dilated 3x3 on 3x3
        (3, 1, 1, 2, 'torch', 1, 6),
        (3, 1, 1, 1, 'torch', 1, 6),
        (3, 2, 1, 4, 'torch', 1, 6),
        (5, 1, 1, 5, ((0, 0), (0, 0)), 1, 6),
        (7, 2, 1, 6, 'torch', 1, 6),
        (3, 1, 2, 3, 'torch', 1, 6),
        # much of the kernel on padding: 3x3 on 4x4, 7 -> 4 strided, a dilated 3x3 on 5x5, one-sided
        (3, 1, 1, 4, 'torch', 1, 6),
        (3, 2, 1, 7, 'torch', 1, 6),
        (3, 1, 2, 5, 'torch', 1, 6),
        (3, 1, 1, 4, ((0, 2), (2, 1)), 1, 6),
        # grouped, depthwise, depthwise with channel multiplier 2 (12 input channels throughout)
        (3, 1, 1, 9, 'torch', 2, 6),
        (3, 2, 2, 13, 'torch', 2, 6),
        (3, 2, 1, 11, 'torch', 6, 12),
        (5, 2, 1, 12, 'same', 12, 12),
        (7, 1, 1, 10, 'torch', 12, 12),
        (3, 1, 1, 8, 'torch', 12, 24),
    ],
)
@pytest.mark.parametrize('in_loop', [True, False])
@pytest.mark.parametrize('onednn', [True, False])
def test_conv_forms_match_pytorch_autograd(k, s, d, size, padding, groups, cout, in_loop, onednn):
    """Under the CPU policy conv2d runs dense convolutions through oneDNN (or without it as
    products on small maps), depthwise ones as tap sums, and in loops restates the gradients; the
    output and both gradients must equal PyTorch's, here for a loss sum(y * r)."""
    cin = 12
    x = RNG.randn(2, cin, size, size).astype(np.float32)
    w = RNG.randn(cout, cin // groups, k, k).astype(np.float32)
    conv = layers.conv2d(cout, k, s, dilation=d, padding=padding, groups=groups)
    pads = conv.padding
    if pads == 'SAME':
        pads = jax.lax.padtype_to_pads((size, size), ((k - 1) * d + 1,) * 2, (s, s), 'SAME')
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    yt = F.conv2d(F.pad(xt, (*pads[1], *pads[0])), wt, stride=s, dilation=d, groups=groups)
    r = RNG.randn(*yt.shape).astype(np.float32)
    (yt * torch.from_numpy(r)).sum().backward()

    def loss(kernel, x_nhwc):
        with (
            kernels.use(kernels.CPU, onednn=onednn),
            kernels.loop_body() if in_loop else contextlib.nullcontext(),
        ):
            y = conv.apply({'params': {'kernel': kernel}}, x_nhwc)
        return jnp.sum(y * jnp.asarray(r.transpose(0, 2, 3, 1))), y

    (_, y), (gk, gx) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
        jnp.asarray(w.transpose(2, 3, 1, 0)), jnp.asarray(x.transpose(0, 2, 3, 1))
    )
    np.testing.assert_allclose(nchw(y), yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(nchw(gx), xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(gk).transpose(3, 2, 0, 1), wt.grad.numpy(), rtol=1e-4, atol=1e-4
    )


def test_conv_gradients_inside_scan_match_unrolled_lax():
    """The same stack scanned (the policy's loop forms) and unrolled (plain lax)."""
    x = jnp.asarray(RNG.randn(2, 8, 8, 4), jnp.float32)
    ks = jnp.asarray(RNG.randn(3, 3, 3, 4, 4) * 0.3, jnp.float32)

    def scanned(ks, x):
        with kernels.use(kernels.CPU), kernels.loop_body():
            x, _ = jax.lax.scan(
                lambda h, k: (
                    jnp.tanh(
                        kernels.conv_general_dilated(h, k, (1, 1), 'SAME', dimension_numbers=DN)
                    ),
                    None,
                ),
                x,
                ks,
            )
        return jnp.sum(x**2)

    def unrolled(ks, x):
        for k in ks:
            x = jnp.tanh(jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=DN))
        return jnp.sum(x**2)

    _close(jax.jit(jax.grad(scanned, (0, 1)))(ks, x), jax.grad(unrolled, (0, 1))(ks, x))


# (name, policy changes, loop body, input shape, kernel shape, strides, pads, groups): one
# geometry per form of the CPU policy
FORMS = [
    ('onednn', {}, False, (2, 7, 7, 4), (3, 3, 4, 5), (2, 2), ((1, 1), (1, 1)), 1),
    ('depthwise taps', {}, False, (2, 7, 7, 4), (3, 3, 1, 8), (2, 2), ((1, 1), (1, 1)), 4),
    (
        'depthwise taps, one band per row',
        {'bands': 1},
        False,
        (2, 7, 7, 4),
        (3, 3, 1, 4),
        (1, 1),
        ((1, 1), (1, 1)),
        4,
    ),
    (
        'loop gradients, dense',
        {'onednn': False},
        True,
        (2, 7, 7, 4),
        (3, 3, 4, 5),
        (2, 2),
        ((1, 1), (1, 1)),
        1,
    ),
    ('loop gradients, grouped', {}, True, (2, 7, 7, 4), (3, 3, 2, 6), (1, 1), ((1, 0), (0, 1)), 2),
    (
        'small-map product',
        {'onednn': False},
        False,
        (2, 2, 2, 4),
        (3, 3, 4, 5),
        (1, 1),
        ((1, 1), (1, 1)),
        1,
    ),
]


@pytest.mark.parametrize(
    'name,changes,in_loop,x_shape,k_shape,strides,pads,groups', FORMS, ids=[f[0] for f in FORMS]
)
def test_every_form_keeps_every_mode_of_differentiation(
    name, changes, in_loop, x_shape, k_shape, strides, pads, groups, monkeypatch
):
    """jax.jvp, jax.linearize, forward-over-reverse Hessian-vector products, third-order reverse
    mode and vmap through each form equal the same transformations of lax's convolution, and the
    form is the one the policy names (no lax convolution left in its forward pass)."""
    changes = dict(changes)
    if 'bands' in changes:
        monkeypatch.setattr(cpu_forms, '_BAND_ELEMENTS', changes.pop('bands'))
    x = jnp.asarray(RNG.randn(*x_shape), jnp.float32)
    k = jnp.asarray(RNG.randn(*k_shape) * 0.3, jnp.float32)
    tx, tk = (jnp.asarray(RNG.randn(*a.shape), jnp.float32) for a in (x, k))

    def ours(x, k):
        with (
            kernels.use(kernels.CPU, **changes),
            kernels.loop_body() if in_loop else contextlib.nullcontext(),
        ):
            return kernels.conv_general_dilated(
                x, k, strides, pads, dimension_numbers=DN, feature_group_count=groups
            )

    def plain(x, k):
        return jax.lax.conv_general_dilated(
            x, k, strides, pads, dimension_numbers=DN, feature_group_count=groups
        )

    forward = str(jax.make_jaxpr(ours)(x, k))
    assert ('jaxcnn_bilinear' in forward) != ('dot_general' in forward), forward
    assert 'conv_general_dilated' not in forward

    def loss(conv, x, k):
        return jnp.sum(jnp.sin(conv(x, k)) ** 2)

    modes = {
        'jvp': lambda c: jax.jvp(functools.partial(loss, c), (x, k), (tx, tk)),
        'linearize': lambda c: jax.linearize(functools.partial(loss, c), x, k)[1](tx, tk),
        'hvp': lambda c: jax.jvp(jax.grad(functools.partial(loss, c), (0, 1)), (x, k), (tx, tk)),
        'third order': lambda c: jax.grad(
            lambda x: jnp.sum(
                jax.grad(lambda x: jnp.sum(jax.grad(functools.partial(loss, c))(x, k) ** 2))(x) ** 2
            )
        )(x),
        'vmap of grad': lambda c: jax.vmap(
            lambda t: jax.grad(functools.partial(loss, c), (0, 1))(x + 0.1 * t, k)
        )(jnp.stack([tx, -tx])),
    }
    for mode, run in modes.items():
        _close(jax.jit(lambda: run(ours))(), run(plain), rtol=2e-4)


def test_policy_is_set_for_a_block_and_restored():
    """use() applies to what is traced inside, nests, and restores the previous policy after the
    block (an error inside it included); an unknown field is one clear error."""
    base = kernels.current()
    assert base == kernels.default()
    assert kernels.default('cpu') == kernels.CPU and kernels.default('tpu') == kernels.PLAIN
    with kernels.use(kernels.PLAIN) as p:
        assert kernels.current() is p == kernels.PLAIN
        with kernels.use(depthwise_taps=True):
            assert kernels.current() == kernels.Policy(depthwise_taps=True)
        assert kernels.current() == kernels.PLAIN
    assert kernels.current() == base
    with pytest.raises(ZeroDivisionError):
        with kernels.use(onednn=False):
            1 / 0
    assert kernels.current() == base
    with pytest.raises(
        ValueError, match='unknown policy field .*depthwise_tap.*the fields are onednn'
    ):
        with kernels.use(depthwise_tap=True):
            pass
    with pytest.raises(ValueError, match="xla_options must be one of auto, defaults, dense"):
        kernels.Policy(xla_options='fast')
    # the plain policy is lax's convolution as the model states it
    x, k = jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 1, 4))
    with kernels.use(kernels.PLAIN):
        jaxpr = str(
            jax.make_jaxpr(
                lambda x: kernels.conv_general_dilated(
                    x, k, (1, 1), 'SAME', dimension_numbers=DN, feature_group_count=4
                )
            )(x)
        )
    assert 'conv_general_dilated' in jaxpr and 'custom_jvp' not in jaxpr


def test_linear_primitive_transposes_and_differentiates_in_its_residuals():
    """autodiff.linear with a hand-written transpose: grad in the linear operand uses it (here
    deliberately scaled by 2, to see which rule ran); derivatives in the residuals are JAX's own;
    vmap batches both."""
    a = jnp.asarray(RNG.randn(3, 4), jnp.float32)
    v = jnp.asarray(RNG.randn(4), jnp.float32)
    f = lambda a, v: autodiff.linear(lambda a, v: a @ v, lambda a, ct: 2 * (a.T @ ct), a, v)
    assert jnp.allclose(f(a, v), a @ v)
    # reverse mode in the linear operand runs the given transpose
    ct = jnp.asarray(RNG.randn(3), jnp.float32)
    np.testing.assert_allclose(jax.vjp(lambda v: f(a, v), v)[1](ct)[0], 2 * a.T @ ct, rtol=1e-6)
    # forward mode in the residual: d(a @ v) = da @ v
    da = jnp.asarray(RNG.randn(3, 4), jnp.float32)
    np.testing.assert_allclose(jax.jvp(lambda a: f(a, v), (a,), (da,))[1], da @ v, rtol=1e-5)
    # vmap over the linear operand and over the residual
    vs = jnp.stack([v, 2 * v])
    np.testing.assert_allclose(jax.vmap(lambda v: f(a, v))(vs), vs @ a.T, rtol=1e-5)
    np.testing.assert_allclose(
        jax.vmap(lambda v: jax.vjp(lambda v: f(a, v), v)[1](ct)[0])(vs),
        jnp.stack([2 * a.T @ ct] * 2),
        rtol=1e-6,
    )
    # reverse mode in the residual is JAX's own (its JVP, transposed): ct v^T
    np.testing.assert_allclose(jax.vjp(lambda a: f(a, v), a)[1](ct)[0], jnp.outer(ct, v), rtol=1e-6)


def test_depthwise_conv_runs_as_fused_taps(monkeypatch):
    """Under the CPU policy a depthwise convolution's step holds no convolution (XLA:CPU's grouped
    kernels are slow), with the kernel gradient summed in one pass or in bands of one output row."""
    x = jnp.asarray(RNG.randn(2, 11, 11, 6), jnp.float32)
    for band_elements in (None, 1):
        if band_elements:
            monkeypatch.setattr(cpu_forms, '_BAND_ELEMENTS', band_elements)
        for k, s, mult in ((3, 1, 1), (5, 2, 1), (3, 2, 2)):
            kern = jnp.asarray(RNG.randn(k, k, 1, 6 * mult), jnp.float32)

            def loss(conv, kern, x):
                with kernels.use(kernels.CPU):
                    y = conv(x, kern, (s, s), 'SAME', dimension_numbers=DN, feature_group_count=6)
                return jnp.sum(jnp.sin(y))

            ours = jax.jit(
                jax.value_and_grad(functools.partial(loss, kernels.conv_general_dilated), (0, 1))
            )
            assert 'convolution(' not in ours.lower(kern, x).compile().as_text()
            _close(
                ours(kern, x),
                jax.value_and_grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1))(
                    kern, x
                ),
            )


@pytest.mark.parametrize('taps', [True, False])
def test_gpu_policy_depthwise_taps(taps, monkeypatch):
    """The tap sums under a GPU policy (traced as if on a GPU): the whole kernel gradient in one
    pass (no bands off the CPU), equal to lax's convolution; without them, lax's convolution."""
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    monkeypatch.setattr(cpu_forms, '_BAND_ELEMENTS', 1)  # a CPU would use bands of one row
    x = jnp.asarray(RNG.randn(2, 9, 9, 6), jnp.float32)
    kern = jnp.asarray(RNG.randn(7, 7, 1, 6), jnp.float32)

    def loss(conv, kern, x):
        with kernels.use(kernels.GPU, depthwise_taps=taps):
            y = conv(x, kern, (2, 2), 'SAME', dimension_numbers=DN, feature_group_count=6)
        return jnp.sum(jnp.sin(y))

    ours = jax.value_and_grad(functools.partial(loss, kernels.conv_general_dilated), (0, 1))
    jaxpr = str(jax.make_jaxpr(ours)(kern, x))
    assert ('conv_general_dilated' not in jaxpr) == taps
    assert 'scan' not in jaxpr
    _close(
        jax.jit(ours)(kern, x),
        jax.value_and_grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1))(kern, x),
    )


def test_dense_conv_on_maps_smaller_than_the_kernel_is_one_product():
    """XLA:CPU runs a convolution whose input or output is smaller than its kernel as a slow
    loop; without oneDNN the CPU policy makes it one matrix product, leaving taps that only see
    padding out. Its step holds no convolution (an 8x8 map's still does)."""
    kern = jnp.asarray(RNG.randn(3, 3, 4, 5), jnp.float32)
    for size, stride, small in (
        (1, 1, True),
        (2, 1, True),
        (4, 2, True),
        (3, 1, False),
        (8, 1, False),
    ):
        x = jnp.asarray(RNG.randn(2, size, size, 4), jnp.float32)

        def loss(conv, kern, x):
            with kernels.use(kernels.CPU, onednn=False):
                y = conv(x, kern, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=DN)
            return jnp.sum(jnp.sin(y))

        ours = jax.jit(
            jax.value_and_grad(functools.partial(loss, kernels.conv_general_dilated), (0, 1))
        )
        assert ('convolution(' not in ours.lower(kern, x).compile().as_text()) == small, size
        _close(
            ours(kern, x),
            jax.value_and_grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1))(
                kern, x
            ),
        )
    # on a 1x1 map only the centre tap of a padded 3x3 kernel sees the input
    x = jnp.asarray(RNG.randn(2, 1, 1, 4), jnp.float32)
    with kernels.use(kernels.CPU, onednn=False):
        jaxpr = str(
            jax.make_jaxpr(
                lambda x: kernels.conv_general_dilated(
                    x, kern, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN
                )
            )(x)
        )
    assert 'f32[2,1,1,4]' in jaxpr and 'f32[2,1,1,36]' not in jaxpr


def ynn_convolutions(hlo: str) -> int:
    """Convolutions inside the computations that YNNPACK fusions call, in an HLO text dump."""
    called = set(re.findall(r'calls=(%[\w.\-]+)[^\n]*"kind":"__ynn_fusion"', hlo))
    bodies = re.findall(r'^(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}', hlo, re.S | re.M)
    return sum(body.count('convolution(') for name, body in bodies if name in called)


def test_compiler_options_move_dense_convolutions_off_ynnpack_only():
    """On the CPU a step without depthwise convolutions gets XLA's own convolutions (YNNPACK's
    other fusions stay), one with them keeps XLA's defaults, as do the 'defaults' option and
    other backends; results equal the default's."""
    x = jnp.asarray(RNG.randn(2, 16, 16, 32), jnp.float32)  # large enough for YNNPACK to take
    dense_k = jnp.asarray(RNG.randn(3, 3, 32, 32) * 0.1, jnp.float32)
    depth_k = jnp.asarray(RNG.randn(3, 3, 1, 32), jnp.float32)

    def dense(k, x):
        return jnp.sum(
            jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=DN) ** 2
        )

    def depthwise(k, x):
        return jnp.sum(
            jax.lax.conv_general_dilated(
                x, k, (1, 1), 'SAME', dimension_numbers=DN, feature_group_count=32
            )
            ** 2
        )

    assert kernels.compiler_options(depthwise, depth_k, x) == {}
    # found inside loop bodies too
    assert (
        kernels.compiler_options(
            lambda k, x: jax.lax.scan(
                lambda h, _: (h + depthwise(k, x), None), 0.0, None, length=2
            )[0],
            depth_k,
            x,
        )
        == {}
    )
    options = kernels.compiler_options(dense, dense_k, x)
    assert options and all(k.startswith('xla_cpu_') for k in options)
    with kernels.use(xla_options='defaults'):
        assert kernels.compiler_options(dense, dense_k, x) == {}
    with kernels.use(xla_options='dense'):
        assert kernels.compiler_options(depthwise, depth_k, x) == options
    compiled = jax.jit(jax.grad(dense), compiler_options=options).lower(dense_k, x).compile()
    default = jax.jit(jax.grad(dense)).lower(dense_k, x).compile()
    assert ynn_convolutions(default.as_text()) > 0  # what XLA:CPU does by default
    assert ynn_convolutions(compiled.as_text()) == 0
    assert 'convolution(' in compiled.as_text()
    np.testing.assert_allclose(compiled(dense_k, x), default(dense_k, x), rtol=1e-4, atol=1e-3)


def test_block_output_is_the_identity_under_every_transformation():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 3), np.float32))
    with kernels.use(kernels.CPU):
        f = lambda v: jnp.sum(jnp.sin(kernels.block_output(v)))
        assert 'cond' in str(jax.make_jaxpr(kernels.block_output)(x))
        np.testing.assert_array_equal(jax.jit(kernels.block_output)(x), x)
        np.testing.assert_allclose(jax.grad(f)(x), jnp.cos(x), rtol=1e-6)
        _, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
        np.testing.assert_allclose(tangent, jnp.sum(jnp.cos(x)), rtol=1e-5)
        np.testing.assert_array_equal(jax.vmap(kernels.block_output)(x), x)
        nan_first = x.at[0, 0, 0, 0].set(jnp.nan)  # the predicate reads the first element
        np.testing.assert_array_equal(jax.jit(kernels.block_output)(nan_first), nan_first)
        with kernels.loop_body():  # a loop carry is stored anyway
            assert kernels.block_output(x) is x
    with kernels.use(kernels.PLAIN):
        assert kernels.block_output(x) is x


def _fused_instructions(hlo_text):
    """Instructions inside the compiled module's fusions: what XLA computes, recomputation
    included."""
    count, inside = 0, False
    for line in hlo_text.splitlines():
        if re.match(r'^%\S*(fus|wrapped)', line):
            inside = True
        elif line.startswith('}'):
            inside = False
        elif inside and ' = ' in line and not re.search(r'parameter\(|constant\(', line):
            count += 1
    return count


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the boundary is a CPU-only measure')
def test_block_boundary_keeps_xla_from_recomputing_the_residual_chain():
    # Without the boundary XLA fuses every earlier block's element-wise work into each later
    # block's kernel-gradient transposes: the fused work grows with depth squared. With it,
    # each block's fused work is the same, so the total grows linearly.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 16), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 16, 16), np.float32) * 0.1)

    def loss(k, x, depth):
        for _ in range(depth):
            h = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=DN)
            x = kernels.block_output(jax.nn.relu(x + 0.5 * h + 0.1))
        return jnp.sum(x**2)

    def fused(depth, boundary):
        with kernels.use(kernels.CPU, block_boundary=boundary):
            grad = jax.jit(jax.grad(loss), static_argnums=2)
            return _fused_instructions(grad.lower(k, x, depth).compile().as_text())

    with_4, with_8, with_16 = (fused(d, True) for d in (4, 8, 16))
    assert with_16 - with_8 <= 1.1 * 2 * (with_8 - with_4)  # linear in depth
    assert with_16 < 0.5 * fused(16, False)
