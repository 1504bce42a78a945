"""Classic networks (LeNet-5, AlexNet, ZFNet, VGG, NiN): counts from the layer formula,
layouts from the papers' figures, and the pooling helpers against PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxcnn
from helpers import abstract_variables, random_variables
from jaxcnn.layers import adaptive_avg_pool, avg_pool, ceil_max_pool, ceil_mode_padding
from jaxcnn.models.alexnet import paper_lrn


def conv(c_in, c_out, k, groups=1):
    return k * k * (c_in // groups) * c_out + c_out


def dense(n_in, n_out):
    return n_in * n_out + n_out


def n_params(name, input_shape=None, **kw):
    model = jaxcnn.create_model(name, **kw)
    shape = input_shape or (1, *jaxcnn.model_info(name).input_size)
    return jaxcnn.count_params(abstract_variables(model, shape)['params'])


def test_lenet5_hand_count():
    # C1, C3 (all six maps), C5 on the 5x5 S4 maps, F6, output; pooling has no parameters
    assert n_params('lenet5') == (
        conv(1, 6, 5) + conv(6, 16, 5) + conv(16, 120, 5) + dense(120, 84) + dense(84, 10)
    )
    assert n_params('lenet5') == 61_706  # the classic figure
    # three-channel NHWC input only widens C1
    assert n_params('lenet5', (1, 32, 32, 3)) == 61_706 + 2 * 5 * 5 * 6


def test_nin_hand_count():
    blocks = [(3, 192, 5, [160, 96]), (96, 192, 5, [192, 192]), (192, 192, 3, [192, 10])]
    total = 0
    for c_in, width, k, mlp in blocks:
        total += conv(c_in, width, k)
        for w in mlp:
            total += conv(width, w, 1)
            width = w
    assert n_params('nin_cifar') == total


def test_nin_batchnorm_variant_swaps_biases_for_norm_parameters():
    convs = [192, 160, 96, 192, 192, 192, 192, 192]  # every conv before the class maps
    base = n_params('nin_cifar')
    assert n_params('nin_cifar', use_bn=True) == base - sum(convs) + 2 * sum(convs)
    shapes = abstract_variables(jaxcnn.create_model('nin_cifar', use_bn=True), (1, 32, 32, 3))
    assert len(jax.tree.leaves(shapes['batch_stats'])) == 2 * len(convs)


def test_nin_pools_to_8x8_and_head_is_class_map_average():
    model = jaxcnn.create_model('nin_cifar')
    v = random_variables(model, (2, 32, 32, 3))
    x = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 3), jnp.float32)
    fmap = jaxcnn.forward_features(model, v, x)
    assert fmap.shape == (2, 8, 8, 192)  # 32 -> 16 -> 8, as Caffe rounds
    fc = v['params']['head']['fc']
    class_maps = np.asarray(fmap) @ np.asarray(fc['kernel']) + np.asarray(fc['bias'])
    expected = np.maximum(class_maps, 0).mean((1, 2))
    np.testing.assert_allclose(model.apply(v, x), expected, rtol=1e-4, atol=1e-5)
    pooled = jaxcnn.create_model('nin_cifar', num_classes=0).apply(v, x)
    np.testing.assert_allclose(pooled, np.asarray(fmap).mean((1, 2)), rtol=1e-5, atol=1e-6)


def test_alexnet_lrn_two_groups_and_hand_count():
    """Krizhevsky et al. Fig. 2: conv2, conv4, conv5 see only their own GPU's half of the
    previous layer; conv3 and the FC layers see both halves."""
    p = abstract_variables(jaxcnn.create_model('alexnet_lrn'), (1, 224, 224, 3))['params']
    shapes = {k: p[k]['kernel'].shape for k in p if k.startswith('conv')}
    assert shapes == {
        'conv1': (11, 11, 3, 96),
        'conv2': (5, 5, 48, 256),
        'conv3': (3, 3, 256, 384),
        'conv4': (3, 3, 192, 384),
        'conv5': (3, 3, 192, 256),
    }
    total = (
        conv(3, 96, 11)
        + conv(96, 256, 5, 2)
        + conv(256, 384, 3)
        + conv(384, 384, 3, 2)
        + conv(384, 256, 3, 2)
        + dense(6 * 6 * 256, 4096)
        + dense(4096, 4096)
        + dense(4096, 1000)
    )
    assert jaxcnn.count_params(p) == total == 60_965_224  # the paper's "60 million"


def test_alexnet_lrn_groups_are_independent():
    # perturbing conv1 filters 60-95 (out of LRN's +-2 reach of the first half) leaves conv2's
    # first-group outputs unchanged
    model = jaxcnn.create_model('alexnet_lrn')
    v = random_variables(model, (1, 63, 63, 3))
    x = jnp.asarray(np.random.RandomState(0).randn(1, 63, 63, 3), jnp.float32)

    def conv2_out(params):
        _, state = model.apply(
            {'params': params},
            x,
            capture_intermediates=lambda m, _: m.name == 'conv2',
            mutable=['intermediates'],
        )
        return np.asarray(state['intermediates']['conv2']['__call__'][0])

    p2 = dict(v['params'])
    p2['conv1'] = {**p2['conv1'], 'kernel': p2['conv1']['kernel'].at[..., 60:].multiply(3.0)}
    a, b = conv2_out(v['params']), conv2_out(p2)
    np.testing.assert_array_equal(a[..., :128], b[..., :128])
    assert not np.allclose(a[..., 128:], b[..., 128:])


def test_paper_lrn_is_the_papers_formula():
    # b = a / (k + alpha * sum_{|j - i| <= n/2} a_j^2)^beta, alpha not divided by n (§3.3)
    x = np.random.RandomState(0).randn(2, 3, 3, 12).astype(np.float32) * 4
    sq = np.pad(x**2, ((0, 0), (0, 0), (0, 0), (2, 2)))
    window = sum(sq[..., i : i + 12] for i in range(5))
    expected = x / (2.0 + 1e-4 * window) ** 0.75
    np.testing.assert_allclose(paper_lrn().apply({}, jnp.asarray(x)), expected, rtol=1e-5)


def test_zfnet_layout_and_hand_count():
    """Zeiler & Fergus Fig. 3 map sizes (110, 55, 26, 13, 6) with Table 2 (b)'s 512/1024/512."""
    model = jaxcnn.create_model('zfnet')
    x = jnp.zeros((1, 224, 224, 3))
    _, state = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0), x, capture_intermediates=True, mutable=True
        )
    )
    inter = state['intermediates']
    assert inter['conv1']['__call__'][0].shape == (1, 110, 110, 96)
    assert inter['conv2']['__call__'][0].shape == (1, 26, 26, 256)  # conv2 reads 55x55
    assert inter['conv5']['__call__'][0].shape == (1, 13, 13, 512)
    fmap = jax.eval_shape(
        lambda v: model.apply(v, x, features_only=True), {'params': state['params']}
    )
    assert fmap.shape == (1, 6, 6, 512)
    total = (
        conv(3, 96, 7)
        + conv(96, 256, 5)
        + conv(256, 512, 3)
        + conv(512, 1024, 3)
        + conv(1024, 512, 3)
        + dense(6 * 6 * 512, 4096)
        + dense(4096, 4096)
        + dense(4096, 1000)
    )
    assert n_params('zfnet') == total == jaxcnn.model_info('zfnet').reference_params


@pytest.mark.parametrize('name,feat', [('alexnet', (6, 6, 256)), ('vgg16', (7, 7, 512))])
def test_mlp_models_features_and_pooled_features(name, feat):
    """At 224 px the conv map already has torchvision's pooled size; num_classes=0 gives fc7's
    features, and the head is one linear layer on them."""
    model = jaxcnn.create_model(name)
    fmap = jax.eval_shape(
        lambda v: jaxcnn.forward_features(model, v, jnp.zeros((1, 224, 224, 3))),
        abstract_variables(model, (1, 224, 224, 3)),
    )
    assert fmap.shape == (1, *feat)
    v = random_variables(model, (2, 64, 64, 3))
    x = jnp.asarray(np.random.RandomState(0).randn(2, 64, 64, 3), jnp.float32)
    pooled = jaxcnn.create_model(name, num_classes=0).apply(v, x)
    assert pooled.shape == (2, 4096)
    fc = v['params']['head']['fc']
    np.testing.assert_allclose(
        model.apply(v, x), pooled @ fc['kernel'] + fc['bias'], rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    'size,out', [(1, 7), (2, 7), (3, 6), (5, 7), (10, 7), (13, 6), (15, 6), (7, 7)]
)
def test_adaptive_avg_pool_matches_pytorch(size, out):
    x = np.random.RandomState(size).randn(2, 4, size, size + 3).astype(np.float32)
    expected = F.adaptive_avg_pool2d(torch.from_numpy(x), out).numpy()
    got = adaptive_avg_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), out)
    np.testing.assert_allclose(
        np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize('size', [7, 13, 26, 32, 110])
def test_ceil_mode_pools_match_pytorch(size):
    x = np.random.RandomState(size).randn(1, 3, size, size).astype(np.float32)
    t = torch.from_numpy(x)
    got_max = np.asarray(ceil_max_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), 3, 2)).transpose(
        0, 3, 1, 2
    )
    np.testing.assert_array_equal(got_max, F.max_pool2d(t, 3, 2, ceil_mode=True).numpy())
    pads = tuple(ceil_mode_padding(size, 3, 2) for _ in range(2))
    got_avg = avg_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), 3, 2, pads, count_include_pad=False)
    np.testing.assert_allclose(
        np.asarray(got_avg).transpose(0, 3, 1, 2),
        F.avg_pool2d(t, 3, 2, ceil_mode=True).numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_vgg_configs_are_the_papers_table():
    # Table 1: A/B/D/E have 8/10/13/16 convolutions (+3 FC = 11/13/16/19 weight layers)
    for depth in (11, 13, 16, 19):
        p = abstract_variables(jaxcnn.create_model(f'vgg{depth}'), (1, 32, 32, 3))['params']
        convs = [k for k in p if k.startswith('features_')]
        assert len(convs) + 3 == depth
        assert all(p[k]['kernel'].shape[:2] == (3, 3) for k in convs)
