"""ConvNeXt: the stage table's shapes, the block's definition, scanned = unrolled, and the
converted model against timm with layer scales that actually matter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import jaxcnn
from jaxcnn import convert
from jaxcnn.layers.layer_scale import LayerScale
from jaxcnn.models.convnext import ConvNeXtBlock
from helpers import abstract_variables, random_variables, jit_once

SMALL = dict(depths=(1, 2, 3, 1), dims=(8, 16, 24, 32))


def test_stage_shapes_follow_the_table():
    """Patchify /4, then C, 2C, 4C, 8C at /4, /8, /16, /32; fc1 widens to 4C; blocks stacked by depth."""
    model = jaxcnn.create_model('convnext_tiny')
    params = abstract_variables(model, (1, 64, 64, 3))['params']
    assert params['stem_conv']['kernel'].shape == (4, 4, 3, 96)
    for s, (depth, c) in enumerate(zip((3, 3, 9, 3), (96, 192, 384, 768))):
        block = params[f'stages_{s}']['stacked']['block']
        assert block['conv_dw']['kernel'].shape == (depth, 7, 7, 1, c)
        assert block['fc1']['kernel'].shape == (depth, c, 4 * c)
        assert block['fc2']['kernel'].shape == (depth, 4 * c, c)
        assert block['layer_scale']['gamma'].shape == (depth, c)
        if s:
            assert params[f'stages_{s}_down_conv']['kernel'].shape == (2, 2, c // 2, c)
    assert params['head']['fc']['kernel'].shape == (768, 1000)
    feats = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((2, 96, 64, 3)), features_only=True),
        abstract_variables(model, (1, 64, 64, 3)),
    )
    assert feats.shape == (2, 3, 2, 768)
    # the layer scale starts at the paper's 1e-6
    gamma = LayerScale().init(jax.random.key(0), jnp.zeros((1, 5)))['params']['gamma']
    np.testing.assert_allclose(gamma, np.full(5, 1e-6), rtol=1e-6)


def test_block_is_dwconv_ln_mlp_gamma_residual():
    """An independent torch re-statement of the block with random O(1) gammas."""
    dim = 12
    block = ConvNeXtBlock(dim)
    x = np.random.RandomState(0).randn(2, 9, 9, dim).astype(np.float32)
    p = random_variables(block, x.shape)['params']
    p = jax.tree.map(
        lambda a: a + 0.3 * np.random.RandomState(1).randn(*a.shape).astype(np.float32), p
    )
    got = np.asarray(block.apply({'params': p}, jnp.asarray(x)))

    t = lambda a: torch.from_numpy(np.array(a))
    h = torch.from_numpy(x).permute(0, 3, 1, 2)
    h = F.conv2d(
        h,
        t(p['conv_dw']['kernel']).permute(3, 2, 0, 1).reshape(dim, 1, 7, 7),
        t(p['conv_dw']['bias']),
        padding=3,
        groups=dim,
    )  # dwconv 7x7
    h = h.permute(0, 2, 3, 1)
    h = F.layer_norm(h, (dim,), t(p['norm']['scale']), t(p['norm']['bias']), eps=1e-6)
    h = F.gelu(h @ t(p['fc1']['kernel']) + t(p['fc1']['bias']))  # 1x1 -> 4C
    assert h.shape[-1] == 4 * dim
    h = h @ t(p['fc2']['kernel']) + t(p['fc2']['bias'])  # 1x1 -> C
    expected = (torch.from_numpy(x) + t(p['layer_scale']['gamma']) * h).numpy()  # gamma, residual
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_scanned_stages_equal_unrolled_blocks():
    x = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 3), jnp.float32)
    scanned = jaxcnn.create_model('convnext_tiny', num_classes=5, **SMALL)
    unrolled = jaxcnn.create_model('convnext_tiny', num_classes=5, scan_blocks=False, **SMALL)
    v = random_variables(scanned, x.shape)
    p = dict(v['params'])
    for s, depth in enumerate(SMALL['depths']):
        stacked = p.pop(f'stages_{s}')['stacked']['block']
        p[f'stages_{s}'] = {str(b): jax.tree.map(lambda a: a[b], stacked) for b in range(depth)}
    assert jax.tree.structure(p) == jax.tree.structure(
        random_variables(unrolled, x.shape)['params']
    )
    np.testing.assert_allclose(
        scanned.apply(v, x), unrolled.apply({'params': p}, x), rtol=1e-5, atol=1e-5
    )


def test_stochastic_depth_inside_scanned_stages():
    x = jnp.asarray(np.random.RandomState(0).randn(4, 32, 32, 3), jnp.float32)
    model = jaxcnn.create_model('convnext_tiny', drop_path_rate=0.5, **SMALL)
    v = random_variables(model, x.shape)
    v = jax.tree.map(lambda a: a + 1.0, v)  # gammas 1: the blocks count
    run = jit_once(lambda k: model.apply(v, x, train=True, rngs={'dropout': k}))
    assert not np.allclose(run(jax.random.key(0)), run(jax.random.key(1)))


def test_converted_twin_matches_with_random_layer_scales():
    """timm's convnext_tiny with gammas ~ U(0.5, 1.5) (and random LayerNorm affines): at init
    gamma = 1e-6 hides the blocks, here every block changes the logits."""
    torch.manual_seed(0)
    ref = timm.create_model('convnext_tiny', pretrained=False).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, prm in ref.named_parameters():
            if name.endswith('gamma'):
                prm.uniform_(0.5, 1.5, generator=g)
            elif 'norm' in name:
                prm.normal_(1.0 if name.endswith('weight') else 0.0, 0.1, generator=g)
    variables = convert.from_torch('convnext_tiny', ref.state_dict())
    model = jaxcnn.create_model('convnext_tiny')
    x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
        # the blocks matter: the same net without its blocks gives different logits
        for s in ref.stages:
            for blk in s.blocks:
                blk.gamma.zero_()
        without_blocks = ref(torch.from_numpy(x)).numpy()
    assert np.abs(expected - without_blocks).max() > 0.1 * np.abs(expected).max()
    got = np.asarray(
        jit_once(lambda v, x: model.apply(v, x))(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    )
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert variables['params']['stages_2']['stacked']['block']['layer_scale']['gamma'].shape == (
        9,
        384,
    )


def test_pooled_features_and_bad_input():
    model = jaxcnn.create_model('convnext_tiny', num_classes=0, **SMALL)
    v = random_variables(model, (1, 32, 32, 3))
    assert model.apply(v, jnp.zeros((2, 32, 32, 3))).shape == (2, 32)
    with pytest.raises(ValueError, match='NHWC image batch'):
        model.apply(v, jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match='at least 32x32'):
        model.apply(v, jnp.zeros((1, 16, 16, 3)))
