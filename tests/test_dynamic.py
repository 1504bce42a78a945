"""Dynamic-weight layers against independent references: per-sample convolution against a loop
of single-sample convolutions (lax and PyTorch), dynamic local filtering against a per-pixel
NumPy loop, CondConv against timm's CondConv2d; and the registered models' hand counts."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm.layers
import torch
import torch.nn.functional as F

import jaxcnn
from jaxcnn.layers.dynamic import (
    CondConv,
    CondConvRouting,
    DynamicConv,
    DynamicLocalFilter,
    condconv_kernel_from_timm,
    condconv_param_count,
    local_filter,
    per_sample_conv,
)
from helpers import abstract_variables, random_variables, jit_once

RNG = np.random.RandomState(0)


def randn(*shape):
    return RNG.randn(*shape).astype(np.float32)


def torch_conv_loop(x, kernels, stride, padding, dilation, groups, bias=None):
    """Sample b of NHWC ``x`` through F.conv2d with HWIO ``kernels[b]``, one call per sample."""
    outs = []
    for b in range(x.shape[0]):
        xt = torch.from_numpy(np.ascontiguousarray(x[b : b + 1].transpose(0, 3, 1, 2)))
        wt = torch.from_numpy(np.ascontiguousarray(kernels[b].transpose(3, 2, 0, 1)))
        bt = None if bias is None else torch.from_numpy(bias[b])
        outs.append(F.conv2d(xt, wt, bt, stride, padding, dilation, groups).numpy())
    return np.concatenate(outs).transpose(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------
# per-sample convolution


@pytest.mark.parametrize('method', ['shift', 'grouped'])
@pytest.mark.parametrize(
    'k,stride,dilation,groups',
    [(3, 1, 1, 1), (3, 2, 1, 1), (5, 2, 2, 1), (3, 1, 1, 2), (3, 2, 1, 6), (1, 1, 1, 1)],
)
def test_per_sample_conv_equals_a_loop_over_samples(k, stride, dilation, groups, method):
    x = randn(4, 9, 10, 6)
    kernels = randn(4, k, k, 6 // groups, 12)
    got = np.asarray(
        per_sample_conv(
            jnp.asarray(x),
            jnp.asarray(kernels),
            stride,
            'torch',
            dilation,
            groups,
            precision=jax.lax.Precision.HIGHEST,
            method=method,
        )
    )
    pad = dilation * (k - 1) // 2
    want = torch_conv_loop(x, kernels, stride, pad, dilation, groups)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and against lax itself, one sample at a time
    for b in range(4):
        one = jax.lax.conv_general_dilated(
            jnp.asarray(x[b : b + 1]),
            jnp.asarray(kernels[b]),
            (stride, stride),
            ((pad, pad),) * 2,
            rhs_dilation=(dilation,) * 2,
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            feature_group_count=groups,
            precision=jax.lax.Precision.HIGHEST,
        )
        np.testing.assert_allclose(got[b : b + 1], np.asarray(one), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('method', ['shift', 'grouped'])
def test_per_sample_conv_tf_same_padding(method):
    # TensorFlow 'SAME' on an even input at stride 2: the extra padding goes bottom/right
    x, kernels = randn(2, 8, 8, 3), randn(2, 3, 3, 3, 4)
    got = per_sample_conv(
        jnp.asarray(x),
        jnp.asarray(kernels),
        2,
        'same',
        method=method,
        precision=jax.lax.Precision.HIGHEST,
    )
    assert got.shape == (2, 4, 4, 4)
    want = torch_conv_loop(np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))), kernels, 2, 0, 1, 1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    one = per_sample_conv(
        jnp.asarray(x[:1]),
        jnp.asarray(kernels[:1]),
        2,
        'same',
        method=method,
        precision=jax.lax.Precision.HIGHEST,
    )  # batch of one: plain conv
    np.testing.assert_allclose(np.asarray(one), want[:1], rtol=1e-5, atol=1e-5)


def test_per_sample_conv_shape_errors():
    x, kernels = randn(2, 7, 7, 3), randn(2, 3, 3, 3, 4)
    with pytest.raises(ValueError, match='samples'):
        per_sample_conv(jnp.asarray(x), jnp.asarray(kernels[:1]))
    with pytest.raises(ValueError, match='channels'):
        per_sample_conv(jnp.asarray(x), jnp.asarray(randn(2, 3, 3, 2, 4)))
    with pytest.raises(ValueError, match='method'):
        per_sample_conv(jnp.asarray(x), jnp.asarray(kernels), method='loop')


# ---------------------------------------------------------------------------------------------
# dynamic local filtering


def naive_local_filter(x, filters, k, dilation, pad):
    """y[b, i, j, c] = sum_{u,v} f[b, i, j, u*k+v(, c)] * x[b, i - pad + u*d, j - pad + v*d, c]."""
    b, h, w, c = x.shape
    ho, wo = filters.shape[1:3]
    y = np.zeros((b, ho, wo, c), np.float64)
    for n, i, j in itertools.product(range(b), range(ho), range(wo)):
        for u, v in itertools.product(range(k), range(k)):
            r, s = i - pad + u * dilation, j - pad + v * dilation
            if 0 <= r < h and 0 <= s < w:
                f = filters[n, i, j, u * k + v]
                y[n, i, j] += f * x[n, r, s]
    return y


@pytest.mark.parametrize('k,dilation,per_channel', [(3, 1, False), (5, 1, True), (3, 2, False)])
def test_local_filter_equals_per_pixel_loop(k, dilation, per_channel):
    x = randn(2, 7, 8, 3)
    taps = (k * k, 3) if per_channel else (k * k,)
    filters = randn(2, 7, 8, *taps)
    got = local_filter(jnp.asarray(x), jnp.asarray(filters), k, dilation)
    want = naive_local_filter(x, filters, k, dilation, dilation * (k - 1) // 2)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # 'valid': no padding, the output shrinks
    ho, wo = 7 - dilation * (k - 1), 8 - dilation * (k - 1)
    filters = randn(2, ho, wo, *taps)
    got = local_filter(jnp.asarray(x), jnp.asarray(filters), k, dilation, padding='valid')
    np.testing.assert_allclose(
        np.asarray(got), naive_local_filter(x, filters, k, dilation, 0), rtol=1e-5, atol=1e-5
    )


def test_local_filter_with_a_delta_filter_shifts_the_image():
    # DFN's sanity case: a one-hot filter at tap (u, v) translates the image by (u - 1, v - 1)
    x = randn(1, 6, 6, 2)
    filters = np.zeros((1, 6, 6, 9), np.float32)
    filters[..., 2 * 3 + 1] = 1.0  # tap (2, 1): the pixel one row below
    got = np.asarray(local_filter(jnp.asarray(x), jnp.asarray(filters), 3))
    np.testing.assert_allclose(got[0, :-1], x[0, 1:], rtol=1e-6)
    np.testing.assert_allclose(got[0, -1], 0.0)


# ---------------------------------------------------------------------------------------------
# the two dynamic-filter layers, recomputed by hand from their parameters


def test_dynamic_conv_layer_equals_generated_filters_applied_per_sample():
    x = randn(3, 8, 8, 4)
    layer = DynamicConv(6, 3, stride=2, hidden=5, use_bias=True)
    params = layer.init(jax.random.key(0), jnp.asarray(x))['params']
    params = jax.tree.map(lambda p: jnp.asarray(randn(*p.shape) * 0.3), params)
    got = layer.apply({'params': params}, jnp.asarray(x))
    p = jax.tree.map(np.asarray, params)
    # filter-generating network by hand: GAP -> fc -> ReLU -> fc -> (3, 3, 4, 6) per sample
    h = np.maximum(x.mean(axis=(1, 2)) @ p['gen_fc1']['kernel'] + p['gen_fc1']['bias'], 0)
    kernels = (h @ p['gen_fc2']['kernel'] + p['gen_fc2']['bias']).reshape(3, 3, 3, 4, 6)
    bias = np.broadcast_to(p['bias'], (3, 6)).copy()
    want = torch_conv_loop(x, kernels, 2, 1, 1, 1, bias)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    assert got.shape == (3, 4, 4, 6)


def test_dynamic_conv_filters_are_per_sample():
    # changing one sample changes only that sample's output (its own filter, its own input)
    x = randn(3, 8, 8, 4)
    layer = DynamicConv(5, 3)
    v = layer.init(jax.random.key(0), jnp.asarray(x))
    y0 = np.asarray(layer.apply(v, jnp.asarray(x)))
    x2 = x.copy()
    x2[1] += 1.0  # shifts sample 1's mean: a different filter too
    y1 = np.asarray(layer.apply(v, jnp.asarray(x2)))
    np.testing.assert_allclose(y1[[0, 2]], y0[[0, 2]], rtol=1e-6)
    assert not np.allclose(y1[1], y0[1])


@pytest.mark.parametrize('per_channel', [False, True])
def test_dynamic_local_filter_layer_equals_naive_loop(per_channel):
    x = randn(2, 6, 7, 3)
    layer = DynamicLocalFilter(3, features=5, hidden=4, per_channel=per_channel)
    params = layer.init(jax.random.key(0), jnp.asarray(x))['params']
    params = jax.tree.map(lambda p: jnp.asarray(randn(*p.shape) * 0.5), params)
    got = layer.apply({'params': params}, jnp.asarray(x))
    p = jax.tree.map(np.asarray, params)
    # filter-generating network by hand (PyTorch convs), softmax over the 9 taps
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    w1 = torch.from_numpy(p['gen_conv1']['kernel'].transpose(3, 2, 0, 1).copy())
    h = F.relu(F.conv2d(xt, w1, torch.from_numpy(p['gen_conv1']['bias'].copy()), padding=1))
    w2 = torch.from_numpy(p['gen_conv2']['kernel'].transpose(3, 2, 0, 1).copy())
    f = (
        F.conv2d(h, w2, torch.from_numpy(p['gen_conv2']['bias'].copy()))
        .numpy()
        .transpose(0, 2, 3, 1)
    )
    if per_channel:
        f = f.reshape(2, 6, 7, 9, 3)
    f = np.exp(f - f.max(axis=3, keepdims=True))
    f = f / f.sum(axis=3, keepdims=True)
    want = naive_local_filter(x, f, 3, 1, 1) @ p['pointwise']['kernel'][0, 0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# CondConv against timm


def timm_to_flax(m: timm.layers.CondConv2d):
    params = {
        'kernel': condconv_kernel_from_timm(
            m.weight.detach().numpy(), m.out_channels, m.in_channels // m.groups, m.kernel_size
        )
    }
    if m.bias is not None:
        params['bias'] = m.bias.detach().numpy()
    return params


@pytest.mark.parametrize(
    'cin,cout,k,stride,groups,bias,experts,padding',
    [
        (8, 12, 3, 1, 1, False, 4, ''),
        (8, 16, 3, 2, 1, True, 4, ''),
        (12, 12, 5, 2, 12, False, 3, ''),
        (8, 4, 1, 1, 1, True, 8, ''),
        (6, 9, 3, 1, 3, False, 2, ''),
        # TF "SAME" (timm's tf_ ports, e.g. tf_efficientnet_cc_b0_4e): dynamic padding at stride 2
        (8, 8, 3, 2, 8, False, 4, 'same'),
        (8, 16, 5, 2, 1, False, 4, 'same'),
    ],
)
def test_condconv_matches_timm(cin, cout, k, stride, groups, bias, experts, padding):
    torch.manual_seed(0)
    m = timm.layers.CondConv2d(
        cin, cout, k, stride, padding=padding, groups=groups, bias=bias, num_experts=experts
    )
    if bias:
        torch.nn.init.normal_(m.bias)
    size = 10 if padding == 'same' else 11
    x = torch.randn(5, cin, size, size)
    routing = torch.sigmoid(torch.randn(5, experts))
    want = m(x, routing).detach().numpy().transpose(0, 2, 3, 1)

    layer = CondConv(
        cout,
        k,
        stride,
        padding or 'torch',
        groups=groups,
        num_experts=experts,
        use_bias=bias,
        precision=jax.lax.Precision.HIGHEST,
    )
    shapes = abstract_variables_layer(layer, (1, size, size, cin), experts)
    params = timm_to_flax(m)
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, shapes)
    # the same number of parameters as timm's layer, and as eq. (1) counts them
    n_timm = sum(p.numel() for p in m.parameters())
    assert (
        jaxcnn.count_params(shapes)
        == n_timm
        == condconv_param_count(cin, cout, k, experts, groups, bias)
    )
    got = layer.apply(
        {'params': params},
        jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
        jnp.asarray(routing.numpy()),
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def abstract_variables_layer(layer, shape, experts):
    return jax.eval_shape(
        lambda: layer.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros((shape[0], experts)))
    )['params']


def test_condconv_internal_routing_matches_timm_condconv_block_routing():
    """Called without routing weights, CondConv routes like timm's CondConvResidual:
    sigmoid(Linear(GAP(x))) (its ``routing_fn``), then CondConv2d(x, routing_weights)."""
    torch.manual_seed(1)
    m = timm.layers.CondConv2d(8, 16, 3, 1, num_experts=4)
    fc = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, 9, 9)
    want = m(x, torch.sigmoid(fc(x.mean((2, 3))))).detach().numpy().transpose(0, 2, 3, 1)
    layer = CondConv(16, 3, num_experts=4, precision=jax.lax.Precision.HIGHEST)
    params = {
        **timm_to_flax(m),
        'routing': {
            'fc': {'kernel': fc.weight.detach().numpy().T, 'bias': fc.bias.detach().numpy()}
        },
    }
    shapes = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros((1, 9, 9, 8))))[
        'params'
    ]
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, shapes)
    assert jaxcnn.count_params(shapes) == sum(
        p.numel() for p in [*m.parameters(), *fc.parameters()]
    )
    got = layer.apply({'params': params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_condconv_routing_module_and_one_expert_is_a_plain_conv():
    x = jnp.asarray(randn(2, 6, 6, 4))
    r = CondConvRouting(3)
    v = r.init(jax.random.key(0), x)
    got = r.apply(v, x)
    p = v['params']['fc']
    np.testing.assert_allclose(
        got, jax.nn.sigmoid(x.mean((1, 2)) @ p['kernel'] + p['bias']), rtol=1e-5
    )
    # one expert with routing weight 1 is an ordinary convolution with that kernel
    layer = CondConv(5, 3, num_experts=1)
    v = layer.init(jax.random.key(0), x, jnp.ones((2, 1)))
    got = layer.apply(v, x, jnp.ones((2, 1)))
    want = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), use_bias=False).apply(
        {'params': {'kernel': v['params']['kernel'][0]}}, x
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='routing weights'):
        layer.apply(v, x, jnp.ones((2, 3)))


def test_condconv_gradients_reach_experts_and_routing():
    x = jnp.asarray(randn(2, 6, 6, 4))
    layer = CondConv(5, 3, num_experts=3)
    v = layer.init(jax.random.key(0), x)
    g = jax.grad(lambda p: jnp.sum(layer.apply({'params': p}, x) ** 2))(v['params'])
    for leaf in jax.tree.leaves(g):
        assert np.abs(np.asarray(leaf)).sum() > 0


def test_condconv_bf16_compute_keeps_fp32_params():
    x = jnp.asarray(randn(2, 6, 6, 4))
    layer = CondConv(5, 3, num_experts=3, dtype=jnp.bfloat16)
    v = layer.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))
    y = layer.apply(v, x)
    assert y.dtype == jnp.bfloat16
    y32 = CondConv(5, 3, num_experts=3).apply(v, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------
# registered models: hand counts


def count(name, **kw):
    model = jaxcnn.create_model(name, **kw)
    return jaxcnn.count_params(abstract_variables(model, (1, 32, 32, 3))['params'])


def test_condconv_resnet20_hand_count():
    """Yang et al. 2019 eq. (1): a CondConv layer holds E kernels of the conv it replaces; its
    routing r(x) = sigmoid(GAP(x) R) adds a C_in x E matrix and E biases (eq. 2)."""
    E = 4
    block_convs = [(16, 16)] * 6 + [(16, 32)] + [(32, 32)] * 5 + [(32, 64)] + [(64, 64)] * 5
    experts = sum(E * 9 * ci * co for ci, co in block_convs)
    routing = sum((ci + 1) * E for ci, _ in block_convs)
    stem = 9 * 3 * 16
    bns = 2 * 16 + sum(2 * co for _, co in block_convs)  # stem BN; one BN after each conv
    head = 64 * 10 + 10
    total = experts + routing + stem + bns + head
    assert experts == 4 * 267_264  # 4x ResNet-20's 3x3 block kernels
    assert (
        count('condconv_resnet20')
        == total
        == jaxcnn.model_info('condconv_resnet20').reference_params
    )
    # experts scale the kernels only: 1 expert = ResNet-20 + one routing FC per conv
    plain = count('resnet20')
    assert count('condconv_resnet20', num_experts=1) == plain + sum(ci + 1 for ci, _ in block_convs)


def test_dynconv_cifar_hand_count():
    """Per stage of width w (input c): a 3x3 conv + BN; a dynamic conv whose generator is
    GAP -> FC(w -> 16) -> FC(16 -> 3*3*w*w), + BN; a local filter whose generator is a 3x3
    conv (w -> 16) and a 1x1 conv (16 -> 9 taps), a 1x1 conv w -> w, + BN."""
    total, c = 0, 3
    for w in (16, 32, 64):
        conv = 9 * c * w + 2 * w
        dyn = (w * 16 + 16) + (16 * 9 * w * w + 9 * w * w) + 2 * w
        local = (9 * w * 16 + 16) + (16 * 9 + 9) + w * w + 2 * w
        total += conv + dyn + local
        c = w
    total += 64 * 10 + 10
    assert count('dynconv_cifar') == total == jaxcnn.model_info('dynconv_cifar').reference_params


def test_dynamic_models_apply_per_sample_weights():
    # in inference mode (fixed BatchNorm statistics) each sample's logits depend on it alone
    for name in ('condconv_resnet20', 'dynconv_cifar'):
        model = jaxcnn.create_model(name)
        x = randn(3, 16, 16, 3)
        v = random_variables(model, x.shape)
        apply = jit_once(model.apply)
        y0 = np.asarray(apply(v, jnp.asarray(x)))
        x[2] = randn(16, 16, 3)
        y1 = np.asarray(apply(v, jnp.asarray(x)))
        np.testing.assert_allclose(y1[:2], y0[:2], rtol=1e-4, atol=1e-5)
        assert not np.allclose(y1[2], y0[2])
