"""PolyNet's structures (Zhang et al. 2017, §3): poly-2 = I + F + F^2 with one F, mpoly-2 =
I + F + GF, 2-way = I + F + G, each checked against the formula evaluated by applying its units by
hand; the shared BatchNorm; and the small CIFAR configuration counted layer by layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from helpers import abstract_variables, random_variables
from jaxcnn.layers import batch_norm
from jaxcnn.models.polynet import (
    UNIT_A,
    UNIT_B,
    InceptionResidual,
    MPoly2,
    Poly2,
    SharedBatchNorm,
    TwoWay,
)

X = jnp.asarray(np.random.RandomState(0).randn(4, 8, 8, 64), jnp.float32)
BETA = 0.3


def unit():
    return InceptionResidual(64, UNIT_A)


def count(module, x=X):
    return jaxcnn.count_params(abstract_variables(module, x.shape)['params'])


def sub(v, name):
    return {'params': v['params'][name], 'batch_stats': v['batch_stats'][name]}


def apply_unit(v, x, train=False, application=0):
    if train:
        return unit().apply(v, x, True, application, mutable=['batch_stats'])[0]
    return unit().apply(v, x, False, application)


# ------------------------------------------------------------------------------------------
# hand count of the registered configuration, from the layer definitions


def conv_bn(c_in, c_out, kh=1, kw=1):
    return kh * kw * c_in * c_out + 2 * c_out  # no conv bias; BN scale + shift


def unit_count(width, branches):
    """Branches of conv-BN-ReLU layers (c_out, kh, kw), concatenated, then 1x1 + bias to width."""
    total, concat = 0, 0
    for branch in branches:
        c = width
        for c_out, kh, kw in branch:
            total += conv_bn(c, c_out, kh, kw)
            c = c_out
        concat += c
    return total + concat * width + width


def reduction_count(c_in, branches):
    total = 0
    for branch in branches:
        c = c_in
        for c_out, kh, kw in branch:
            total += conv_bn(c, c_out, kh, kw)
            c = c_out
    return total


def polynet_small_hand_count(num_classes=10):
    a = unit_count(64, [[(8, 1, 1)], [(8, 1, 1), (8, 3, 3)], [(8, 1, 1), (12, 3, 3), (16, 3, 3)]])
    b = unit_count(128, [[(24, 1, 1)], [(16, 1, 1), (20, 1, 7), (24, 7, 1)]])
    c = unit_count(256, [[(32, 1, 1)], [(32, 1, 1), (40, 1, 3), (48, 3, 1)]])
    red_a = reduction_count(64, [[(32, 3, 3)], [(16, 1, 1), (16, 3, 3), (32, 3, 3)]])  # 64+32+32
    red_b = reduction_count(
        128,
        [[(32, 1, 1), (48, 3, 3)], [(32, 1, 1), (40, 3, 3)], [(32, 1, 1), (40, 3, 3), (40, 3, 3)]],
    )  # 128+48+40+40
    units_per_stage = 1 + 2 + 2  # poly-2 (one shared F), mpoly-2, 2-way
    stem = conv_bn(3, 64, 3, 3)
    final = conv_bn(256, 256)  # 1x1 conv-BN-ReLU before the pool
    head = 256 * num_classes + num_classes
    return stem + units_per_stage * (a + b + c) + red_a + red_b + final + head


def test_polynet_small_cifar_hand_count():
    model = jaxcnn.create_model('polynet_small_cifar')
    v = abstract_variables(model, (1, 32, 32, 3))
    n = jaxcnn.count_params(v['params'])
    assert n == polynet_small_hand_count() == 516_714
    assert n == jaxcnn.model_info('polynet_small_cifar').reference_params
    # each stage holds one module of each kind; poly-2 owns one unit, the others two
    p = v['params']
    for s in (1, 2, 3):
        stage = p[f'stage{s}']
        assert set(stage['0']['poly2']) == {'f'}
        assert set(stage['1']['mpoly2']) == set(stage['2']['2way']) == {'f', 'g'}
    fmap = jax.eval_shape(
        lambda v, x: model.apply(v, x, features_only=True),
        v,
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
    )
    assert fmap.shape == (1, 8, 8, 256)  # 32 -> 16 -> 8 through the two reductions


# ------------------------------------------------------------------------------------------
# the structures


def test_poly2_shares_f_parameter_count_is_two_way_minus_one_unit():
    one = count(unit())
    assert one == unit_count(
        64, [[(8, 1, 1)], [(8, 1, 1), (8, 3, 3)], [(8, 1, 1), (12, 3, 3), (16, 3, 3)]]
    )
    poly2, two_way = count(Poly2(unit(), BETA)), count(TwoWay(unit(), unit(), BETA))
    assert poly2 == two_way - one == one
    assert count(MPoly2(unit(), unit(), BETA)) == two_way


@pytest.mark.parametrize('train', [False, True])
def test_poly2_is_x_plus_f_plus_f_of_f(train):
    m = Poly2(unit(), BETA)
    v = random_variables(m, X.shape)
    out = m.apply(v, X, True, mutable=['batch_stats'])[0] if train else m.apply(v, X)
    f = sub(v, 'f')
    fx = apply_unit(f, X, train, 0)
    ffx = apply_unit(f, fx, train, 1)  # the same weights, applied to F(x)
    np.testing.assert_allclose(out, jax.nn.relu(X + BETA * (fx + ffx)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('train', [False, True])
def test_mpoly2_is_x_plus_f_plus_g_of_f(train):
    m = MPoly2(unit(), unit(), BETA)
    v = random_variables(m, X.shape)
    out = m.apply(v, X, True, mutable=['batch_stats'])[0] if train else m.apply(v, X)
    fx = apply_unit(sub(v, 'f'), X, train)
    gfx = apply_unit(sub(v, 'g'), fx, train)
    np.testing.assert_allclose(out, jax.nn.relu(X + BETA * (fx + gfx)), rtol=1e-4, atol=1e-4)
    assert not np.allclose(v['params']['f']['up']['kernel'], v['params']['g']['up']['kernel'])


@pytest.mark.parametrize('train', [False, True])
def test_two_way_is_x_plus_f_plus_g(train):
    m = TwoWay(unit(), unit(), BETA)
    v = random_variables(m, X.shape)
    out = m.apply(v, X, True, mutable=['batch_stats'])[0] if train else m.apply(v, X)
    fx = apply_unit(sub(v, 'f'), X, train)
    gx = apply_unit(sub(v, 'g'), X, train)
    np.testing.assert_allclose(out, jax.nn.relu(X + BETA * (fx + gx)), rtol=1e-4, atol=1e-4)


def test_structures_compose_any_unit():
    # an Inception-ResNet-B unit in a poly-2 at 128 channels
    x = jnp.asarray(np.random.RandomState(1).randn(2, 8, 8, 128), jnp.float32)
    m = Poly2(InceptionResidual(128, UNIT_B), 1.0)
    v = random_variables(m, x.shape)
    f = InceptionResidual(128, UNIT_B)
    fx = f.apply(sub(v, 'f'), x, False, 0)
    np.testing.assert_allclose(
        m.apply(v, x),
        jax.nn.relu(x + fx + f.apply(sub(v, 'f'), fx, False, 1)),
        rtol=1e-4,
        atol=1e-4,
    )


def test_poly2_keeps_batchnorm_statistics_per_application():
    m = Poly2(unit(), BETA)
    v = random_variables(m, X.shape)
    _, state = m.apply(v, X, True, mutable=['batch_stats'])
    stats = state['batch_stats']['f']['branch0_0']['bn']
    # the first layer of branch 0 is a 1x1 conv of the unit's input: x, then F(x)
    kernel = v['params']['f']['branch0_0']['conv']['kernel'][0, 0]
    fx = apply_unit(sub(v, 'f'), X, True, 0)
    for app, inp in ((0, X), (1, fx)):
        batch_mean = np.asarray((inp @ kernel).mean((0, 1, 2)))
        np.testing.assert_allclose(
            stats[f'stats{app}']['mean'], 0.1 * batch_mean, rtol=1e-4, atol=1e-5
        )
    assert not np.allclose(stats['stats0']['mean'], stats['stats1']['mean'])


@pytest.mark.parametrize('train', [False, True])
def test_shared_batchnorm_matches_batchnorm(train):
    x = jnp.asarray(np.random.RandomState(2).randn(4, 5, 5, 6) * 3 + 1, jnp.float32)
    ref = batch_norm(train)
    v = ref.init(jax.random.key(0), x)
    v = {
        'params': {'scale': jnp.linspace(0.5, 2, 6), 'bias': jnp.linspace(-1, 1, 6)},
        'batch_stats': {'mean': jnp.linspace(-0.2, 0.3, 6), 'var': jnp.linspace(0.5, 1.5, 6)},
    }
    shared_v = {'params': v['params'], 'batch_stats': {'stats0': v['batch_stats']}}
    if train:
        want, want_state = ref.apply(v, x, mutable=['batch_stats'])
        got, got_state = SharedBatchNorm().apply(shared_v, x, True, mutable=['batch_stats'])
        for key in ('mean', 'var'):
            np.testing.assert_allclose(
                got_state['batch_stats']['stats0'][key],
                want_state['batch_stats'][key],
                rtol=1e-5,
                atol=1e-6,
            )
    else:
        want, got = ref.apply(v, x), SharedBatchNorm().apply(shared_v, x, False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_stochastic_paths_drop_each_term():
    m = TwoWay(unit(), unit(), BETA, drop_path=1.0 - 1e-7)
    v = random_variables(m, X.shape)
    out, _ = m.apply(v, X, True, rngs={'dropout': jax.random.key(0)}, mutable=['batch_stats'])
    np.testing.assert_allclose(out, jax.nn.relu(X), atol=1e-6)  # both residual paths dropped
