"""MobileNetV2/V3, MnasNet and FBNet: the paper tables' shapes, h-swish / hard-sigmoid, width
multipliers, MobileNetV3's efficient last stage, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxcnn
from jaxcnn.layers import hard_sigmoid, hard_swish, make_divisible
from jaxcnn.models.mobilenet import MOBILENETV2_TABLE, MOBILENETV3_LARGE
from helpers import abstract_variables, random_variables, jit_once


def _stage_outputs(name, size=224, **kw):
    """Output shape of the last block of every stage (unrolled) and of the head conv."""
    model = jaxcnn.create_model(name, scan_blocks=False, **kw)
    x = jnp.zeros((1, size, size, 3))
    v = abstract_variables(model, x.shape)

    def run(v, x):
        return model.apply(v, x, capture_intermediates=True, mutable=['intermediates'])[1]

    inter = jax.eval_shape(run, v, x)['intermediates']
    stages = sorted(int(k.split('_')[1]) for k in inter if k.startswith('blocks_'))
    last = lambda s: max(int(b) for b in inter[f'blocks_{s}'] if b.isdigit())
    return (
        [inter[f'blocks_{s}'][str(last(s))]['__call__'][0].shape[1:] for s in stages],
        inter,
        v['params'],
    )


def test_mobilenetv2_table2_shapes_at_224():
    """Sandler et al. 2018, Table 2: 112^2x16, 56^2x24, 28^2x32, 14^2x64, 14^2x96, 7^2x160,
    7^2x320, then the 1x1 conv to 7^2x1280 (after a 112^2x32 stem)."""
    shapes, inter, params = _stage_outputs('mobilenetv2_100')
    assert shapes == [
        (112, 112, 16),
        (56, 56, 24),
        (28, 28, 32),
        (14, 14, 64),
        (14, 14, 96),
        (7, 7, 160),
        (7, 7, 320),
    ]
    assert [c for _, c, _, _ in MOBILENETV2_TABLE] == [s[-1] for s in shapes]
    assert params['conv_stem']['kernel'].shape == (3, 3, 3, 32)
    assert params['conv_head']['kernel'].shape == (1, 1, 320, 1280)
    # n blocks per row; expansion t of the block input (t = 1: no expansion conv)
    for s, (t, c, n, _) in enumerate(MOBILENETV2_TABLE):
        assert str(n - 1) in params[f'blocks_{s}'] and str(n) not in params[f'blocks_{s}']
    assert 'conv_pw' in params['blocks_0']['0'] and 'conv_pwl' not in params['blocks_0']['0']
    assert params['blocks_1']['0']['conv_pw']['kernel'].shape == (1, 1, 16, 96)  # t=6 on 16
    assert params['blocks_1']['0']['conv_dw']['kernel'].shape == (3, 3, 1, 96)  # depthwise


def test_linear_bottleneck_and_relu6():
    """No activation after the projection: a block's output can be negative and above 6."""
    model = jaxcnn.create_model('mobilenetv2_050', num_classes=0)
    x = jnp.asarray(np.random.RandomState(0).randn(1, 32, 32, 3), jnp.float32)
    v = random_variables(model, x.shape)
    _, st = jit_once(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=['intermediates'])
    )(v, x)
    out = np.asarray(st['intermediates']['blocks_1']['0']['__call__'][0])
    assert out.min() < 0
    assert model.act == 'relu6'


def test_hard_swish_and_hard_sigmoid_definitions():
    """Howard et al. 2019, eq. in §5.2: h-swish(x) = x ReLU6(x + 3) / 6; hard-sigmoid ReLU6(x + 3) / 6."""
    x = np.linspace(-8, 8, 161).astype(np.float32)
    np.testing.assert_allclose(hard_sigmoid(x), np.clip(x + 3, 0, 6) / 6, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(hard_swish(x), x * np.clip(x + 3, 0, 6) / 6, rtol=1e-6, atol=1e-7)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(hard_swish(x), torch.nn.functional.hardswish(t).numpy(), atol=1e-6)
    np.testing.assert_allclose(
        hard_sigmoid(x), torch.nn.functional.hardsigmoid(t).numpy(), atol=1e-6
    )
    assert float(hard_sigmoid(-3.0)) == 0.0 and float(hard_sigmoid(3.0)) == 1.0
    assert float(hard_swish(-3.0)) == 0.0 and float(hard_swish(4.0)) == 4.0


def test_width_multiplier():
    """Every stage width x alpha rounded to a multiple of 8 (never > 10 % down); the stem scales
    too; MobileNetV2's 1280 head only grows (1.4 -> 1792), MobileNetV3 keeps a fixed stem below 0.75."""
    for w in (0.5, 1.4):
        shapes, _, params = _stage_outputs(f'mobilenetv2_{round(w * 100):03d}', size=64)
        assert [s[-1] for s in shapes] == [
            make_divisible(c * w) for _, c, _, _ in MOBILENETV2_TABLE
        ]
        assert params['conv_stem']['kernel'].shape[-1] == make_divisible(32 * w)
        assert params['conv_head']['kernel'].shape[-1] == max(1280, make_divisible(1280 * w))
    assert make_divisible(24 * 0.35) == 8 and make_divisible(20) == 24  # 16 would drop > 10 %
    small = lambda name: abstract_variables(jaxcnn.create_model(name), (1, 64, 64, 3))['params']
    assert small('mobilenetv3_small_050')['conv_stem']['kernel'].shape[-1] == 16  # fixed stem
    assert small('mobilenetv3_small_075')['conv_stem']['kernel'].shape[-1] == 16  # round(12) -> 16
    # a width multiplier is an ordinary override of any registered model
    n = lambda **kw: jaxcnn.count_params(
        abstract_variables(jaxcnn.create_model('mobilenetv2_100', **kw), (1, 32, 32, 3))['params']
    )
    assert n(width_mult=0.5) == jaxcnn.model_info('mobilenetv2_050').reference_params


def test_mobilenetv3_table1_and_efficient_last_stage():
    """Table 1: expansion widths 64, 72, 72, 120, ... as absolute mid channels; SE = expanded/4
    rounded to 8 with a hard-sigmoid gate; pooled 960 -> 1280 linear (no BN) -> h-swish -> fc."""
    model = jaxcnn.create_model('mobilenetv3_large_100', scan_blocks=False)
    p = abstract_variables(model, (1, 32, 32, 3))['params']
    mids = [
        p[f'blocks_{s}'][str(b)]['conv_pw']['kernel'].shape[-1]
        for s, b in [
            (1, 0),
            (1, 1),
            (2, 0),
            (2, 1),
            (3, 0),
            (3, 1),
            (3, 2),
            (4, 0),
            (4, 1),
            (5, 0),
            (5, 1),
        ]
    ]
    assert mids == [64, 72, 72, 120, 240, 200, 184, 480, 672, 672, 960]
    assert p['blocks_2']['0']['se']['fc1']['kernel'].shape == (1, 1, 72, 24)  # 72/4 = 18 -> 24
    assert 'se' not in p['blocks_3']['0']
    assert p['blocks_6']['0']['conv']['kernel'].shape == (1, 1, 160, 960)
    assert p['conv_head']['kernel'].shape == (960, 1280) and 'bias' in p['conv_head']
    assert model.se_gate == 'hard_sigmoid' and model.act == 'hard_swish'
    assert MOBILENETV3_LARGE[2][0].act == 'relu' and MOBILENETV3_LARGE[3][0].act == 'hard_swish'
    x = jnp.asarray(np.random.RandomState(0).randn(2, 64, 64, 3), jnp.float32)
    features = jaxcnn.create_model('mobilenetv3_large_100', num_classes=0)
    v = random_variables(features, x.shape)
    assert jax.eval_shape(lambda: features.apply(v, x)).shape == (2, 1280)  # pre-logits
    assert jax.eval_shape(lambda: features.apply(v, x, features_only=True)).shape == (2, 2, 2, 960)


@pytest.mark.parametrize(
    'name,stages',
    [
        (
            'mnasnet_100',
            [
                (112, 112, 16),
                (56, 56, 24),
                (28, 28, 40),
                (14, 14, 80),
                (14, 14, 96),
                (7, 7, 192),
                (7, 7, 320),
            ],
        ),
        (
            'fbnetc_100',
            [
                (112, 112, 16),
                (56, 56, 24),
                (28, 28, 32),
                (14, 14, 64),
                (14, 14, 112),
                (7, 7, 184),
                (7, 7, 352),
            ],
        ),
        (
            'mobilenetv3_small_100',
            [(56, 56, 16), (28, 28, 24), (14, 14, 40), (14, 14, 48), (7, 7, 96), (7, 7, 576)],
        ),
    ],
)
def test_searched_networks_stage_shapes(name, stages):
    shapes, _, _ = _stage_outputs(name)
    assert shapes == stages


def test_drop_path_only_in_training():
    x = jnp.asarray(np.random.RandomState(0).randn(4, 32, 32, 3), jnp.float32)
    model = jaxcnn.create_model('mobilenetv2_050', drop_path_rate=0.5, drop_rate=0.0)
    v = random_variables(model, x.shape)
    run = jit_once(
        lambda k: model.apply(
            v, x, train=True, rngs={'dropout': jax.random.key(k)}, mutable=['batch_stats']
        )[0]
    )
    assert not np.allclose(run(0), run(1))
    # the same rates off (inference) or at zero give the deterministic network
    model0 = jaxcnn.create_model('mobilenetv2_050', drop_path_rate=0.0, drop_rate=0.0)
    run0 = jit_once(
        lambda k: model0.apply(
            v, x, train=True, rngs={'dropout': jax.random.key(k)}, mutable=['batch_stats']
        )[0]
    )
    np.testing.assert_array_equal(run0(0), run0(1))


def test_bad_input_is_one_line_error():
    model = jaxcnn.create_model('mobilenetv2_100')
    with pytest.raises(ValueError, match='NHWC'):
        model.init(jax.random.key(0), jnp.zeros((3, 224, 224)))
    with pytest.raises(TypeError, match='unknown argument'):
        jaxcnn.create_model('mobilenetv3_large_100', width=0.5)
