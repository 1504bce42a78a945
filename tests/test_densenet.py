"""DenseNet: counts from the paper's layer formulas, channel widths after every block and
transition, real concatenation, torchvision's keys, the memory-efficient variant and bad input."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision

import jaxcnn
from helpers import abstract_variables, random_variables, jit_once
from jaxcnn import convert
from jaxcnn.models.densenet import DenseBlock, cifar_depths


def bn(c):
    return 2 * c  # scale and bias (running statistics are not parameters)


def densenet_hand_count(
    k, blocks, stem_width, stem_kernel, bottleneck=True, theta=0.5, bn_size=4, num_classes=10
):
    """Parameters of a DenseNet(-B)(-C) from §3 of Huang et al.: each layer of a block sees
    c_0 + (l - 1) k channels and is BN-ReLU-conv1x1(bn_size k)-BN-ReLU-conv3x3(k) (or just
    BN-ReLU-conv3x3(k) without the bottleneck); a transition is BN-ReLU-conv1x1(floor(theta m));
    then the final BN and the classifier. Convolutions have no biases."""
    total = stem_kernel * stem_kernel * 3 * stem_width
    if stem_kernel == 7:
        total += bn(stem_width)  # the ImageNet stem is conv-BN-ReLU-pool
    c = stem_width
    for b, n in enumerate(blocks):
        for l in range(n):
            c_in = c + l * k
            if bottleneck:
                total += bn(c_in) + c_in * bn_size * k + bn(bn_size * k) + 9 * bn_size * k * k
            else:
                total += bn(c_in) + 9 * c_in * k
        c += n * k
        if b < len(blocks) - 1:
            total += bn(c) + c * int(theta * c)
            c = int(theta * c)
    return total + bn(c) + c * num_classes + num_classes


def n_params(name, size=None, **kw):
    model = jaxcnn.create_model(name, **kw)
    s = size or jaxcnn.model_info(name).input_size[0]
    return jaxcnn.count_params(abstract_variables(model, (1, s, s, 3))['params'])


def test_densenet_bc_100_hand_count_rounds_to_the_papers_figure():
    # L = 100 weight layers: stem, 2 transitions, classifier, and 3 x 16 two-conv dense layers
    assert (100 - 4) % 6 == 0 and (100 - 4) // 6 == 16
    expected = densenet_hand_count(12, (16, 16, 16), 24, 3)
    assert n_params('densenet_bc_100_k12') == expected == 769_162
    assert round(expected / 1e5) * 1e5 == 0.8e6  # Table 2: 0.8M
    info = jaxcnn.model_info('densenet_bc_100_k12')
    assert (info.reference_params, info.params_rounding) == (0.8e6, 1e5)


@pytest.mark.parametrize(
    'name,k,blocks,stem',
    [
        ('densenet121', 32, (6, 12, 24, 16), 64),
        ('densenet169', 32, (6, 12, 32, 32), 64),
        ('densenet201', 32, (6, 12, 48, 32), 64),
        ('densenet161', 48, (6, 12, 36, 24), 96),
    ],
)
def test_imagenet_counts_are_the_same_formula(name, k, blocks, stem):
    # Table 1's rows through the same formula give torchvision's exact counts
    expected = densenet_hand_count(k, blocks, stem, 7, num_classes=1000)
    assert expected == jaxcnn.model_info(name).reference_params
    assert n_params(name, 64) == expected


@pytest.mark.parametrize(
    'depth,k,bottleneck,paper_m',
    [(40, 12, False, 1.0), (100, 24, False, 27.2), (190, 40, True, 25.6)],
)
def test_every_table_2_row_is_data(depth, k, bottleneck, paper_m):
    """Other Table 2 networks are the same class with other data: plain DenseNet (no
    bottleneck, no compression, 16-channel stem) and DenseNet-BC (2k stem, theta = 0.5).
    (L = 100, k = 12: 7.0M and BC L = 250, k = 24: 15.3M also match; left out for time.)"""
    kw = dict(
        growth_rate=k,
        depths=cifar_depths(depth, bottleneck),
        stem_width=2 * k if bottleneck else 16,
        bn_size=4 if bottleneck else None,
        compression=0.5 if bottleneck else 1.0,
    )
    got = n_params('densenet_bc_100_k12', 32, **kw)
    assert got == densenet_hand_count(
        k, kw['depths'], kw['stem_width'], 3, bottleneck, kw['compression']
    )
    assert round(got / 1e5) / 10 == paper_m, got


def test_cifar_depths():
    assert cifar_depths(100) == (16, 16, 16)
    assert cifar_depths(40, bottleneck=False) == (12, 12, 12)
    with pytest.raises(ValueError, match='needs depth 4 \\+ 6 \\* n, got 99'):
        cifar_depths(99)


def _widths(name, size):
    """(name, shape) of conv0's output, then every dense block's and transition's, in order."""
    model = jaxcnn.create_model(name)
    x = jnp.zeros((1, size, size, 3))
    keep = lambda m, _: (m.name or '').startswith(('conv0', 'denseblock', 'transition'))
    _, state = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0), x, capture_intermediates=keep, mutable=True
        )
    )
    inter = state['intermediates']
    order = ['conv0'] + [n for i in range(1, 5) for n in (f'denseblock{i}', f'transition{i}')]
    return [(n, inter[n]['__call__'][0].shape) for n in order if n in inter]


@pytest.mark.parametrize(
    'name,channels',
    [
        ('densenet121', [64, 256, 128, 512, 256, 1024, 512, 1024]),
        ('densenet169', [64, 256, 128, 512, 256, 1280, 640, 1664]),
        ('densenet201', [64, 256, 128, 512, 256, 1792, 896, 1920]),
        ('densenet161', [96, 384, 192, 768, 384, 2112, 1056, 2208]),
    ],
)
def test_channels_after_each_block_and_transition(name, channels):
    """A block adds (layers x k) channels, a transition halves them and the map: 224 px gives
    56 after the stem, then 28, 14 and 7 (Table 1's output sizes)."""
    got = _widths(name, 224)
    assert [s[-1] for _, s in got] == channels
    sizes = [s[1] for n, s in got if n != 'conv0']
    assert sizes == [56, 28, 28, 14, 14, 7, 7]
    assert got[0][1][1] == 112  # 7x7/2 conv, then the 3x3/2 max-pool
    # the classifier reads the last block's width (torchvision's classifier.in_features)
    p = abstract_variables(jaxcnn.create_model(name), (1, 64, 64, 3))['params']
    assert p['head']['fc']['kernel'].shape == (channels[-1], 1000)


def test_cifar_channels_and_sizes():
    got = _widths('densenet_bc_100_k12', 32)
    # stem 2k = 24; +16 x 12 = 216; /2 = 108; +192 = 300; /2 = 150; +192 = 342
    assert [s[-1] for _, s in got] == [24, 216, 108, 300, 150, 342]
    assert [s[1] for _, s in got] == [32, 32, 16, 16, 8, 8]
    model = jaxcnn.create_model('densenet_bc_100_k12', depths=(2, 2, 2))
    x = jnp.ones((2, 28, 28, 3))
    fmap = jaxcnn.forward_features(model, random_variables(model, x.shape), x)
    # Fashion-MNIST's 28 px: 28 -> 14 -> 7; channels 24 -> 48 -> 24 -> 48 -> 24 -> 48, after BN-ReLU
    assert fmap.shape == (2, 7, 7, 48) and (np.asarray(fmap) >= 0).all()


def test_dense_connectivity_concatenates():
    """Layer l's input is [x_0, x_1, ..., x_{l-1}]: the block input unchanged as its first
    channels, then each earlier layer's k new maps in order; the block returns all of them."""
    c0, k, n = 5, 3, 4
    block = DenseBlock(num_layers=n, growth_rate=k)
    x = jnp.asarray(np.random.RandomState(0).randn(2, 6, 6, c0), jnp.float32)
    v = random_variables(block, x.shape)
    seen, outputs = {}, {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == '__call__' and mod.name == 'norm1':
            seen[mod.parent.name] = args[0]  # what H_l's first BN reads
        if context.method_name == '__call__' and (mod.name or '').startswith('denselayer'):
            outputs[mod.name] = out
        return out

    with nn.intercept_methods(record):
        y = block.apply(v, x, train=False)
    assert y.shape == (2, 6, 6, c0 + n * k)
    np.testing.assert_array_equal(y[..., :c0], x)
    for l in range(1, n + 1):
        inp = seen[f'denselayer{l}']
        assert inp.shape[-1] == c0 + (l - 1) * k
        np.testing.assert_array_equal(inp[..., :c0], x)
        np.testing.assert_array_equal(inp, y[..., : c0 + (l - 1) * k])
        assert outputs[f'denselayer{l}'].shape[-1] == k
        np.testing.assert_array_equal(
            y[..., c0 + (l - 1) * k : c0 + l * k], outputs[f'denselayer{l}']
        )


def test_dense_block_input_passes_through_in_the_full_model():
    model = jaxcnn.create_model('densenet_bc_100_k12', depths=(3, 3, 3))
    x = jnp.asarray(np.random.RandomState(1).randn(1, 16, 16, 3), jnp.float32)
    v = random_variables(model, x.shape)
    io = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == '__call__' and (context.module.name or '').startswith(
            'denseblock'
        ):
            io[context.module.name] = (args[0], out)
        return out

    with nn.intercept_methods(record):
        model.apply(v, x, train=False)
    assert sorted(io) == ['denseblock1', 'denseblock2', 'denseblock3']
    for inp, out in io.values():
        assert out.shape[-1] == inp.shape[-1] + 3 * 12
        np.testing.assert_array_equal(out[..., : inp.shape[-1]], inp)


def test_torchvision_keys_convert_by_name():
    ref = torchvision.models.densenet121(weights=None)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    v = convert.from_torch('densenet121', sd)
    p, s = v['params'], v['batch_stats']
    np.testing.assert_array_equal(
        p['denseblock1']['denselayer1']['norm1']['scale'],
        sd['features.denseblock1.denselayer1.norm1.weight'],
    )
    np.testing.assert_array_equal(
        p['denseblock3']['denselayer24']['conv2']['kernel'],
        sd['features.denseblock3.denselayer24.conv2.weight'].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        p['transition1']['conv']['kernel'],
        sd['features.transition1.conv.weight'].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(s['norm5']['var'], sd['features.norm5.running_var'])
    np.testing.assert_array_equal(p['head']['fc']['kernel'], sd['classifier.weight'].T)
    np.testing.assert_array_equal(
        p['conv0']['kernel'], sd['features.conv0.weight'].transpose(2, 3, 1, 0)
    )
    # torchvision's released checkpoints still name them 'denselayerN.norm.1', 'conv.2', ...
    legacy = {}
    for key, value in sd.items():
        for old in ('norm1', 'norm2', 'conv1', 'conv2'):
            key = key.replace(f'.{old}.', f'.{old[:-1]}.{old[-1]}.') if 'denselayer' in key else key
        legacy[key] = value
    assert 'features.denseblock1.denselayer1.norm.1.weight' in legacy
    w = convert.from_torch('densenet121', legacy)
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(w)):
        np.testing.assert_array_equal(a, b)


def test_memory_efficient_gives_identical_outputs_and_gradients():
    x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 3), jnp.float32)
    kw = dict(depths=(3, 1, 1), layer_drop_rate=0.2)
    plain = jaxcnn.create_model('densenet_bc_100_k12', **kw)
    lean = jaxcnn.create_model('densenet_bc_100_k12', memory_efficient=True, **kw)
    v = random_variables(plain, x.shape)
    # the same variables fit both: remat adds no scope to the parameter paths
    assert jax.tree.structure(abstract_variables(lean, x.shape)) == jax.tree.structure(v)

    def loss(model, params):
        out, state = model.apply(
            {**v, 'params': params},
            x,
            train=True,
            rngs={'dropout': jax.random.key(3)},
            mutable=['batch_stats'],
        )
        return jnp.sum(out * jnp.arange(10.0)), (out, state)

    @jit_once
    def run(params):
        grads = [jax.grad(lambda p: loss(m, p), has_aux=True)(params) for m in (plain, lean)]
        return grads, [m.apply({**v, 'params': params}, x) for m in (plain, lean)]

    ((ga, (oa, sa)), (gb, (ob, sb))), (ea, eb) = run(v['params'])
    np.testing.assert_allclose(ob, oa, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(eb, ea, rtol=1e-6, atol=1e-6)
    # BatchNorm statistics inside the rematerialised part are updated too
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(sa), jax.tree.leaves(sb)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert not np.allclose(
        sa['batch_stats']['denseblock1']['denselayer3']['norm1']['mean'],
        v['batch_stats']['denseblock1']['denselayer3']['norm1']['mean'],
    )
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(
            b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max(), err_msg=jax.tree_util.keystr(path)
        )
    # and the bottleneck really is rematerialised: one checkpointed region per dense layer
    jaxpr = str(jax.make_jaxpr(lambda p: jax.grad(lambda q: loss(lean, q)[0])(p))(v['params']))
    regions = len(
        re.findall(r'\b(?:checkpoint|remat\d*)\[', jaxpr)
    )  # the name varies by JAX version
    assert regions == 5, regions


def test_layer_dropout_only_in_training():
    model = jaxcnn.create_model('densenet_bc_100_k12', depths=(1, 1, 1), layer_drop_rate=0.5)
    x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 3), jnp.float32)
    v = random_variables(model, x.shape)

    @jit_once
    def run():
        train = [
            model.apply(
                v, x, train=True, rngs={'dropout': jax.random.key(k)}, mutable=['batch_stats']
            )[0]
            for k in (0, 1)
        ]
        return (
            train,
            model.apply(v, x, rngs={'dropout': jax.random.key(0)}),
            model.apply(v, x, rngs={'dropout': jax.random.key(1)}),
        )

    (a, b), e0, e1 = run()
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(e0, e1)


@pytest.mark.parametrize(
    'name,shape,match',
    [
        ('densenet121', (224, 224, 3), 'NHWC image batch'),
        ('densenet121', (1, 16, 16, 3), 'at least 32x32'),
        ('densenet_bc_100_k12', (1, 2, 2, 3), 'at least 4x4'),
    ],
)
def test_bad_input_shapes(name, shape, match):
    model = jaxcnn.create_model(name)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


@pytest.mark.parametrize(
    'overrides,match',
    [
        (dict(stem='resnet'), "stem must be 'imagenet' or 'cifar'"),
        (dict(depths=()), 'depths must be positive'),
        (dict(depths=(4, 0, 4)), 'depths must be positive'),
        (dict(compression=0.0), r'compression must be in \(0, 1\]'),
        (dict(growth_rate=0), 'growth_rate must be positive'),
    ],
)
def test_bad_configuration(overrides, match):
    model = jaxcnn.create_model('densenet_bc_100_k12', **overrides)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def test_unknown_argument_names_the_fields():
    with pytest.raises(
        TypeError, match='block_config.*accepted:.*depths.*growth_rate.*memory_efficient'
    ):
        jaxcnn.create_model('densenet121', block_config=(6, 12, 24, 16))
