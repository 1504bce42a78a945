"""GhostNet: the Ghost module is concat(primary, cheap(primary)) cut to the asked width, the
bottleneck's shortcut rule, and clear errors on bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxcnn
from jaxcnn.models.ghostnet import GhostBottleneck, GhostModule
from helpers import abstract_variables, random_variables


def _bn(h, bn, stats):
    t = lambda a: torch.from_numpy(np.array(a))
    return F.batch_norm(
        h, t(stats['mean']), t(stats['var']), t(bn['scale']), t(bn['bias']), eps=1e-5
    )


@pytest.mark.parametrize('out_channels,relu', [(7, True), (10, False)])
def test_ghost_module_is_primary_and_cheap_features(out_channels, relu):
    """§3.1 with s = 2: m = ceil(n / 2) maps from a 1x1 conv, m more from a depthwise
    3x3 on them; the concatenation keeps the first n (7 of 8 when n is odd)."""
    module = GhostModule(out_channels, relu=relu)
    x = np.random.RandomState(0).randn(2, 5, 5, 6).astype(np.float32)
    v = random_variables(module, x.shape)
    rs = np.random.RandomState(1)
    v = {
        'params': v['params'],
        'batch_stats': {
            k: {
                'mean': rs.randn(*s['mean'].shape).astype(np.float32) * 0.1,
                'var': rs.uniform(0.5, 1.5, s['var'].shape).astype(np.float32),
            }
            for k, s in v['batch_stats'].items()
        },
    }
    p, st = v['params'], v['batch_stats']
    m = -(-out_channels // 2)
    assert p['primary_conv']['kernel'].shape == (1, 1, 6, m)
    assert p['cheap_conv']['kernel'].shape == (3, 3, 1, m)  # depthwise: one filter per map
    act = F.relu if relu else (lambda h: h)
    t = lambda a: torch.from_numpy(np.array(a))
    h = torch.from_numpy(x).permute(0, 3, 1, 2)
    primary = act(
        _bn(
            F.conv2d(h, t(p['primary_conv']['kernel']).permute(3, 2, 0, 1)),
            p['primary_bn'],
            st['primary_bn'],
        )
    )
    cheap = act(
        _bn(
            F.conv2d(
                primary, t(p['cheap_conv']['kernel']).permute(3, 2, 0, 1), padding=1, groups=m
            ),
            p['cheap_bn'],
            st['cheap_bn'],
        )
    )
    expected = torch.cat([primary, cheap], 1)[:, :out_channels].permute(0, 2, 3, 1).numpy()
    got = np.asarray(module.apply(v, jnp.asarray(x)))
    assert got.shape == (2, 5, 5, out_channels)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bottleneck_shortcut_is_identity_only_when_shape_is_kept():
    x = jnp.zeros((1, 8, 8, 16))
    same = random_variables(GhostBottleneck(48, 16), x.shape)['params']
    assert set(same) == {'ghost1', 'ghost2'}
    down = random_variables(GhostBottleneck(72, 24, 5, 2, 0.25), x.shape)['params']
    assert down['shortcut_dw']['kernel'].shape == (5, 5, 1, 16)
    assert down['conv_dw']['kernel'].shape == (5, 5, 1, 72)
    assert down['se']['fc1']['kernel'].shape == (1, 1, 72, 20)  # 72 / 4 = 18, rounded to 4s


def test_ghostnet_features_and_bad_input():
    model = jaxcnn.create_model('ghostnet_100')
    v = abstract_variables(model, (1, 64, 64, 3))
    feats = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((1, 64, 64, 3)), features_only=True), v
    )
    assert feats.shape == (1, 2, 2, 960)
    with pytest.raises(ValueError, match='NHWC image batch'):
        model.apply(v, jnp.zeros((64, 64, 3)))
    with pytest.raises(ValueError, match='at least 32x32'):
        model.apply(v, jnp.zeros((1, 16, 16, 3)))
