"""Shared layers against PyTorch's implementations and the papers' formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxcnn import layers

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


@pytest.mark.parametrize(
    'k,s,d,groups,size',
    [
        (3, 1, 1, 1, 9),
        (3, 2, 1, 1, 10),
        (7, 2, 1, 1, 16),
        (3, 2, 2, 1, 11),
        (3, 1, 1, 4, 8),
        (5, 2, 1, 8, 12),
    ],
)
def test_torch_padding_matches_pytorch_conv(k, s, d, groups, size):
    cin, cout = 8, 8
    x = RNG.randn(2, cin, size, size).astype(np.float32)
    w = RNG.randn(cout, cin // groups, k, k).astype(np.float32)
    expected = F.conv2d(
        torch.from_numpy(x),
        torch.from_numpy(w),
        stride=s,
        padding=d * (k - 1) // 2,
        dilation=d,
        groups=groups,
    ).numpy()
    got = run_conv(layers.conv2d(cout, k, s, dilation=d, groups=groups), x, w)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('k,s,size', [(3, 2, 10), (3, 2, 11), (5, 2, 16), (1, 2, 7), (4, 4, 14)])
def test_same_padding_matches_tensorflow_rule(k, s, size):
    """TF 'SAME': out = ceil(H / s); total pad = max((out - 1) s + k - H, 0), the odd pixel at the end."""
    x = RNG.randn(1, 4, size, size).astype(np.float32)
    w = RNG.randn(6, 4, k, k).astype(np.float32)
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    padded = F.pad(
        torch.from_numpy(x), (total // 2, total - total // 2, total // 2, total - total // 2)
    )
    expected = F.conv2d(padded, torch.from_numpy(w), stride=s).numpy()
    got = run_conv(layers.conv2d(6, k, s, padding='same'), x, w)
    assert got.shape[-1] == out
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_depthwise_conv_is_one_filter_per_channel():
    x = RNG.randn(2, 6, 9, 9).astype(np.float32)
    w = RNG.randn(6, 1, 3, 3).astype(np.float32)
    expected = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1, groups=6).numpy()
    np.testing.assert_allclose(
        run_conv(layers.depthwise_conv2d(6, 3), x, w), expected, rtol=1e-4, atol=1e-4
    )


def test_max_pool_pads_with_minus_infinity_like_pytorch():
    x = -np.abs(RNG.randn(2, 3, 9, 9)).astype(np.float32) - 1
    expected = F.max_pool2d(torch.from_numpy(x), 3, 2, 1).numpy()
    np.testing.assert_array_equal(nchw(layers.max_pool(nhwc(torch.from_numpy(x)), 3, 2)), expected)


@pytest.mark.parametrize(
    'window,stride,padding,ceil,size',
    [
        (3, 2, 1, False, 9),
        (3, 2, 1, False, 10),
        (2, 2, 0, False, 8),
        (3, 1, 1, False, 7),
        (3, 2, 0, True, 10),
        (3, 2, 0, True, 13),
        (5, 3, 2, False, 14),
    ],
)
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
    np.testing.assert_allclose(
        nchw(vjp(jnp.asarray(r.transpose(0, 2, 3, 1), jnp.float32))[0]),
        xt.grad.numpy(),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    'name,ref',
    [
        ('relu', F.relu),
        ('relu6', F.relu6),
        ('elu', F.elu),
        ('selu', F.selu),
        ('sigmoid', torch.sigmoid),
        ('tanh', torch.tanh),
        ('silu', F.silu),
        ('swish', F.silu),
        ('hard_swish', F.hardswish),
        ('hard_sigmoid', F.hardsigmoid),
        ('gelu', F.gelu),
        ('mish', F.mish),
        ('leaky_relu', F.leaky_relu),
        ('gelu_tanh', lambda t: F.gelu(t, approximate='tanh')),
    ],
)
def test_activations_match_pytorch(name, ref):
    x = np.linspace(-8, 8, 1001).astype(np.float32)
    np.testing.assert_allclose(
        layers.get_act(name)(jnp.asarray(x)), ref(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6
    )


def test_selu_constants_are_the_fixed_point():
    """SELU's (lambda, alpha) keep a unit Gaussian at mean 0, variance 1 (Klambauer et al. eq. 4-5)."""
    z = np.random.RandomState(1).randn(4_000_000)
    y = np.asarray(layers.selu(jnp.asarray(z)))
    assert abs(y.mean()) < 3e-3 and abs(y.var() - 1) < 3e-3


def test_maxout_and_prelu():
    x = RNG.randn(2, 3, 3, 6).astype(np.float32)
    np.testing.assert_array_equal(
        layers.maxout(jnp.asarray(x), 3), x.reshape(2, 3, 3, 2, 3).max(-1)
    )
    with pytest.raises(ValueError, match='divisible'):
        layers.maxout(jnp.asarray(x), 4)
    p = layers.PReLU()
    v = p.init(jax.random.key(0), x)
    np.testing.assert_allclose(p.apply(v, x), np.where(x >= 0, x, 0.25 * x), rtol=1e-6)
    with pytest.raises(ValueError, match='unknown activation'):
        layers.get_act('relu7')


def test_local_response_norm_matches_pytorch():
    x = RNG.randn(2, 16, 5, 5).astype(np.float32) * 3
    expected = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(
        torch.from_numpy(x)
    ).numpy()
    got = layers.LocalResponseNorm().apply({}, nhwc(torch.from_numpy(x)))
    np.testing.assert_allclose(nchw(got), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    'kind,ref',
    [
        (
            'layer',
            lambda t: F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), eps=1e-6).permute(
                0, 3, 1, 2
            ),
        ),
        ('group', lambda t: F.group_norm(t, 32, eps=1e-5)),
        ('instance', lambda t: F.instance_norm(t, eps=1e-5)),
    ],
)
def test_norms_match_pytorch(kind, ref):
    x = RNG.randn(2, 64, 6, 6).astype(np.float32) * 2 + 1
    norm = layers.Norm(kind)
    v = norm.init(jax.random.key(0), nhwc(torch.from_numpy(x)))
    np.testing.assert_allclose(
        nchw(norm.apply(v, nhwc(torch.from_numpy(x)))),
        ref(torch.from_numpy(x)).numpy(),
        rtol=1e-4,
        atol=1e-4,
    )


def test_batchnorm_train_and_eval_follow_pytorch():
    x = RNG.randn(8, 5, 4, 4).astype(np.float32) * 2 + 3
    tbn = torch.nn.BatchNorm2d(5)
    norm = layers.Norm('batch')
    v = norm.init(jax.random.key(0), nhwc(torch.from_numpy(x)))
    y, upd = norm.apply(v, nhwc(torch.from_numpy(x)), train=True, mutable=['batch_stats'])
    ty = tbn.train()(torch.from_numpy(x))
    np.testing.assert_allclose(nchw(y), ty.detach().numpy(), rtol=1e-4, atol=1e-4)
    # running mean moves 10 % of the way, as PyTorch's momentum=0.1
    np.testing.assert_allclose(
        upd['batch_stats']['bn']['mean'], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6
    )
    # inference uses the stored statistics
    stats = {
        'mean': jnp.asarray(RNG.randn(5), jnp.float32),
        'var': jnp.asarray(RNG.rand(5) + 0.5, jnp.float32),
    }
    tbn.running_mean.copy_(torch.tensor(np.asarray(stats['mean'])))
    tbn.running_var.copy_(torch.tensor(np.asarray(stats['var'])))
    got = norm.apply(
        {'params': v['params'], 'batch_stats': {'bn': stats}},
        nhwc(torch.from_numpy(x)),
        train=False,
    )
    np.testing.assert_allclose(
        nchw(got), tbn.eval()(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-4
    )
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
    assert (per_sample.min(1) == per_sample.max(1)).all()  # whole sample kept or dropped
    dropped = (per_sample[:, 0] == 0).mean()
    assert abs(dropped - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 20000)
    assert abs(y.mean() - 1.0) < 0.02  # expectation preserved
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
    window = zero[n, max(i - 4, 0) : i + 5, max(j - 4, 0) : j + 5, c]
    assert any(
        window[a : a + 5, b : b + 5].all()
        for a in range(window.shape[0] - 4)
        for b in range(window.shape[1] - 4)
    )
    np.testing.assert_array_equal(db.apply({}, x, train=False), x)


def test_channel_shuffle_matches_shufflenet_definition():
    x = RNG.randn(2, 3, 3, 12).astype(np.float32)
    t = torch.from_numpy(x.transpose(0, 3, 1, 2))
    ref = t.reshape(2, 3, 4, 3, 3).transpose(1, 2).reshape(2, 12, 3, 3)  # (g, c/g) -> (c/g, g)
    np.testing.assert_array_equal(nchw(layers.channel_shuffle(jnp.asarray(x), 3)), ref.numpy())


def test_classifier_head_features_and_errors():
    x = RNG.randn(2, 3, 3, 8).astype(np.float32)
    head = layers.ClassifierHead(0)
    np.testing.assert_allclose(head.apply({}, x), x.mean((1, 2)), rtol=1e-6)
    with pytest.raises(ValueError, match="pool must be"):
        layers.ClassifierHead(3, pool='median').init(jax.random.key(0), x)


def test_make_divisible_keeps_within_ten_percent():
    assert layers.make_divisible(32 * 0.75, 8) == 24
    assert layers.make_divisible(10, 8) == 16  # 8 would lose more than 10 %
    assert layers.make_divisible(256 / 16, 8, round_limit=0.0) == 16
