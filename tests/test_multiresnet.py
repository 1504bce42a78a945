"""Multi-residual networks (Abdi & Nahavandi 2016): the block formula x + sum_i F_i(x) from its
own functions, the first unit's shared pre-activation and projection, scanned = unrolled, and
the CIFAR rows counted by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from helpers import abstract_variables, random_variables, jit_once
from jaxcnn.models.multiresnet import MultiResidualUnit, ResidualFunction, units_per_stage

X = jnp.asarray(np.random.RandomState(0).randn(4, 8, 8, 16), jnp.float32)


def n_params(**kw):
    model = jaxcnn.create_model('multiresnet200_k5', **kw)
    return jaxcnn.count_params(abstract_variables(model, (1, 32, 32, 3))['params'])


def multiresnet_hand_count(depth, k, width=1, bottleneck=True, num_classes=10):
    """Layer by layer from the unit definitions (pre-activation, 3x3 stem of 16, 1x1 projection
    in each stage's first unit where the shape changes, convolutions without bias)."""
    bn = lambda c: 2 * c
    n = (depth - 2) // (9 if bottleneck else 6)
    total, c_in = 9 * 3 * 16, 16
    for base in (16, 32, 64):
        p = base * width
        out = 4 * p if bottleneck else p
        for u in range(n):
            if u == 0:
                total += bn(c_in) + (c_in * out if c_in != out else 0)  # shared BN-ReLU, shortcut
            for _ in range(k):
                total += 0 if u == 0 else bn(c_in)  # each F_i's own BN-ReLU
                if bottleneck:
                    total += c_in * p + bn(p) + 9 * p * p + bn(p) + p * out
                else:
                    total += 9 * c_in * p + bn(p) + 9 * p * p
            c_in = out
    return total + bn(c_in) + c_in * num_classes + num_classes


def test_multiresnet200_k5_hand_count_rounds_to_the_table():
    n = n_params()
    assert n == multiresnet_hand_count(200, 5) == 10_187_354
    assert round(n / 1e5) / 10 == 10.2  # the table's 10.2M
    info = jaxcnn.model_info('multiresnet200_k5')
    assert abs(n - info.reference_params) <= info.params_rounding / 2


def test_other_rows_counted_by_the_same_rule():
    # depth 398, k = 5: the table's 20.4M
    assert n_params(depth=398) == multiresnet_hand_count(398, 5) == 20_388_314
    # k = 1 is the pre-activation ResNet: multiresnet-164 with one function = ResNet-164
    resnet164 = jaxcnn.create_model('resnet164')
    assert n_params(depth=164, k=1) == jaxcnn.count_params(
        abstract_variables(resnet164, (1, 32, 32, 3))['params']
    )
    # the wide basic-block layout (depth 26, width 10, k = 2)
    assert n_params(depth=26, k=2, width=10, block='basic') == multiresnet_hand_count(
        26, 2, 10, False
    )


def test_depth_rule():
    assert units_per_stage(200, 'bottleneck') == 22 and units_per_stage(26, 'basic') == 4
    with pytest.raises(ValueError, match='9n \\+ 2'):
        units_per_stage(201, 'bottleneck')


def function_apply(v, name, x, block, planes, stride=1, preact=True, train=False):
    sub = {'params': v['params'][name], 'batch_stats': v['batch_stats'][name]}
    f = ResidualFunction(block, planes, stride, preact)
    if train:
        return f.apply(sub, x, True, mutable=['batch_stats'])[0]
    return f.apply(sub, x)


@pytest.mark.parametrize('block,planes', [('bottleneck', 4), ('basic', 16)])
@pytest.mark.parametrize('train', [False, True])
def test_block_is_identity_plus_sum_of_its_functions(block, planes, train):
    k = 3
    unit = MultiResidualUnit(block, planes, k)
    v = random_variables(unit, X.shape)
    assert sorted(v['params']) == ['f1', 'f2', 'f3']  # k functions, own weights
    out = unit.apply(v, X, train, mutable=['batch_stats'])[0] if train else unit.apply(v, X)
    expected = X + sum(function_apply(v, f'f{i}', X, block, planes, train=train) for i in (1, 2, 3))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_first_unit_shares_its_preactivation_and_projects():
    unit = MultiResidualUnit('bottleneck', 8, 2, stride=2, first=True)
    v = random_variables(unit, X.shape)
    assert sorted(v['params']) == ['bn', 'f1', 'f2', 'shortcut']
    p, s = v['params'], v['batch_stats']
    mean, var = s['bn']['mean'], s['bn']['var']
    h = jax.nn.relu((X - mean) / jnp.sqrt(var + 1e-5) * p['bn']['scale'] + p['bn']['bias'])
    shortcut = jax.lax.conv_general_dilated(
        h, p['shortcut']['kernel'], (2, 2), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    fs = [function_apply(v, f, h, 'bottleneck', 8, stride=2, preact=False) for f in ('f1', 'f2')]
    np.testing.assert_allclose(unit.apply(v, X), shortcut + fs[0] + fs[1], rtol=1e-4, atol=1e-4)


def _unstack(tree):
    """Scanned variables (stage{s}/stacked/block, stacked) -> unrolled stage{s}/1.."""
    out = {}
    for key, val in tree.items():
        if isinstance(val, dict) and 'stacked' in val:
            stacked = val['stacked']['block']
            n = jax.tree.leaves(stacked)[0].shape[0]
            out[key] = {b: sub for b, sub in val.items() if b != 'stacked'}
            for i in range(n):
                out[key][str(i + 1)] = jax.tree.map(lambda a: a[i], stacked)
        else:
            out[key] = val
    return out


def test_scanned_units_equal_unrolled_units():
    kw = dict(depth=38, k=2, num_classes=5)  # 4 units per stage
    scanned = jaxcnn.create_model('multiresnet200_k5', **kw)
    unrolled = jaxcnn.create_model('multiresnet200_k5', scan_blocks=False, **kw)
    x = jnp.asarray(np.random.RandomState(0).randn(2, 16, 16, 3), jnp.float32)
    v = random_variables(scanned, x.shape)
    assert 'stacked' in v['params']['stage2'] and '1' not in v['params']['stage2']
    v_unrolled = {c: _unstack(t) for c, t in v.items()}
    assert jax.tree.structure(v_unrolled) == jax.tree.structure(
        abstract_variables(unrolled, x.shape)
    )
    np.testing.assert_allclose(
        jit_once(scanned.apply)(v, x), jit_once(unrolled.apply)(v_unrolled, x), rtol=1e-4, atol=1e-4
    )


def test_stochastic_depth_drops_the_whole_residual_sum():
    unit = MultiResidualUnit('basic', 16, 2, drop_path=1.0 - 1e-7)
    v = random_variables(unit, X.shape)
    out, _ = unit.apply(v, X, True, rngs={'dropout': jax.random.key(0)}, mutable=['batch_stats'])
    np.testing.assert_allclose(out, X, atol=1e-6)  # every sample keeps only the identity
