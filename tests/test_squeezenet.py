"""SqueezeNet: counts from the Fire table (Iandola et al. 2016, Table 1), pool positions, the
class-map head, and the §6 bypass variants (identity sum, parameter counts, Table 3 sizes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision

import jaxcnn
from helpers import abstract_variables, random_variables
from jaxcnn import convert
from jaxcnn.layers import ceil_max_pool
from jaxcnn.models.squeezenet import SQUEEZENET_1_0, SQUEEZENET_1_1, Fire, layer_names, min_input


def conv(c_in, c_out, k):
    return k * k * c_in * c_out + c_out


def fire(c_in, s, e1, e3):
    return conv(c_in, s, 1) + conv(s, e1, 1) + conv(s, e3, 3)


def fire_inputs(table, c0):
    """(c_in, c_out) of fire2..fire9."""
    out, c = [], c0
    for s, e1, e3 in table['fires']:
        out.append((c, e1 + e3))
        c = e1 + e3
    return out


def n_params(name, size=224):
    return jaxcnn.count_params(
        abstract_variables(jaxcnn.create_model(name), (1, size, size, 3))['params']
    )


# Table 1 as the paper prints it: (layer, s1x1, e1x1, e3x3) and the conv1/conv10 shapes.
TABLE_1 = [
    ('fire2', 16, 64, 64),
    ('fire3', 16, 64, 64),
    ('fire4', 32, 128, 128),
    ('fire5', 32, 128, 128),
    ('fire6', 48, 192, 192),
    ('fire7', 48, 192, 192),
    ('fire8', 64, 256, 256),
    ('fire9', 64, 256, 256),
]


def test_tables_are_table_1():
    assert (
        [r[1:] for r in TABLE_1] == list(SQUEEZENET_1_0['fires']) == list(SQUEEZENET_1_1['fires'])
    )
    assert SQUEEZENET_1_0['conv1'] == (96, 7, 2) and SQUEEZENET_1_1['conv1'] == (64, 3, 2)
    assert SQUEEZENET_1_0['pools_after'] == ('conv1', 'fire4', 'fire8')
    assert SQUEEZENET_1_1['pools_after'] == ('conv1', 'fire3', 'fire5')


@pytest.mark.parametrize(
    'name,table,count',
    [('squeezenet1_0', SQUEEZENET_1_0, 1_248_424), ('squeezenet1_1', SQUEEZENET_1_1, 1_235_496)],
)
def test_hand_count_from_the_fire_table(name, table, count):
    width, k, _ = table['conv1']
    total = conv(3, width, k)
    total += sum(
        fire(c_in, *row) for (c_in, _), row in zip(fire_inputs(table, width), table['fires'])
    )
    total += conv(512, 1000, 1)  # conv10: the class maps
    assert total == count == n_params(name) == jaxcnn.model_info(name).reference_params


def test_bypass_counts_and_table_3_sizes():
    vanilla = n_params('squeezenet1_0')
    assert n_params('squeezenet1_0_simple_bypass') == vanilla  # a bypass is "just a wire"
    # complex bypass: a 1x1 conv (with bias) wherever a Fire module changes the width
    extra = sum(
        conv(c_in, c_out, 1) for c_in, c_out in fire_inputs(SQUEEZENET_1_0, 96) if c_in != c_out
    )
    assert extra == 12_416 + 33_024 + 98_688 + 197_120
    complex_count = n_params('squeezenet1_0_complex_bypass')
    assert complex_count == vanilla + extra == 1_589_672
    # Table 3 gives 32-bit model sizes in MiB: vanilla and simple bypass "4.8MB" ...
    mib = lambda n: n * 4 / 2**20
    assert round(mib(vanilla), 1) == 4.8
    # ... and "7.7MB" for the complex bypass, which Fig. 2's layout does not reach (6.06 MiB)
    assert round(mib(complex_count), 1) == 6.1


def test_bypass_modules_sit_where_the_paper_puts_them():
    names = layer_names(SQUEEZENET_1_0)
    p = abstract_variables(jaxcnn.create_model('squeezenet1_0_complex_bypass'), (1, 224, 224, 3))[
        'params'
    ]
    with_conv = {k for k in names if k.startswith('fire') and 'bypass' in p[names[k]]}
    assert with_conv == {'fire2', 'fire4', 'fire6', 'fire8'}
    assert p[names['fire2']]['bypass']['kernel'].shape == (1, 1, 96, 128)
    assert p[names['fire8']]['bypass']['kernel'].shape == (1, 1, 384, 512)
    simple = abstract_variables(
        jaxcnn.create_model('squeezenet1_0_simple_bypass'), (1, 224, 224, 3)
    )
    vanilla = abstract_variables(jaxcnn.create_model('squeezenet1_0'), (1, 224, 224, 3))
    assert jax.tree.map(lambda s: s.shape, simple) == jax.tree.map(lambda s: s.shape, vanilla)


@pytest.mark.parametrize(
    'name,pooled',
    [
        ('squeezenet1_0', ('conv1', 'fire4', 'fire8')),
        ('squeezenet1_1', ('conv1', 'fire3', 'fire5')),
    ],
)
def test_max_pools_follow_the_listed_layers(name, pooled):
    """At 224 px: torchvision's map sizes, halving (rounded up) exactly after the listed layers."""
    model = jaxcnn.create_model(name)
    table = SQUEEZENET_1_0 if name == 'squeezenet1_0' else SQUEEZENET_1_1
    names = layer_names(table)
    _, state = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0), jnp.zeros((1, 224, 224, 3)), capture_intermediates=True, mutable=True
        )
    )
    shape = lambda layer: state['intermediates'][names[layer]]['__call__'][0].shape
    order = ['conv1'] + [f'fire{k}' for k in range(2, 10)]
    sizes = [shape(layer)[1] for layer in order]
    assert sizes[0] == (109 if name == 'squeezenet1_0' else 111)
    for prev, layer, a, b in zip(order, order[1:], sizes, sizes[1:]):
        assert b == (-(-(a - 3) // 2) + 1 if prev in pooled else a), (prev, layer, sizes)
    assert sizes[-1] == 13
    assert [shape(f'fire{k}')[-1] for k in range(2, 10)] == [128, 128, 256, 256, 384, 384, 512, 512]


def test_fire_module_identity_bypass_adds_the_input():
    x = jnp.asarray(np.random.RandomState(0).randn(2, 9, 9, 128), jnp.float32)
    plain, bypassed = Fire(16, 64, 64), Fire(16, 64, 64, 'identity')
    params = plain.init(jax.random.key(0), x)
    np.testing.assert_allclose(
        bypassed.apply(params, x), plain.apply(params, x) + x, rtol=1e-6, atol=1e-6
    )


def test_simple_bypass_is_vanilla_plus_identity_at_fire_3_5_7_9():
    """Same weights in both models: every Fire output of the bypass model is the vanilla Fire
    module applied to its input, plus that input exactly at fire3, 5, 7 and 9."""
    vanilla = jaxcnn.create_model('squeezenet1_0')
    simple = jaxcnn.create_model('squeezenet1_0_simple_bypass')
    v = random_variables(vanilla, (1, 64, 64, 3))
    x = jnp.asarray(np.random.RandomState(0).randn(1, 64, 64, 3), jnp.float32)
    names = layer_names(SQUEEZENET_1_0)

    def intermediates(model, params):
        _, state = model.apply(params, x, capture_intermediates=True, mutable=['intermediates'])
        return {k: state['intermediates'][n]['__call__'][0] for k, n in names.items()}

    ours = intermediates(simple, v)
    prev = 'conv1'
    for k, (s, e1, e3) in enumerate(SQUEEZENET_1_0['fires'], start=2):
        inp = (
            jax.nn.relu(ours[prev]) if prev == 'conv1' else ours[prev]
        )  # conv1's capture is pre-ReLU
        if prev in SQUEEZENET_1_0['pools_after']:
            inp = ceil_max_pool(inp, 3, 2)
        fire_out = Fire(s, e1, e3).apply({'params': v['params'][names[f'fire{k}']]}, inp)
        expected = fire_out + inp if k in (3, 5, 7, 9) else fire_out
        np.testing.assert_allclose(ours[f'fire{k}'], expected, rtol=1e-5, atol=1e-5)
        prev = f'fire{k}'
    # up to fire2 the two models agree; from fire3 on they differ
    plain = intermediates(vanilla, v)
    np.testing.assert_array_equal(ours['fire2'], plain['fire2'])
    assert not np.allclose(ours['fire3'], plain['fire3'])
    # set fire3's expand weights and biases to zero: vanilla fire3 outputs zeros (ReLU(0)),
    # the bypass model passes fire2's output through unchanged
    p = jax.tree.map(lambda a: a, v['params'])
    p[names['fire3']] = {
        **p[names['fire3']],
        'expand1x1': jax.tree.map(jnp.zeros_like, p[names['fire3']]['expand1x1']),
        'expand3x3': jax.tree.map(jnp.zeros_like, p[names['fire3']]['expand3x3']),
    }
    zeroed_simple, zeroed_plain = (
        intermediates(simple, {'params': p}),
        intermediates(vanilla, {'params': p}),
    )
    np.testing.assert_array_equal(zeroed_plain['fire3'], 0.0)
    np.testing.assert_array_equal(zeroed_simple['fire3'], zeroed_simple['fire2'])


def test_torchvision_weights_fit_the_simple_bypass_model():
    """The bypass adds no parameter, so torchvision's squeezenet1_0 weights load unchanged."""
    sd = torchvision.models.squeezenet1_0(weights=None).state_dict()
    v = convert.from_torch('squeezenet1_0_simple_bypass', sd)
    assert jaxcnn.count_params(v['params']) == 1_248_424
    np.testing.assert_array_equal(
        v['params']['features_12']['expand3x3']['kernel'],
        sd['features.12.expand3x3.weight'].numpy().transpose(2, 3, 1, 0),
    )


def test_head_is_relu_class_maps_averaged_and_features():
    model = jaxcnn.create_model('squeezenet1_1', num_classes=10)
    v = random_variables(model, (2, 64, 64, 3))
    x = jnp.asarray(np.random.RandomState(0).randn(2, 64, 64, 3), jnp.float32)
    fmap = jaxcnn.forward_features(model, v, x)
    assert fmap.shape == (2, 3, 3, 512)  # fire9, after the pool after fire5
    fc = v['params']['head']['fc']
    class_maps = np.asarray(fmap) @ np.asarray(fc['kernel']) + np.asarray(fc['bias'])
    np.testing.assert_allclose(
        model.apply(v, x), np.maximum(class_maps, 0).mean((1, 2)), rtol=1e-4, atol=1e-5
    )
    pooled = jaxcnn.create_model('squeezenet1_1', num_classes=0).apply(v, x)
    np.testing.assert_allclose(pooled, np.asarray(fmap).mean((1, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    'name,table', [('squeezenet1_0', SQUEEZENET_1_0), ('squeezenet1_1', SQUEEZENET_1_1)]
)
def test_min_input(name, table):
    size = min_input(table)
    assert jaxcnn.model_info(name).min_input == size == (29 if name == 'squeezenet1_0' else 25)
    model = jaxcnn.create_model(name)
    assert abstract_variables(model, (1, size, size, 3))
    with pytest.raises(ValueError, match=f'at least {size}x{size}'):
        abstract_variables(model, (1, size - 1, size - 1, 3))
