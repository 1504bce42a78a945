"""ShuffleNet v1 against the paper's Table 1 (hand counts, widths, complexity), the channel
shuffle against an independent permutation, and ShuffleNet v2's channel split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn.layers import channel_shuffle
from jaxcnn.models.shufflenet import ShuffleV2Unit
from helpers import abstract_variables, random_variables

# Zhang et al. 2018, Table 1 (ShuffleNet 1x): stage-2 output channels and complexity (MFLOPs).
TABLE1 = {1: (144, 143), 2: (200, 140), 3: (240, 137), 4: (272, 133), 8: (384, 137)}
REPEATS = (3, 7, 3)  # units after the first (stride-2) unit of stages 2, 3, 4


def v1_units(g, c2):
    """(input channels, output channels, stride, groups of the first 1x1, output size at 224 px)."""
    units, cin, size = [], 24, 56
    for s, (c, r) in enumerate(zip((c2, 2 * c2, 4 * c2), REPEATS)):
        for b in range(r + 1):
            stride = 2 if b == 0 else 1
            size //= stride
            units.append((cin, c, stride, 1 if (s == 0 and b == 0) else g, size))
            cin = c
    return units


def v1_hand_count(g, c2, num_classes=1000):
    bn = lambda c: 2 * c
    total = 3 * 3 * 3 * 24 + bn(24)  # conv1 + BN
    for cin, c, stride, g1, _ in v1_units(g, c2):
        mid = c // 4
        branch = c - cin if stride == 2 else c  # stride 2 concatenates the input
        total += cin // g1 * mid + bn(mid)  # 1x1 GConv
        total += 9 * mid + bn(mid)  # 3x3 DWConv
        total += mid // g * branch + bn(branch)  # 1x1 GConv
    return total + 4 * c2 * num_classes + num_classes  # FC


def v1_conv_mult_adds(g, c2):
    """Multiply-adds of the convolutions at 224 px (Table 1's complexity leaves out the FC)."""
    total = 112 * 112 * 27 * 24
    in_size = 56
    for cin, c, stride, g1, size in v1_units(g, c2):
        mid, branch = c // 4, c - cin if stride == 2 else c
        total += in_size**2 * cin * mid // g1 + size**2 * 9 * mid + size**2 * mid * branch // g
        in_size = size
    return total


@pytest.mark.parametrize('g', sorted(TABLE1))
def test_v1_matches_table1(g):
    c2, mflops = TABLE1[g]
    model = jaxcnn.create_model(f'shufflenet_g{g}')
    variables = abstract_variables(model, (1, 224, 224, 3))
    assert jaxcnn.count_params(variables['params']) == v1_hand_count(g, c2)
    # Table 1's complexity, to its rounding (whole MFLOPs); adding the FC (0.6-1.5M) would
    # put g = 2, 4, 8 one MFLOP above the table
    assert abs(v1_conv_mult_adds(g, c2) / 1e6 - mflops) <= 0.5
    # output channels and sizes of stages 2-4 (28, 14, 7 px at 224)
    _, state = jax.eval_shape(
        lambda v: model.apply(
            v, jnp.zeros((1, 224, 224, 3)), capture_intermediates=True, mutable=['intermediates']
        ),
        variables,
    )
    inter = state['intermediates']
    for stage, (c, size, r) in enumerate(zip((c2, 2 * c2, 4 * c2), (28, 14, 7), REPEATS)):
        assert inter[f'stage{stage + 2}'][str(r)]['__call__'][0].shape == (1, size, size, c)
    # grouped 1x1s: kernels hold in/g inputs; the first unit's first 1x1 is not grouped
    p = variables['params']
    assert p['stage2']['0']['conv1']['kernel'].shape == (1, 1, 24, c2 // 4)
    assert p['stage3']['1']['conv1']['kernel'].shape == (1, 1, 2 * c2 // g, c2 // 2)
    assert p['stage3']['0']['conv3']['kernel'].shape == (1, 1, c2 // 2 // g, c2)


def test_channel_shuffle_is_the_papers_permutation():
    """Fig. 1: reshape channels to (g, n), transpose to (n, g), flatten -- output channel
    i * g + k is input channel k * n + i (channel i of group k)."""
    g, n = 3, 4
    x = np.random.RandomState(0).randn(2, 3, 5, g * n).astype(np.float32)
    perm = np.empty(g * n, int)
    for k in range(g):
        for i in range(n):
            perm[i * g + k] = k * n + i
    np.testing.assert_array_equal(np.asarray(channel_shuffle(jnp.asarray(x), g)), x[..., perm])
    # so each group of the next grouped conv (n consecutive channels) draws on every old group
    for j in range(g):
        assert {c // n for c in perm[j * n : (j + 1) * n]} == set(range(g))


def test_v2_unit_splits_channels_and_keeps_half():
    """Fig. 3(c): the first half of the input passes untouched; after the 2-group shuffle it
    sits on the even output channels, the branch's output on the odd ones."""
    unit = ShuffleV2Unit(16, 1)
    x = jnp.asarray(np.random.RandomState(0).randn(2, 6, 6, 16), jnp.float32)
    v = random_variables(unit, x.shape)
    y = unit.apply(v, x)
    np.testing.assert_array_equal(y[..., 0::2], x[..., :8])
    # the branch reads only the second half: changing the first half leaves odd channels alone
    y2 = unit.apply(v, x.at[..., :8].set(0.0))
    np.testing.assert_array_equal(y2[..., 1::2], y[..., 1::2])
    # stride 2 (Fig. 3d): both branches see everything, the width doubles from 8 to 16 here
    down = ShuffleV2Unit(16, 2)
    xd = x[..., :8]
    assert down.apply(random_variables(down, xd.shape), xd).shape == (2, 3, 3, 16)


@pytest.mark.parametrize(
    'name,chs',
    [('shufflenet_v2_x0_5', (48, 96, 192, 1024)), ('shufflenet_v2_x2_0', (244, 488, 976, 2048))],
)
def test_v2_stage_widths_follow_table5(name, chs):
    model = jaxcnn.create_model(name)
    v = abstract_variables(model, (1, 224, 224, 3))
    _, state = jax.eval_shape(
        lambda v: model.apply(
            v, jnp.zeros((1, 224, 224, 3)), capture_intermediates=True, mutable=['intermediates']
        ),
        v,
    )
    inter = state['intermediates']
    for stage, (c, size, last) in enumerate(zip(chs, (28, 14, 7), (3, 7, 3))):
        assert inter[f'stage{stage + 2}'][str(last)]['__call__'][0].shape == (1, size, size, c)
    assert v['params']['conv5']['kernel'].shape == (1, 1, chs[2], chs[3])


@pytest.mark.parametrize('name', ['shufflenet_g3', 'shufflenet_v2_x1_0'])
def test_bad_input_is_one_clear_error(name):
    model = jaxcnn.create_model(name)
    v = abstract_variables(model, (1, 32, 32, 3))
    with pytest.raises(ValueError, match='NHWC image batch'):
        model.apply(v, jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match='at least 32x32'):
        model.apply(v, jnp.zeros((1, 16, 16, 3)))
