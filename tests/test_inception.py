"""GoogLeNet and Inception-v3: auxiliary heads (train mode only, weight 0.3 in the loss, and
equal to torchvision's), counts without them, the papers' map sizes, and the input limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import jaxcnn
from helpers import abstract_variables, random_variables, jit_once
from jaxcnn import convert
from jaxcnn.models.inception import googlenet_layers
from jaxcnn.optim import classification_loss
from test_convert import build_reference


def n_params(name, size=None, **kw):
    model = jaxcnn.create_model(name, **kw)
    size = size or jaxcnn.model_info(name).input_size[0]
    return jaxcnn.count_params(abstract_variables(model, (1, size, size, 3))['params'])


def conv_bn(c_in, c_out, k=1):
    return k * k * c_in * c_out + 2 * c_out  # no conv bias; BN scale and shift


def dense(n_in, n_out):
    return n_in * n_out + n_out


def test_counts_without_auxiliary_heads():
    # the syllabus figures (torchvision with aux_logits=False; timm inception_v3)
    assert n_params('googlenet', aux_logits=False) == 6_624_904
    assert n_params('inception_v3', aux_logits=False) == 23_834_568


def test_auxiliary_heads_hand_count():
    # GoogLeNet (Szegedy 2015 §5): 1x1 conv 128 on 4a (512 ch) / 4d (528 ch), fc 4*4*128 -> 1024,
    # classifier; Inception-v3: 1x1 conv 128, 5x5 conv 768, classifier
    googlenet_aux = sum(
        conv_bn(c, 128) + dense(4 * 4 * 128, 1024) + dense(1024, 1000) for c in (512, 528)
    )
    assert n_params('googlenet') - n_params('googlenet', aux_logits=False) == googlenet_aux
    v3_aux = conv_bn(768, 128) + conv_bn(128, 768, 5) + dense(768, 1000)
    assert n_params('inception_v3') - n_params('inception_v3', aux_logits=False) == v3_aux


def test_googlenet_paper_5x5_branch():
    # torchvision's "5x5" branch is a 3x3 (vision#906); the paper's table with 5x5 adds
    # (25 - 9) * #5x5reduce * #5x5 weights per module
    reduce_x_out = [
        (16, 32),
        (32, 96),
        (16, 48),
        (24, 64),
        (24, 64),
        (32, 64),
        (32, 128),
        (32, 128),
        (48, 128),
    ]
    extra = sum(16 * r * c for r, c in reduce_x_out)
    paper = n_params('googlenet', layers=googlenet_layers(kernel_5x5=5), aux_logits=False)
    assert paper - 6_624_904 == extra == 380_928


@pytest.mark.parametrize('name,size', [('googlenet', 32), ('inception_v3', 75)])
def test_auxiliary_heads_only_in_train_mode(name, size):
    model = jaxcnn.create_model(name, num_classes=5)
    n_aux = len(model.aux_taps)
    x = jnp.zeros((2, size, size, 3))
    # parameters exist whichever mode initialises the model
    variables = abstract_variables(model, x.shape)
    for _, head in model.aux_taps:
        assert head in variables['params']
    rngs = {'dropout': jax.random.key(0)}
    eval_out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert eval_out.shape == (2, 5)
    train_out, _ = jax.eval_shape(
        lambda v: model.apply(v, x, train=True, rngs=rngs, mutable=['batch_stats']), variables
    )
    logits, aux = train_out
    assert logits.shape == (2, 5) and [a.shape for a in aux] == [(2, 5)] * n_aux
    # without heads (or with no classifier, or for features) train mode returns one array
    for kw in (dict(aux_logits=False), dict(num_classes=0)):
        m = jaxcnn.create_model(name, **{'num_classes': 5, **kw})
        v = abstract_variables(m, x.shape)
        out, _ = jax.eval_shape(
            lambda v: m.apply(v, x, train=True, rngs=rngs, mutable=['batch_stats']), v
        )
        assert isinstance(out, jax.ShapeDtypeStruct)
        if kw.get('aux_logits') is False:
            assert not any(head in v['params'] for _, head in model.aux_taps)
    fmap, _ = jax.eval_shape(
        lambda v: model.apply(
            v, x, train=True, features_only=True, rngs=rngs, mutable=['batch_stats']
        ),
        variables,
    )
    assert isinstance(fmap, jax.ShapeDtypeStruct) and fmap.ndim == 4


def _cross_entropy(logits, labels):
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    return -logp[np.arange(len(labels)), labels].mean()


def test_trainer_loss_weights_auxiliary_heads_by_0_3():
    model = jaxcnn.create_model('googlenet', num_classes=10, width=0.25)
    variables = random_variables(model, (4, 32, 32, 3))
    x = jnp.asarray(np.random.RandomState(0).randn(4, 32, 32, 3), jnp.float32)
    labels = jnp.array([0, 3, 7, 9])
    outputs, _ = jit_once(
        lambda v, x: model.apply(
            v, x, train=True, rngs={'dropout': jax.random.key(0)}, mutable=['batch_stats']
        )
    )(variables, x)
    logits, (aux1, aux2) = outputs
    expected = (
        _cross_entropy(logits, labels)
        + 0.3 * _cross_entropy(aux1, labels)
        + 0.3 * _cross_entropy(aux2, labels)
    )
    got = float(classification_loss(outputs, labels, 10))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # and the heads matter: the main loss alone is different
    assert abs(float(classification_loss(logits, labels, 10)) - expected) > 1e-3


def _capture(model, variables, size, names):
    """Output shapes of the named modules for a size x size input (nothing is computed)."""
    x = jnp.zeros((1, size, size, 3))
    _, state = jax.eval_shape(
        lambda v: model.apply(
            v, x, capture_intermediates=lambda m, _: m.name in names, mutable=['intermediates']
        ),
        variables,
    )
    inter = state['intermediates']
    return {n: inter[n]['__call__'][0].shape[1:] for n in names}


def test_googlenet_map_sizes_at_224():
    # Szegedy et al. 2015, Table 1: inception (3a) 28x28x256, (3b) 28x28x480, (4a) 14x14x512,
    # (4e) 14x14x832, (5b) 7x7x1024
    model = jaxcnn.create_model('googlenet')
    v = abstract_variables(model, (1, 224, 224, 3))
    got = _capture(
        model, v, 224, {'inception3a', 'inception3b', 'inception4a', 'inception4e', 'inception5b'}
    )
    assert got == {
        'inception3a': (28, 28, 256),
        'inception3b': (28, 28, 480),
        'inception4a': (14, 14, 512),
        'inception4e': (14, 14, 832),
        'inception5b': (7, 7, 1024),
    }


def test_inception_v3_map_sizes_at_299():
    # Szegedy et al. 2016, Table 1: 35x35x288 -> (5 x Inception) 17x17x768 -> (2 x) 8x8x2048
    model = jaxcnn.create_model('inception_v3')
    v = abstract_variables(model, (1, 299, 299, 3))
    got = _capture(
        model, v, 299, {'Conv2d_1a_3x3', 'Conv2d_2b_3x3', 'Mixed_5d', 'Mixed_6e', 'Mixed_7c'}
    )
    assert got == {
        'Conv2d_1a_3x3': (149, 149, 32),
        'Conv2d_2b_3x3': (147, 147, 64),
        'Mixed_5d': (35, 35, 288),
        'Mixed_6e': (17, 17, 768),
        'Mixed_7c': (8, 8, 2048),
    }


def test_too_small_inputs_are_refused_clearly():
    # torchvision's own minimum sizes (weights meta) are the registry's
    assert (
        jaxcnn.model_info('inception_v3').min_input
        == 75
        == torchvision.models.Inception_V3_Weights.IMAGENET1K_V1.meta['min_size'][0]
    )
    assert (
        jaxcnn.model_info('googlenet').min_input
        == 15
        == torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.meta['min_size'][0]
    )
    for name, smallest in [('inception_v3', 75), ('googlenet', 15)]:
        model = jaxcnn.create_model(name)
        too_small = (
            f'needs inputs of at least {smallest}x{smallest}, got {smallest - 1}x{smallest - 1}'
        )
        with pytest.raises(ValueError, match=too_small):
            abstract_variables(model, (1, smallest - 1, smallest - 1, 3))
        v = abstract_variables(model, (1, smallest, smallest, 3))  # the minimum itself runs
        x = jnp.zeros((2, smallest, smallest, 3))
        out, _ = jax.eval_shape(
            lambda v: model.apply(
                v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)}
            ),
            v,
        )
        assert out[0].shape == (2, 1000)


@pytest.mark.parametrize('name,size', [('googlenet', 96), ('inception_v3', 299)])
def test_train_mode_matches_torchvision_with_auxiliary_heads(name, size):
    """Converted weights give torchvision's main and auxiliary logits in train mode (batch
    statistics, dropout off): the auxiliary heads' layout and flatten order are right."""
    ref = build_reference(jaxcnn.model_info(name).torch_name, seed=1).train()
    for m in ref.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    variables = convert.from_torch(name, ref.state_dict())
    x = np.random.RandomState(0).randn(4, 3, size, size).astype(np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(x))
    aux = [out.aux_logits1, out.aux_logits2] if name == 'googlenet' else [out.aux_logits]
    expected = [out.logits, *aux]
    model = jaxcnn.create_model(name, drop_rate=0.0, aux_drop_rate=0.0)
    (logits, aux), _ = jit_once(
        lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])
    )(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    for g, e in zip([logits, *aux], expected):
        e = e.numpy()
        assert np.abs(np.asarray(g) - e).max() <= 1e-4 * np.abs(e).max()


def test_transform_input_matches_torchvision():
    ref = torchvision.models.googlenet(weights=None, transform_input=True, init_weights=True).eval()
    variables = convert.from_torch('googlenet', ref.state_dict())
    model = jaxcnn.create_model('googlenet', transform_input=True)
    x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    got = np.asarray(model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
