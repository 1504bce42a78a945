"""The public API: names, overrides, metadata, features, and the errors users see."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from helpers import random_variables


def test_list_models_patterns():
    res = jaxcnn.list_models('res*')
    assert res == sorted(res)
    for name in [
        'resnet18',
        'resnet50',
        'resnet152',
        'resnet20',
        'resnet1202',
        'resnet164',
        'resnext50_32x4d',
        'resnetv2_50',
    ]:
        assert name in res
    assert 'wrn_28_10' in jaxcnn.list_models('wrn_*')
    assert jaxcnn.list_models('nothing_like_this*') == []
    assert set(jaxcnn.list_models('*resnet*')) >= {
        'seresnet50',
        'wide_resnet50_2',
        'preact_resnet110',
    }


def test_unknown_name_lists_closest():
    with pytest.raises(ValueError, match='unknown model .resnet05.*closest:.*resnet50'):
        jaxcnn.create_model('resnet05')
    with pytest.raises(ValueError, match='unknown model'):
        jaxcnn.model_info('no_such_model')


def test_unknown_override_names_accepted_ones():
    with pytest.raises(
        TypeError, match=r'unknown argument\(s\) dropout_rate.*accepted:.*drop_rate'
    ):
        jaxcnn.create_model('resnet18', dropout_rate=0.1)


def test_bad_num_classes():
    with pytest.raises(ValueError, match='num_classes'):
        jaxcnn.create_model('resnet18', num_classes=-3)


def test_model_info_fields():
    info = jaxcnn.model_info('resnet50')
    assert info.input_size == (224, 224, 3)
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    assert info.num_classes == 1000
    assert info.reference == 'torchvision resnet50' and info.reference_params == 25_557_032
    cifar = jaxcnn.model_info('resnet56')
    assert cifar.num_classes == 10 and cifar.input_size == (32, 32, 3)
    assert 'Table 6' in cifar.reference


def test_default_num_classes_follow_the_model():
    assert jaxcnn.create_model('resnet18').num_classes == 1000
    assert jaxcnn.create_model('resnet20').num_classes == 10
    assert jaxcnn.create_model('resnet18', num_classes=3).num_classes == 3


def test_count_params_on_arrays_and_shapes():
    tree = {
        'a': jnp.zeros((3, 4)),
        'b': {'c': np.zeros(5)},
        'd': jax.ShapeDtypeStruct((2, 2), jnp.float32),
    }
    assert jaxcnn.count_params(tree) == 12 + 5 + 4


@pytest.mark.parametrize(
    'name,size,feat',
    [
        ('resnet18', 64, (2, 2, 512)),
        ('resnetv2_50', 64, (2, 2, 2048)),
        ('resnet20', 32, (8, 8, 64)),
    ],
)
def test_features_and_pooled_features(name, size, feat):
    model = jaxcnn.create_model(name)
    variables = random_variables(model, (2, size, size, 3))
    x = jnp.asarray(np.random.RandomState(0).randn(2, size, size, 3), jnp.float32)
    fmap = jaxcnn.forward_features(model, variables, x)
    assert fmap.shape == (2, *feat)
    pooled_model = jaxcnn.create_model(name, num_classes=0)
    pooled = pooled_model.apply({k: v for k, v in variables.items()}, x, train=False)
    np.testing.assert_allclose(pooled, fmap.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    # the head is exactly a dense layer on the pooled features
    logits = model.apply(variables, x, train=False)
    fc = variables['params']['head']['fc']
    np.testing.assert_allclose(logits, pooled @ fc['kernel'] + fc['bias'], rtol=1e-4, atol=1e-4)


def test_dropout_and_drop_path_use_the_dropout_stream():
    model = jaxcnn.create_model('resnet20', drop_rate=0.5, drop_path_rate=0.5)
    variables = random_variables(model, (4, 32, 32, 3))
    x = jnp.asarray(np.random.RandomState(0).randn(4, 32, 32, 3), jnp.float32)
    run = lambda k: model.apply(
        variables, x, train=True, rngs={'dropout': jax.random.key(k)}, mutable=['batch_stats']
    )[0]
    assert not np.allclose(run(0), run(1))
    np.testing.assert_array_equal(run(3), run(3))
    # inference is deterministic and needs no rng
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


def test_import_does_not_pull_torch_or_tensorflow():
    code = (
        'import sys, jaxcnn; jaxcnn.list_models(); import jaxcnn.convert; '
        'bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow", "timm")]; '
        'print(bad); sys.exit(1 if bad else 0)'
    )
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wrong_input_rank_is_reported():
    model = jaxcnn.create_model('resnet20')
    with pytest.raises(ValueError, match=r'expects an NHWC image batch .* got shape \(32, 32, 3\)'):
        model.init(jax.random.key(0), jnp.zeros((32, 32, 3)), train=False)
    with pytest.raises(ValueError, match='at least 8x8'):
        model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)), train=False)
