"""Feature pyramids (``create_model(name, features_only=True)``) on every registered model: the
levels of a model with a timm twin are timm's ``features_only`` levels (module, channels,
reduction) and their maps equal the twin's, with converted weights; every model's pyramid runs,
keeps the classifier's variables and agrees with ``feature_info``."""

import numpy as np
import pytest
import timm
import torch
import jax
import jax.numpy as jnp

import jaxcnn
from jaxcnn import convert
from helpers import (
    abstract_variables,
    jit_once,
    one_per_kind,
    shallow_overrides,
    test_input_size as input_size,
)

from paper_levels import PAPER_LEVELS
from test_convert import build_reference

ALL = jaxcnn.list_models()
TWINS = [n for n in ALL if jaxcnn.model_info(n).torch_name]

# torchvision's levels for the twins timm lacks, in timm's convention: the output before each
# stride-2 step, and the end of the feature extractor.
TORCHVISION_LEVELS = {
    'alexnet': ['features.1', 'features.4', 'features.11', 'features.12'],
    'googlenet': ['conv1', 'conv3', 'inception3b', 'inception4e', 'inception5b'],
    'squeezenet1_0': ['features.1', 'features.5', 'features.10', 'features.12'],
    'squeezenet1_1': ['features.1', 'features.4', 'features.7', 'features.12'],
    **{
        f'shufflenet_v2_{w}': ['conv1', 'maxpool', 'stage2', 'stage3', 'conv5']
        for w in ('x0_5', 'x1_0', 'x1_5', 'x2_0')
    },
}


def _timm_features_name(name):
    """The timm model whose ``features_only`` levels this twin has, or None."""
    lib, torch_name = jaxcnn.model_info(name).torch_name.split(':')
    return None if name in TORCHVISION_LEVELS else torch_name


def _reference_levels(name, size):
    """(module, channels, reduction) of each level of the reference at ``size`` px: timm's own
    feature_info, or the shapes torchvision's modules give."""
    timm_name = _timm_features_name(name)
    if timm_name is not None:
        with torch.device('meta'):  # feature_info needs no weights
            ref = timm.create_model(timm_name, pretrained=False, features_only=True)
        return [(d['module'], d['num_chs'], d['reduction']) for d in ref.feature_info.get_dicts()]
    maps = _hooked_maps(build_reference(jaxcnn.model_info(name).torch_name), name, size)
    return [
        (m, v.shape[1], 2 ** round(np.log2(size / v.shape[2])))
        for m, v in zip(TORCHVISION_LEVELS[name], maps)
    ]


def _hooked_maps(ref, name, size, modules=None):
    """The reference's outputs at ``modules`` (NCHW, copied: torchvision's ReLUs act in place)."""
    modules = modules or TORCHVISION_LEVELS[name]
    found = dict(ref.named_modules())
    out = {}
    hooks = [
        found[m].register_forward_hook(lambda _m, _i, o, m=m: out.__setitem__(m, o.clone()))
        for m in modules
    ]
    x = np.random.RandomState(0).randn(2, 3, size, size).astype(np.float32)
    with torch.no_grad():
        ref(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    return [out[m].numpy() for m in modules]


def _size(name):
    return max(64, jaxcnn.model_info(name).min_input)


@pytest.mark.parametrize('name', TWINS)
def test_levels_are_the_twins(name):
    size = jaxcnn.model_info(name).input_size[0]
    expected = _reference_levels(name, size)
    got = [(d['module'], d['num_chs'], d['reduction']) for d in jaxcnn.feature_info(name)]
    assert got == expected


# The maps themselves, for one twin of each kind (the same tap code serves the rest of a kind,
# whose levels test_levels_are_the_twins checks by name and shape).
@pytest.mark.parametrize('name', one_per_kind(TWINS))
def test_maps_equal_the_twins(name):
    info = jaxcnn.model_info(name)
    timm_name = _timm_features_name(name)
    if timm_name is not None:  # hook the timm model, whose module names feature_info gives
        ref = build_reference(f'timm:{timm_name}')
        modules = [d['module'] for d in jaxcnn.feature_info(name)]
    else:
        ref = build_reference(info.torch_name)
        modules = TORCHVISION_LEVELS[name]
    size = _size(name)
    expected = _hooked_maps(ref, name, size, modules)
    pyramid = jaxcnn.create_model(name, features_only=True)
    x_shape = (1, size, size, 3)
    # the classifier's converted variables, less its head
    variables = _restrict(
        convert.from_torch(name, ref.state_dict()), abstract_variables(pyramid, x_shape)
    )
    x = np.random.RandomState(0).randn(2, 3, size, size).astype(np.float32)
    got = jit_once(lambda v, x: pyramid.apply(v, x))(
        variables, jnp.asarray(x.transpose(0, 2, 3, 1))
    )
    assert len(got) == len(expected)
    for module, g, e in zip(modules, got, expected):
        g = np.asarray(g).transpose(0, 3, 1, 2)
        assert g.shape == e.shape, module
        assert np.abs(g - e).max() <= 1e-4 * np.abs(e).max(), module


def _restrict(tree, like):
    return {k: _restrict(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


@pytest.mark.parametrize('name', ALL)
def test_every_model_has_a_pyramid(name):
    # shallower where the registered depth only makes tracing slow: taps follow the stage code
    over = shallow_overrides(name)
    size = input_size(name)
    shape = (1, size, size, jaxcnn.model_info(name).input_size[2])
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    info = jaxcnn.feature_info(name, input_size=shape[1:], **over)
    reductions = [d['reduction'] for d in info]
    assert reductions == sorted(reductions) and reductions[0] >= 1
    assert len({d['module'] for d in info}) == len(info)
    classifier = jaxcnn.create_model(name, 0, **over)
    variables = abstract_variables(classifier, shape)
    if name not in TWINS and jaxcnn.model_info(name).family != 'unet':
        # the last level is as coarse as the classifier's final map (a twin's levels are
        # timm's, test_levels_are_the_twins; a segmentation model's final map is its decoder's)
        final = jax.eval_shape(lambda v, x: jaxcnn.forward_features(classifier, v, x), variables, x)
        assert reductions[-1] == 2 ** round(np.log2(size / final.shape[1]))
    # the pyramid runs on the headless classifier's variables (weights load unchanged) and gives
    # the levels feature_info announces, at any out_indices
    pyramid = jaxcnn.create_model(name, features_only=True, out_indices=(0, -1), **over)
    maps = jax.eval_shape(lambda v, x: pyramid.apply(v, x), variables, x)
    assert [m.shape[-1] for m in maps] == [info[0]['num_chs'], info[-1]['num_chs']]


def test_bad_levels_say_what_to_pass():
    with pytest.raises(ValueError, match=r'out_indices \(0, 7\) name a level outside the 5'):
        jaxcnn.create_model('resnet18', features_only=True, out_indices=(0, 7))
    with pytest.raises(ValueError, match='pass features_only=True'):
        jaxcnn.create_model('resnet18', out_indices=(1,))


def test_every_family_without_a_twin_has_a_stage_table():
    families = {jaxcnn.model_info(n).family for n in ALL}
    with_twins = {jaxcnn.model_info(n).family for n in TWINS}
    covered = {jaxcnn.model_info(n).family for n in PAPER_LEVELS}
    assert families - with_twins <= covered


@pytest.mark.parametrize('name', sorted(PAPER_LEVELS))
def test_levels_follow_the_papers_stage_tables(name):
    # tests/paper_levels.py holds each level's channels and reduction as the paper's table
    # gives them, at the model's own input size
    got = [(d['num_chs'], d['reduction']) for d in jaxcnn.feature_info(name)]
    assert got == PAPER_LEVELS[name]


def test_pretrained_weights_load_into_a_pyramid(tmp_path):
    # a classifier's weights file, as the hub holds it, gives the pyramid its variables; the
    # last level is the classifier's own final map under those weights
    model = jaxcnn.create_model('resnet18')
    x = jnp.asarray(np.random.RandomState(0).randn(1, 64, 64, 3), jnp.float32)
    jaxcnn.save_pretrained(tmp_path, 'resnet18', model.init(jax.random.key(0), x))
    pyramid, variables = jaxcnn.create_model(
        'resnet18',
        pretrained=str(tmp_path / 'model.safetensors'),
        features_only=True,
        out_indices=(2, 4),
    )
    maps = pyramid.apply(variables, x)
    assert [m.shape for m in maps] == [(1, 8, 8, 128), (1, 2, 2, 512)]
    final = jaxcnn.forward_features(jaxcnn.create_model('resnet18', 0), variables, x)
    np.testing.assert_array_equal(np.asarray(maps[-1]), np.asarray(final))
