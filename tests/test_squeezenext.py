"""SqueezeNext: one block counted from the formula, the whole 23-layer nets counted from it
(Gholami et al. 2018: 1.0-SqNxt-23 has 0.72M), the separable 3x1 / 1x3 shapes and the stage sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from helpers import abstract_variables, random_variables
from jaxcnn.models.squeezenext import SQNXT23, STAGE_WIDTHS


def conv_bn(c_in, c_out, kh, kw=None):
    """A bias-free convolution followed by BatchNorm (scale and shift)."""
    return kh * (kw or kh) * c_in * c_out + 2 * c_out


def block_params(c_in, c_out, stride):
    """1x1 (C/r) -> 1x1 (C/2r) -> 3x1 (C/r) -> 1x3 (C/r) -> 1x1 (out) [+ 1x1 shortcut], where
    r = 2 normally (C/2, C/4), 1 at a stride-2 block, 4 when the block narrows its input."""
    r = 1 if stride == 2 else 4 if c_in > c_out else 2
    a, b = c_in // r, c_in // (2 * r)
    n = (
        conv_bn(c_in, a, 1)
        + conv_bn(a, b, 1)
        + conv_bn(b, a, 3, 1)
        + conv_bn(a, a, 1, 3)
        + conv_bn(a, c_out, 1)
    )
    if stride != 1 or c_in != c_out:
        n += conv_bn(c_in, c_out, 1)
    return n


def sqnxt_params(width, depths=SQNXT23, final=128, num_classes=1000):
    stem = int(64 * width)
    total, c = conv_bn(3, stem, 7), stem
    for s, (n, w) in enumerate(zip(depths, STAGE_WIDTHS)):
        for i in range(n):
            total += block_params(c, int(w * width), 2 if i == 0 and s > 0 else 1)
            c = int(w * width)
    return total + conv_bn(c, final, 1) + final * num_classes  # bias-free classifier


def params_of(name, **kw):
    model = jaxcnn.create_model(name, **kw)
    return abstract_variables(model, (1, 227, 227, 3))['params']


def test_one_block_by_hand():
    """A 64-channel block: 64*32 + 32*16 + 3*16*32 + 3*32*32 + 32*64 weights, BN on each."""
    p = params_of('sqnxt23_w1')
    by_hand = (
        (64 * 32 + 2 * 32)
        + (32 * 16 + 2 * 16)
        + (3 * 16 * 32 + 2 * 32)
        + (3 * 32 * 32 + 2 * 32)
        + (32 * 64 + 2 * 64)
    )
    assert jaxcnn.count_params(p['stage2']['1']) == block_params(64, 64, 1) == by_hand == 9_568
    # the stride-2 block opening stage 2 (32 -> 64) and the narrowing first block (64 -> 32)
    assert jaxcnn.count_params(p['stage2']['0']) == block_params(32, 64, 2)
    assert jaxcnn.count_params(p['stage1']['0']) == block_params(64, 32, 1)
    assert (
        'shortcut' not in p['stage2']['1']
        and 'shortcut' in p['stage2']['0']
        and 'shortcut' in p['stage1']['0']
    )


@pytest.mark.parametrize(
    'name,width,count', [('sqnxt23_w1', 1.0, 717_280), ('sqnxt23_w2', 2.0, 2_377_408)]
)
def test_network_count_from_the_block_formula(name, width, count):
    assert jaxcnn.count_params(params_of(name)) == sqnxt_params(width) == count
    info = jaxcnn.model_info(name)
    if info.params_rounding:  # the paper's "0.72M"
        assert round(count / 1e6, 2) == info.reference_params / 1e6 == 0.72
    else:
        assert info.reference_params == count
    assert SQNXT23 == (6, 6, 8, 1) and sum(SQNXT23) + 2 == 23  # conv1 + 21 blocks + final 1x1


def test_separable_3x1_and_1x3_shapes():
    p = params_of('sqnxt23_w1')
    kernel = lambda block, conv: (
        p[block.split('/')[0]][block.split('/')[1]][conv]['conv']['kernel'].shape
    )
    # block 0 (stage 1, narrowing 64 -> 32): 3x1 on 8 -> 16 channels, then 1x3 on 16 -> 16
    assert kernel('stage1/0', 'sep1') == (3, 1, 8, 16) and kernel('stage1/0', 'sep2') == (
        1,
        3,
        16,
        16,
    )
    # the released definitions alternate the order: block 1 has the 1x3 first
    assert kernel('stage1/1', 'sep1') == (1, 3, 8, 16) and kernel('stage1/1', 'sep2') == (
        3,
        1,
        16,
        16,
    )
    assert kernel('stage4/0', 'sep1') == (3, 1, 64, 128)  # block 20: stride-2 block, C = 128
    assert kernel('stage1/1', 'reduce1') == (1, 1, 32, 16)  # C/2
    assert kernel('stage1/1', 'reduce2') == (1, 1, 16, 8)  # C/4
    assert kernel('stage1/1', 'expand') == (1, 1, 16, 32)
    fixed = params_of('sqnxt23_w1', alternate_separable=False)
    assert all(
        block['sep1']['conv']['kernel'].shape[:2] == (3, 1)
        for stage in fixed
        if stage.startswith('stage')
        for block in fixed[stage].values()
    )
    assert jaxcnn.count_params(fixed) == jaxcnn.count_params(p)
    # a separable conv keeps the map size: it pads along its long axis only
    model = jaxcnn.create_model('sqnxt23_w1')
    _, state = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0), jnp.zeros((1, 227, 227, 3)), capture_intermediates=True, mutable=True
        )
    )
    inter = state['intermediates']['stage3']['1']
    assert (
        inter['sep1']['conv']['__call__'][0].shape
        == inter['sep2']['conv']['__call__'][0].shape
        == (1, 14, 14, 64)
    )  # C/2 of a 128-channel block


@pytest.mark.parametrize('size,maps', [(227, (55, 55, 28, 14, 7)), (224, (54, 54, 27, 14, 7))])
def test_stage_output_sizes(size, maps):
    model = jaxcnn.create_model('sqnxt23_w2')
    _, state = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0),
            jnp.zeros((1, size, size, 3)),
            capture_intermediates=True,
            mutable=True,
        )
    )
    inter = state['intermediates']
    stem = inter['stem']['__call__'][0].shape
    assert stem == (1, (size - 7) // 2 + 1, (size - 7) // 2 + 1, 128)  # unpadded 7x7/2
    pooled, *stages = maps
    last = [(f'stage{s + 1}', f'{n - 1}') for s, n in enumerate(SQNXT23)]
    got = [inter[stage][b]['__call__'][0].shape for stage, b in last]
    assert got == [(1, m, m, 2 * w) for m, w in zip(stages, STAGE_WIDTHS)]
    assert inter['stage1']['0']['reduce1']['__call__'][0].shape[1] == pooled  # after the 3x3/2 pool
    assert inter['final']['__call__'][0].shape == (1, maps[-1], maps[-1], 128)


def test_features_head_and_drop_path():
    model = jaxcnn.create_model('sqnxt23_w1', num_classes=10)
    v = random_variables(model, (2, 64, 64, 3))
    x = jnp.asarray(np.random.RandomState(0).randn(2, 64, 64, 3), jnp.float32)
    fmap = jaxcnn.forward_features(model, v, x)
    assert fmap.shape == (2, 2, 2, 128)
    pooled = jaxcnn.create_model('sqnxt23_w1', num_classes=0).apply(v, x)
    np.testing.assert_allclose(pooled, np.asarray(fmap).mean((1, 2)), rtol=1e-5, atol=1e-6)
    assert set(v['params']['head']['fc']) == {'kernel'}  # bias-free classifier
    np.testing.assert_allclose(
        model.apply(v, x), pooled @ v['params']['head']['fc']['kernel'], rtol=1e-4, atol=1e-5
    )
    dp = jaxcnn.create_model('sqnxt23_w1', num_classes=10, drop_path_rate=0.5)
    run = lambda k: dp.apply(
        v, x, train=True, rngs={'dropout': jax.random.key(k)}, mutable=['batch_stats']
    )[0]
    assert not np.allclose(run(0), run(1))
