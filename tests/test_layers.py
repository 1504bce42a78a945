"""Shared layers against PyTorch's implementations and the papers' formulas."""
import contextlib
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxcnn import layers
from jaxcnn.layers import conv as conv_layers

RNG = np.random.RandomState(0)


def nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def run_conv(conv, x_nchw, w_oihw, bias=None):
    params = {'kernel': jnp.asarray(w_oihw.transpose(2, 3, 1, 0))}
    if bias is not None:
        params['bias'] = jnp.asarray(bias)
    return nchw(conv.apply({'params': params}, nhwc(torch.from_numpy(x_nchw))))


@pytest.mark.parametrize('k,s,d,groups,size', [(3, 1, 1, 1, 9), (3, 2, 1, 1, 10), (7, 2, 1, 1, 16),
                                                (3, 2, 2, 1, 11), (3, 1, 1, 4, 8), (5, 2, 1, 8, 12)])
def test_torch_padding_matches_pytorch_conv(k, s, d, groups, size):
    cin, cout = 8, 8
    x = RNG.randn(2, cin, size, size).astype(np.float32)
    w = RNG.randn(cout, cin // groups, k, k).astype(np.float32)
    expected = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=s,
                        padding=d * (k - 1) // 2, dilation=d, groups=groups).numpy()
    got = run_conv(layers.conv2d(cout, k, s, dilation=d, groups=groups), x, w)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('k,s,d,size,padding,groups,cout', [
    (3, 1, 1, 9, 'torch', 1, 6), (3, 2, 1, 10, 'torch', 1, 6), (3, 2, 1, 11, 'torch', 1, 6),
    (7, 2, 1, 16, 'torch', 1, 6), (1, 2, 1, 7, 'torch', 1, 6), (3, 1, 2, 11, 'torch', 1, 6),
    (5, 3, 2, 17, 'torch', 1, 6), (3, 2, 1, 10, 'same', 1, 6), (4, 4, 1, 14, 'same', 1, 6),
    (3, 2, 1, 9, ((0, 2), (1, 0)), 1, 6),
    # maps smaller than the kernel (on the CPU one matrix product): 2x2 and 1x1 maps, 4 -> 2
    # strided, a valid 5x5 on 5x5 (LeNet's C5), a 7x7 stem on 6x6, a dilated 3x3 on 3x3
    (3, 1, 1, 2, 'torch', 1, 6), (3, 1, 1, 1, 'torch', 1, 6), (3, 2, 1, 4, 'torch', 1, 6),
    (5, 1, 1, 5, ((0, 0), (0, 0)), 1, 6), (7, 2, 1, 6, 'torch', 1, 6), (3, 1, 2, 3, 'torch', 1, 6),
    # much of the kernel on padding (on the CPU one product per tap, here at any channel count):
    # 3x3 on 4x4, 7 -> 4 strided, a dilated 3x3 on 5x5, one-sided padding
    (3, 1, 1, 4, 'torch', 1, 6), (3, 2, 1, 7, 'torch', 1, 6), (3, 1, 2, 5, 'torch', 1, 6),
    (3, 1, 1, 4, ((0, 2), (2, 1)), 1, 6),
    # grouped, depthwise, depthwise with channel multiplier 2 (12 input channels throughout)
    (3, 1, 1, 9, 'torch', 2, 6), (3, 2, 2, 13, 'torch', 2, 6), (3, 2, 1, 11, 'torch', 6, 12),
    (5, 2, 1, 12, 'same', 12, 12), (7, 1, 1, 10, 'torch', 12, 12), (3, 1, 1, 8, 'torch', 12, 24)])
@pytest.mark.parametrize('in_loop', [True, False])
@pytest.mark.parametrize('onednn', [True, False])
def test_conv_gradients_match_pytorch_autograd(k, s, d, size, padding, groups, cout, in_loop,
                                              onednn, monkeypatch):
    """On the CPU conv2d states its input and kernel gradients in forms XLA runs fast (inside
    scans; depthwise convolutions everywhere), and runs dense ones through oneDNN, or without it
    as products on small or much padded maps; the output and both gradients must equal
    PyTorch's, here for a loss sum(y * r)."""
    monkeypatch.setattr(conv_layers, '_TAP_MIN_CHANNELS', 1)    # the tap products at 12 channels
    monkeypatch.setattr(conv_layers, 'CPU_ONEDNN_CONVOLUTIONS', onednn)
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
        with (layers.loop_body() if in_loop else contextlib.nullcontext()):   # scanned blocks' forms
            y = conv.apply({'params': {'kernel': kernel}}, x_nhwc)
        return jnp.sum(y * jnp.asarray(r.transpose(0, 2, 3, 1))), y
    (_, y), (gk, gx) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
        jnp.asarray(w.transpose(2, 3, 1, 0)), jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(nchw(y), yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(nchw(gx), xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gk).transpose(3, 2, 0, 1), wt.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_conv_gradients_inside_scan_match_unrolled_lax():
    """The same stack scanned (this module's conv) and unrolled (plain lax.conv_general_dilated)."""
    x = jnp.asarray(RNG.randn(2, 8, 8, 4), jnp.float32)
    ks = jnp.asarray(RNG.randn(3, 3, 3, 4, 4) * 0.3, jnp.float32)

    def scanned(ks, x):
        with layers.loop_body():
            x, _ = jax.lax.scan(lambda h, k: (jnp.tanh(layers.conv_general_dilated(
                h, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))), None), x, ks)
        return jnp.sum(x ** 2)

    def unrolled(ks, x):
        for k in ks:
            x = jnp.tanh(jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
        return jnp.sum(x ** 2)
    got = jax.jit(jax.grad(scanned, (0, 1)))(ks, x)
    want = jax.grad(unrolled, (0, 1))(ks, x)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('k,s,size', [(3, 2, 10), (3, 2, 11), (5, 2, 16), (1, 2, 7), (4, 4, 14)])
def test_same_padding_matches_tensorflow_rule(k, s, size):
    """TF 'SAME': out = ceil(H / s); total pad = max((out - 1) s + k - H, 0), the odd pixel at the end."""
    x = RNG.randn(1, 4, size, size).astype(np.float32)
    w = RNG.randn(6, 4, k, k).astype(np.float32)
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    padded = F.pad(torch.from_numpy(x), (total // 2, total - total // 2, total // 2, total - total // 2))
    expected = F.conv2d(padded, torch.from_numpy(w), stride=s).numpy()
    got = run_conv(layers.conv2d(6, k, s, padding='same'), x, w)
    assert got.shape[-1] == out
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_depthwise_conv_is_one_filter_per_channel():
    x = RNG.randn(2, 6, 9, 9).astype(np.float32)
    w = RNG.randn(6, 1, 3, 3).astype(np.float32)
    expected = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1, groups=6).numpy()
    np.testing.assert_allclose(run_conv(layers.depthwise_conv2d(6, 3), x, w), expected, rtol=1e-4, atol=1e-4)


def test_max_pool_pads_with_minus_infinity_like_pytorch():
    x = -np.abs(RNG.randn(2, 3, 9, 9)).astype(np.float32) - 1
    expected = F.max_pool2d(torch.from_numpy(x), 3, 2, 1).numpy()
    np.testing.assert_array_equal(nchw(layers.max_pool(nhwc(torch.from_numpy(x)), 3, 2)), expected)


@pytest.mark.parametrize('window,stride,padding,ceil,size', [
    (3, 2, 1, False, 9), (3, 2, 1, False, 10), (2, 2, 0, False, 8), (3, 1, 1, False, 7),
    (3, 2, 0, True, 10), (3, 2, 0, True, 13), (5, 3, 2, False, 14)])
def test_max_pool_gradient_matches_pytorch_with_ties(window, stride, padding, ceil, size):
    """PyTorch gives each window's gradient to the first maximum in it; so must max_pool, whose
    CPU form has its own VJP. Rounding to halves makes ties common (ReLU's zeros do in nets)."""
    x = np.round(RNG.randn(2, 3, size, size) * 2).astype(np.float32) / 2
    r = RNG.randn(*F.max_pool2d(torch.from_numpy(x), window, stride, padding, ceil_mode=ceil).shape)
    xt = torch.tensor(x, requires_grad=True)
    yt = F.max_pool2d(xt, window, stride, padding, ceil_mode=ceil)
    (yt * torch.from_numpy(r.astype(np.float32))).sum().backward()

    def pool(v):
        if ceil:
            return layers.ceil_max_pool(v, window, stride)
        return layers.max_pool(v, window, stride, padding=padding)
    y, vjp = jax.vjp(pool, nhwc(torch.from_numpy(x)))
    np.testing.assert_array_equal(nchw(y), yt.detach().numpy())
    # equal up to the order of summing where windows overlap; a tie sent elsewhere is off by O(1)
    np.testing.assert_allclose(nchw(vjp(jnp.asarray(r.transpose(0, 2, 3, 1), jnp.float32))[0]),
                               xt.grad.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name,ref', [
    ('relu', F.relu), ('relu6', F.relu6), ('elu', F.elu), ('selu', F.selu), ('sigmoid', torch.sigmoid),
    ('tanh', torch.tanh), ('silu', F.silu), ('swish', F.silu), ('hard_swish', F.hardswish),
    ('hard_sigmoid', F.hardsigmoid), ('gelu', F.gelu), ('mish', F.mish),
    ('leaky_relu', F.leaky_relu), ('gelu_tanh', lambda t: F.gelu(t, approximate='tanh'))])
def test_activations_match_pytorch(name, ref):
    x = np.linspace(-8, 8, 1001).astype(np.float32)
    np.testing.assert_allclose(layers.get_act(name)(jnp.asarray(x)), ref(torch.from_numpy(x)).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_selu_constants_are_the_fixed_point():
    """SELU's (lambda, alpha) keep a unit Gaussian at mean 0, variance 1 (Klambauer et al. eq. 4-5)."""
    z = np.random.RandomState(1).randn(4_000_000)
    y = np.asarray(layers.selu(jnp.asarray(z)))
    assert abs(y.mean()) < 3e-3 and abs(y.var() - 1) < 3e-3


def test_maxout_and_prelu():
    x = RNG.randn(2, 3, 3, 6).astype(np.float32)
    np.testing.assert_array_equal(layers.maxout(jnp.asarray(x), 3), x.reshape(2, 3, 3, 2, 3).max(-1))
    with pytest.raises(ValueError, match='divisible'):
        layers.maxout(jnp.asarray(x), 4)
    p = layers.PReLU()
    v = p.init(jax.random.key(0), x)
    np.testing.assert_allclose(p.apply(v, x), np.where(x >= 0, x, 0.25 * x), rtol=1e-6)
    with pytest.raises(ValueError, match='unknown activation'):
        layers.get_act('relu7')


def test_local_response_norm_matches_pytorch():
    x = RNG.randn(2, 16, 5, 5).astype(np.float32) * 3
    expected = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(torch.from_numpy(x)).numpy()
    got = layers.LocalResponseNorm().apply({}, nhwc(torch.from_numpy(x)))
    np.testing.assert_allclose(nchw(got), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kind,ref', [
    ('layer', lambda t: F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), eps=1e-6).permute(0, 3, 1, 2)),
    ('group', lambda t: F.group_norm(t, 32, eps=1e-5)),
    ('instance', lambda t: F.instance_norm(t, eps=1e-5))])
def test_norms_match_pytorch(kind, ref):
    x = RNG.randn(2, 64, 6, 6).astype(np.float32) * 2 + 1
    norm = layers.Norm(kind)
    v = norm.init(jax.random.key(0), nhwc(torch.from_numpy(x)))
    np.testing.assert_allclose(nchw(norm.apply(v, nhwc(torch.from_numpy(x)))), ref(torch.from_numpy(x)).numpy(),
                               rtol=1e-4, atol=1e-4)


def test_batchnorm_train_and_eval_follow_pytorch():
    x = RNG.randn(8, 5, 4, 4).astype(np.float32) * 2 + 3
    tbn = torch.nn.BatchNorm2d(5)
    norm = layers.Norm('batch')
    v = norm.init(jax.random.key(0), nhwc(torch.from_numpy(x)))
    y, upd = norm.apply(v, nhwc(torch.from_numpy(x)), train=True, mutable=['batch_stats'])
    ty = tbn.train()(torch.from_numpy(x))
    np.testing.assert_allclose(nchw(y), ty.detach().numpy(), rtol=1e-4, atol=1e-4)
    # running mean moves 10 % of the way, as PyTorch's momentum=0.1
    np.testing.assert_allclose(upd['batch_stats']['bn']['mean'], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    # inference uses the stored statistics
    stats = {'mean': jnp.asarray(RNG.randn(5), jnp.float32), 'var': jnp.asarray(RNG.rand(5) + 0.5, jnp.float32)}
    tbn.running_mean.copy_(torch.tensor(np.asarray(stats['mean'])))
    tbn.running_var.copy_(torch.tensor(np.asarray(stats['var'])))
    got = norm.apply({'params': v['params'], 'batch_stats': {'bn': stats}}, nhwc(torch.from_numpy(x)), train=False)
    np.testing.assert_allclose(nchw(got), tbn.eval()(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='unknown norm'):
        layers.Norm('batchnorm').init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)))


def test_squeeze_excite_formula():
    x = RNG.randn(2, 4, 4, 32).astype(np.float32)
    se = layers.SqueezeExcite(rd_ratio=1 / 4, rd_divisor=1)
    v = se.init(jax.random.key(0), x)
    p = v['params']
    s = x.mean(axis=(1, 2))
    h = np.maximum(s @ p['fc1']['kernel'][0, 0] + p['fc1']['bias'], 0)
    gate = 1 / (1 + np.exp(-(h @ p['fc2']['kernel'][0, 0] + p['fc2']['bias'])))
    assert p['fc1']['kernel'].shape == (1, 1, 32, 8)
    np.testing.assert_allclose(se.apply(v, x), x * gate[:, None, None, :], rtol=1e-5, atol=1e-6)


def test_drop_path_linear_decay_rule():
    # Huang et al.: p_l = 1 - l / L (1 - p_L); drop rate of block l is l / L * (1 - p_L)
    rates = layers.drop_path_rates(0.5, 4)
    np.testing.assert_allclose(rates, [0.125, 0.25, 0.375, 0.5])
    assert layers.drop_path_rates(0.2, 0) == []


def test_drop_path_drops_whole_samples_with_inverted_scaling():
    x = jnp.ones((20000, 2, 2, 3))
    dp = layers.DropPath(0.3)
    y = np.asarray(dp.apply({}, x, train=True, rngs={'dropout': jax.random.key(0)}))
    per_sample = y.reshape(20000, -1)
    kept = per_sample[per_sample != 0]
    np.testing.assert_allclose(kept, 1 / 0.7, rtol=1e-6)
    assert (per_sample.min(1) == per_sample.max(1)).all()           # whole sample kept or dropped
    dropped = (per_sample[:, 0] == 0).mean()
    assert abs(dropped - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 20000)
    assert abs(y.mean() - 1.0) < 0.02                               # expectation preserved
    np.testing.assert_array_equal(dp.apply({}, x, train=False), x)


def test_dropblock_drops_blocks_at_the_requested_rate():
    x = jnp.ones((8, 32, 32, 16))
    db = layers.DropBlock(rate=0.1, block_size=5)
    y = np.asarray(db.apply({}, x, train=True, rngs={'dropout': jax.random.key(0)}))
    zero = y == 0
    assert abs(zero.mean() - 0.1) < 0.03
    # survivors are rescaled so the mean activation is preserved
    assert abs(y.mean() - 1.0) < 1e-3
    # a dropped pixel belongs to a fully dropped 5x5 square (contiguous blocks, not pixels)
    n, i, j, c = [a[0] for a in np.nonzero(zero[:, 2:-2, 2:-2])]
    i, j = i + 2, j + 2
    window = zero[n, max(i - 4, 0):i + 5, max(j - 4, 0):j + 5, c]
    assert any(window[a:a + 5, b:b + 5].all() for a in range(window.shape[0] - 4) for b in range(window.shape[1] - 4))
    np.testing.assert_array_equal(db.apply({}, x, train=False), x)


def test_channel_shuffle_matches_shufflenet_definition():
    x = RNG.randn(2, 3, 3, 12).astype(np.float32)
    t = torch.from_numpy(x.transpose(0, 3, 1, 2))
    ref = t.reshape(2, 3, 4, 3, 3).transpose(1, 2).reshape(2, 12, 3, 3)   # (g, c/g) -> (c/g, g)
    np.testing.assert_array_equal(nchw(layers.channel_shuffle(jnp.asarray(x), 3)), ref.numpy())


def test_classifier_head_features_and_errors():
    x = RNG.randn(2, 3, 3, 8).astype(np.float32)
    head = layers.ClassifierHead(0)
    np.testing.assert_allclose(head.apply({}, x), x.mean((1, 2)), rtol=1e-6)
    with pytest.raises(ValueError, match="pool must be"):
        layers.ClassifierHead(3, pool='median').init(jax.random.key(0), x)


def test_make_divisible_keeps_within_ten_percent():
    assert layers.make_divisible(32 * 0.75, 8) == 24
    assert layers.make_divisible(10, 8) == 16       # 8 would lose more than 10 %
    assert layers.make_divisible(256 / 16, 8, round_limit=0.0) == 16


def ynn_convolutions(hlo: str) -> int:
    """Convolutions inside the computations that YNNPACK fusions call, in an HLO text dump."""
    called = set(re.findall(r'calls=(%[\w.\-]+)[^\n]*"kind":"__ynn_fusion"', hlo))
    bodies = re.findall(r'^(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}', hlo, re.S | re.M)
    return sum(body.count('convolution(') for name, body in bodies if name in called)


@pytest.mark.parametrize('band_elements', [None, 1])
def test_depthwise_conv_runs_as_fused_taps_on_the_cpu(band_elements, monkeypatch):
    """On the CPU a depthwise convolution's step holds no convolution (XLA:CPU's grouped kernels
    are slow); its output and gradients equal lax's convolution, with a channel multiplier too,
    and with the kernel gradient summed in one pass or in bands of one output row."""
    if band_elements:
        monkeypatch.setattr(conv_layers, '_BAND_ELEMENTS', band_elements)
    dn = ('NHWC', 'HWIO', 'NHWC')
    x = jnp.asarray(RNG.randn(2, 11, 11, 6), jnp.float32)
    for k, s, mult in ((3, 1, 1), (5, 2, 1), (3, 2, 2)):
        kern = jnp.asarray(RNG.randn(k, k, 1, 6 * mult), jnp.float32)

        def loss(conv, kern, x):
            y = conv(x, kern, (s, s), 'SAME', dimension_numbers=dn, feature_group_count=6)
            return jnp.sum(jnp.sin(y))
        ours = jax.jit(jax.value_and_grad(functools.partial(loss, layers.conv_general_dilated), (0, 1)))
        assert 'convolution(' not in ours.lower(kern, x).compile().as_text()
        got, want = ours(kern, x), jax.value_and_grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1))(kern, x)
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_switches_give_forward_mode_back_and_restore_themselves():
    """The CPU forms are custom VJPs, which forward mode cannot differentiate; traced inside
    ``switches(CPU_GRADIENT_FORMS=False)`` a depthwise convolution is lax's again and its JVP
    equals lax's. The switches are restored after the block, an error inside it included."""
    x = jnp.asarray(RNG.randn(2, 9, 9, 4), jnp.float32)
    kern = jnp.asarray(RNG.randn(3, 3, 1, 4), jnp.float32)
    tangent = jnp.asarray(RNG.randn(*x.shape), jnp.float32)

    def conv(op, x):
        return op(x, kern, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                  feature_group_count=4)
    with pytest.raises(TypeError, match='custom_vjp'):
        jax.jvp(functools.partial(conv, layers.conv_general_dilated), (x,), (tangent,))
    with conv_layers.switches(CPU_GRADIENT_FORMS=False, CPU_DEPTHWISE_TAPS=False):
        assert conv_layers.CPU_GRADIENT_FORMS is False and conv_layers.CPU_DEPTHWISE_TAPS is False
        got = jax.jvp(functools.partial(conv, layers.conv_general_dilated), (x,), (tangent,))
    want = jax.jvp(functools.partial(conv, jax.lax.conv_general_dilated), (x,), (tangent,))
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    assert conv_layers.CPU_GRADIENT_FORMS is True and conv_layers.CPU_DEPTHWISE_TAPS is True
    with pytest.raises(ZeroDivisionError):
        with conv_layers.switches(CPU_PADDED_TAP_PRODUCTS=False):
            1 / 0
    assert conv_layers.CPU_PADDED_TAP_PRODUCTS is True
    with pytest.raises(ValueError, match='unknown switch CPU_GRADIENT_FORM;'):
        with conv_layers.switches(CPU_GRADIENT_FORM=False):
            pass


@pytest.mark.parametrize('taps', [True, False])
def test_gpu_depthwise_taps_switch(taps, monkeypatch):
    """GPU_DEPTHWISE_TAPS (traced as if on a GPU): the per-tap sums with the whole kernel gradient
    in one pass, equal to lax's convolution in output and gradients; off, cuDNN's convolution."""
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    monkeypatch.setattr(conv_layers, 'GPU_DEPTHWISE_TAPS', taps)
    monkeypatch.setattr(conv_layers, '_BAND_ELEMENTS', 1)       # a CPU would use bands of one row
    dn = ('NHWC', 'HWIO', 'NHWC')
    x = jnp.asarray(RNG.randn(2, 9, 9, 6), jnp.float32)
    kern = jnp.asarray(RNG.randn(7, 7, 1, 6), jnp.float32)

    def loss(conv, kern, x):
        return jnp.sum(jnp.sin(conv(x, kern, (2, 2), 'SAME', dimension_numbers=dn, feature_group_count=6)))
    ours = jax.value_and_grad(functools.partial(loss, layers.conv_general_dilated), (0, 1))
    jaxpr = str(jax.make_jaxpr(ours)(kern, x))
    assert ('conv_general_dilated' not in jaxpr) == taps
    assert ('scan' in jaxpr) is False                           # no bands off the CPU
    want = jax.value_and_grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1))(kern, x)
    for g, e in zip(jax.tree.leaves(jax.jit(ours)(kern, x)), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_dense_conv_on_maps_smaller_than_the_kernel_is_one_product_on_the_cpu(monkeypatch):
    """XLA:CPU runs a convolution whose input or output is smaller than its kernel as a slow
    loop; conv_general_dilated makes it one matrix product, leaving taps that only see padding
    out. Its step holds no convolution (an 8x8 map's still does), and output and gradients equal
    lax's convolution (PyTorch's: test_conv_gradients_match_pytorch_autograd)."""
    monkeypatch.setattr(conv_layers, 'CPU_ONEDNN_CONVOLUTIONS', False)   # its form without oneDNN
    dn = ('NHWC', 'HWIO', 'NHWC')
    kern = jnp.asarray(RNG.randn(3, 3, 4, 5), jnp.float32)
    for size, stride, small in ((1, 1, True), (2, 1, True), (4, 2, True), (3, 1, False), (8, 1, False)):
        x = jnp.asarray(RNG.randn(2, size, size, 4), jnp.float32)

        def loss(conv, kern, x):
            return jnp.sum(jnp.sin(conv(x, kern, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=dn)))
        ours = jax.jit(jax.value_and_grad(functools.partial(loss, layers.conv_general_dilated), (0, 1)))
        assert ('convolution(' not in ours.lower(kern, x).compile().as_text()) == small, size
        got, want = ours(kern, x), jax.value_and_grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1))(kern, x)
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
    # on a 1x1 map only the centre tap of a padded 3x3 kernel sees the input
    x = jnp.asarray(RNG.randn(2, 1, 1, 4), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda x: layers.conv_general_dilated(
        x, kern, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn))(x))
    assert 'f32[2,1,1,4]' in jaxpr and 'f32[2,1,1,36]' not in jaxpr


def test_padding_share_counts_the_taps_on_padding_by_hand():
    """A 3x3 kernel with padding 1 over a 4x4 map: corner outputs see 4 real inputs, edge ones 6,
    the 4 inner ones 9, so 100 of 144 products are real; strided 7 -> 4 sees 10 of 12 rows."""
    share = conv_layers._padding_share
    assert share((4, 4), (4, 4), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)) == pytest.approx(44 / 144)
    assert share((7, 7), (4, 4), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)) == pytest.approx(1 - (10 / 12) ** 2)
    assert share((8, 8), (8, 8), (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1)) == 0
    # the same count by brute force over every output and tap, for a dilated, one-sided case
    size, kk, s, d, (lo, hi) = 6, 3, 2, 2, (3, 0)
    n_out = (size + lo + hi - (kk - 1) * d - 1) // s + 1
    real = sum(0 <= o * s + t * d - lo < size for o in range(n_out) for t in range(kk))
    assert share((size, 1), (n_out, 1), (kk, 1), (s, 1), ((lo, hi), (0, 0)), (d, 1)) == pytest.approx(
        1 - real / (kk * n_out))


def test_dense_conv_with_much_padding_is_one_product_per_tap_on_the_cpu(monkeypatch):
    """From 256 input channels and a quarter of the work on padding (3x3 on 4x4 maps) the
    forward pass is products, not a convolution; 8x8 maps or 128 channels keep XLA's. Output
    and both gradients, unrolled and in loops, equal lax's convolution."""
    monkeypatch.setattr(conv_layers, 'CPU_ONEDNN_CONVOLUTIONS', False)   # its form without oneDNN
    dn = ('NHWC', 'HWIO', 'NHWC')
    for size, c_in, stride, taps in ((4, 256, 1, True), (7, 256, 2, True), (8, 256, 1, False),
                                     (4, 128, 1, False)):
        x = jnp.asarray(RNG.randn(2, size, size, c_in), jnp.float32)
        kern = jnp.asarray(RNG.randn(3, 3, c_in, 8) * 0.05, jnp.float32)

        def loss(conv, kern, x):
            return jnp.sum(jnp.sin(conv(x, kern, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=dn)))
        forward = str(jax.make_jaxpr(functools.partial(loss, layers.conv_general_dilated))(kern, x))
        assert ('conv_general_dilated' not in forward) == taps, (size, c_in)
        want = jax.value_and_grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1))(kern, x)
        for in_loop in (False, True):
            with (layers.loop_body() if in_loop else contextlib.nullcontext()):
                got = jax.jit(jax.value_and_grad(functools.partial(loss, layers.conv_general_dilated), (0, 1)))(kern, x)
            for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_compiler_options_move_dense_convolutions_off_ynnpack_only():
    """On the CPU a step without depthwise convolutions gets XLA's own convolutions (YNNPACK's
    other fusions stay), one with them keeps XLA's defaults; results equal the default's."""
    dn = ('NHWC', 'HWIO', 'NHWC')
    x = jnp.asarray(RNG.randn(2, 16, 16, 32), jnp.float32)   # large enough for YNNPACK to take
    dense_k = jnp.asarray(RNG.randn(3, 3, 32, 32) * 0.1, jnp.float32)
    depth_k = jnp.asarray(RNG.randn(3, 3, 1, 32), jnp.float32)

    def dense(k, x):
        return jnp.sum(jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=dn) ** 2)

    def depthwise(k, x):
        return jnp.sum(jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=dn,
                                                    feature_group_count=32) ** 2)
    assert layers.compiler_options(depthwise, depth_k, x) == {}
    # found inside loop bodies too
    assert layers.compiler_options(lambda k, x: jax.lax.scan(
        lambda h, _: (h + depthwise(k, x), None), 0.0, None, length=2)[0], depth_k, x) == {}
    options = layers.compiler_options(dense, dense_k, x)
    assert options and all(k.startswith('xla_cpu_') for k in options)
    compiled = jax.jit(jax.grad(dense), compiler_options=options).lower(dense_k, x).compile()
    default = jax.jit(jax.grad(dense)).lower(dense_k, x).compile()
    assert ynn_convolutions(default.as_text()) > 0      # what XLA:CPU does by default
    assert ynn_convolutions(compiled.as_text()) == 0
    assert 'convolution(' in compiled.as_text()
    np.testing.assert_allclose(compiled(dense_k, x), default(dense_k, x), rtol=1e-4, atol=1e-3)


def test_residual_output_is_the_identity_under_every_transformation():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 3), np.float32))
    f = lambda v: jnp.sum(jnp.sin(layers.residual_output(v)))
    np.testing.assert_array_equal(jax.jit(layers.residual_output)(x), x)
    np.testing.assert_allclose(jax.grad(f)(x), jnp.cos(x), rtol=1e-6)
    _, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(tangent, jnp.sum(jnp.cos(x)), rtol=1e-5)
    np.testing.assert_array_equal(jax.vmap(layers.residual_output)(x), x)
    nan_first = x.at[0, 0, 0, 0].set(jnp.nan)        # the predicate reads the first element
    np.testing.assert_array_equal(jax.jit(layers.residual_output)(nan_first), nan_first)
    with layers.loop_body():                           # a loop carry is stored anyway
        assert layers.residual_output(x) is x


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
def test_residual_output_keeps_xla_from_recomputing_the_residual_chain(monkeypatch):
    # Without the boundary XLA fuses every earlier block's element-wise work into each later
    # block's kernel-gradient transposes: the fused work grows with depth squared. With it,
    # each block's fused work is the same, so the total grows linearly.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 16), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 16, 16), np.float32) * 0.1)

    def loss(k, x, depth):
        for _ in range(depth):
            h = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                             dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
            x = layers.residual_output(jax.nn.relu(x + 0.5 * h + 0.1))
        return jnp.sum(x ** 2)

    def fused(depth, boundary):
        monkeypatch.setattr(conv_layers, 'CPU_MATERIALIZE_RESIDUALS', boundary)
        grad = jax.jit(jax.grad(loss), static_argnums=2)
        return _fused_instructions(grad.lower(k, x, depth).compile().as_text())

    with_4, with_8, with_16 = (fused(d, True) for d in (4, 8, 16))
    assert with_16 - with_8 <= 1.1 * 2 * (with_8 - with_4)      # linear in depth
    assert with_16 < 0.5 * fused(16, False)
