"""Converted timm/torchvision weights give the reference's logits, and bad files say why."""

import numpy as np
import pytest
import torch
import timm
import torchvision
import jax
import jax.numpy as jnp

import jaxcnn
from jaxcnn import convert
from helpers import jit_once, randomise_batchnorm

TWINS = [n for n in jaxcnn.list_models() if jaxcnn.model_info(n).torch_name]


def build_reference(torch_name, seed=0, **kwargs):
    """The timm/torchvision twin with random weights and non-trivial BatchNorm statistics."""
    lib, name = torch_name.split(':')
    torch.manual_seed(seed)
    if lib == 'tv':
        model = getattr(torchvision.models, name)(weights=None, **kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    return randomise_batchnorm(model, seed)


def test_every_resnet_family_twin_is_covered():
    assert {
        'resnet18',
        'resnet34',
        'resnet50',
        'resnet101',
        'resnet152',
        'wide_resnet50_2',
        'wide_resnet101_2',
        'resnext50_32x4d',
        'resnext101_32x8d',
        'resnext101_64x4d',
        'seresnet50',
        'seresnext50_32x4d',
        'resnetv2_50',
        'resnetv2_101',
    } <= set(TWINS)


@pytest.mark.parametrize('name', TWINS)
def test_converted_logits_match_reference(name):
    info = jaxcnn.model_info(name)
    ref = build_reference(info.torch_name)
    # the reference library's own count is the truth for the registry's figure
    assert sum(p.numel() for p in ref.parameters()) == info.reference_params
    variables = convert.from_torch(name, ref.state_dict())
    model = jaxcnn.create_model(name)
    assert jaxcnn.count_params(variables['params']) == info.reference_params
    size = max(64, info.min_input)  # Inception-v3 needs 75 px
    x = np.random.RandomState(0).randn(2, 3, size, size).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    got = np.asarray(
        jit_once(lambda v, x: model.apply(v, x, train=False))(
            variables, jnp.asarray(x.transpose(0, 2, 3, 1))
        )
    )
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert_exports_back(name, variables, ref)


def assert_exports_back(name, variables, ref, **kwargs):
    """to_torch gives the reference's own state dict back, bit for bit, and the reference loads
    it strictly. Since from_torch is a function of the file, from_torch(to_torch(v)) is then v
    for every v converted from this layout (test_hub.py also checks it through a file)."""
    sd = ref.state_dict()
    back = convert.to_torch(name, variables, **kwargs)
    assert list(back) == list(sd)
    for k, v in sd.items():
        if k.endswith('num_batches_tracked'):  # a step count, which jaxcnn does not keep
            assert back[k].dtype == v.dtype and back[k].shape == v.shape
        else:
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    ref.load_state_dict(back, strict=True)


def _match_logits(name, ref, variables, size):
    model = jaxcnn.create_model(name)
    x = np.random.RandomState(0).randn(2, 3, size, size).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    got = np.asarray(
        jit_once(lambda v, x: model.apply(v, x, train=False))(
            variables, jnp.asarray(x.transpose(0, 2, 3, 1))
        )
    )
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize('name', [n for n in TWINS if jaxcnn.model_info(n).family == 'vgg'])
def test_timm_vgg_layout_converts(name):
    # timm holds fc6/fc7 as convolutions (pre_logits.fc1 7x7, fc2 1x1); up to a 7x7 map its
    # VGG computes what torchvision's does, so the same jaxcnn model takes either file.
    ref = build_reference(f'timm:{name}')
    assert any(k.startswith('pre_logits.fc1.') for k in ref.state_dict())
    variables = convert.from_torch(name, ref.state_dict())
    assert jaxcnn.count_params(variables['params']) == jaxcnn.model_info(name).reference_params
    _match_logits(name, ref, variables, 32)
    assert_exports_back(name, variables, ref, layout='timm')


@pytest.mark.parametrize(
    'name, torch_name, kwargs',
    [
        ('googlenet', 'tv:googlenet', dict(aux_logits=False, init_weights=True)),
        ('inception_v3', 'tv:inception_v3', dict(aux_logits=False, init_weights=True)),
        ('inception_v3', 'timm:inception_v3', {}),  # timm's has no auxiliary head
    ],
)
def test_files_without_auxiliary_heads_convert(name, torch_name, kwargs):
    ref = build_reference(torch_name, **kwargs)
    assert not any('aux' in k.lower() for k in ref.state_dict())
    variables = convert.from_torch(name, ref.state_dict())
    # the model without its heads is what the file holds, and trains from it
    model = jaxcnn.create_model(name, aux_logits=False)
    size = jaxcnn.model_info(name).min_input
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=True)
    )
    assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(lambda a: a.shape, shapes)
    _match_logits(name, ref, variables, max(64, size))
    assert_exports_back(
        name, variables, ref, layout={'tv': 'torchvision', 'timm': 'timm'}[torch_name.split(':')[0]]
    )


@pytest.fixture(scope='module')
def resnet18_ref():
    return build_reference('tv:resnet18', seed=1)


def _logits(name, variables, x_nchw):
    model = jaxcnn.create_model(
        name, num_classes=variables['params']['head']['fc']['kernel'].shape[1]
    )
    return np.asarray(
        model.apply(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), train=False)
    )


def test_from_pth_and_safetensors_files(tmp_path, resnet18_ref):
    sd = resnet18_ref.state_dict()
    torch.save({'state_dict': sd}, tmp_path / 'r18.pth')  # a training checkpoint wrapper
    convert.to_safetensors(sd, str(tmp_path / 'r18.safetensors'))
    a = convert.from_torch('resnet18', tmp_path / 'r18.pth')
    b = convert.from_torch('resnet18', str(tmp_path / 'r18.safetensors'))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    x = np.random.RandomState(0).randn(1, 3, 64, 64).astype(np.float32)
    with torch.no_grad():
        expected = resnet18_ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        _logits('resnet18', b, x), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )


def test_new_head_size_is_read_from_the_weights(resnet18_ref):
    sd = dict(resnet18_ref.state_dict())
    sd['fc.weight'] = torch.randn(5, 512)
    sd['fc.bias'] = torch.randn(5)
    v = convert.from_torch('resnet18', sd)
    assert v['params']['head']['fc']['kernel'].shape == (512, 5)
    np.testing.assert_array_equal(v['params']['head']['fc']['kernel'], sd['fc.weight'].numpy().T)


def test_wrapped_model_files_convert(resnet18_ref):
    # torch.compile's wrapper saves '_orig_mod.'-prefixed keys, DataParallel 'module.'
    plain = convert.from_torch('resnet18', resnet18_ref.state_dict())
    compiled = torch.compile(resnet18_ref).state_dict()
    assert all(k.startswith('_orig_mod.') for k in compiled)
    wrapped = {f'module.{k}': v for k, v in compiled.items()}
    for sd in (compiled, wrapped):
        got = convert.from_torch('resnet18', sd)
        assert jax.tree.structure(got) == jax.tree.structure(plain)
        for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(plain)):
            np.testing.assert_array_equal(u, v)


def test_mismatched_state_dict_names_the_keys(resnet18_ref):
    with pytest.raises(
        ValueError,
        # each missing entry with the shape it needs
        match=r"does not fit resnet34: \d+ missing \(.*layer1/2/bn1/mean \(64,\).*"
        r"looks like resnet18's weights",
    ):
        convert.from_torch('resnet34', resnet18_ref.state_dict())


def test_scanned_stages_are_stacked_and_misfits_named():
    """nf_resnet50 scans blocks 2..n of each stage: timm's per-block weights are stacked into
    stages_s/stacked/block (block b at index b - 1), and a missing or surplus block is still
    reported by name."""
    sd = {k: v.numpy() for k, v in build_reference('timm:nf_resnet50').state_dict().items()}
    v = convert.from_torch('nf_resnet50', sd)
    np.testing.assert_array_equal(
        v['params']['stages_2']['stacked']['block']['conv1']['kernel'][3],
        sd['stages.2.4.conv1.weight'].transpose(2, 3, 1, 0),
    )
    assert sorted(v['params']['stages_2']) == ['0', 'stacked']
    # and back: the stacked blocks are unstacked into timm's per-block keys
    back = convert.to_torch('nf_resnet50', v, tensors=False)
    assert all(np.array_equal(back[k], a) for k, a in sd.items() if 'num_batches' not in k)
    short = {k: a for k, a in sd.items() if k != 'stages.2.4.conv1.weight'}
    with pytest.raises(ValueError, match=r'missing .*stages_2/stacked/block/conv1/kernel\[3\]'):
        convert.from_torch('nf_resnet50', short)
    extra = {**sd, 'stages.2.6.conv1.weight': sd['stages.2.5.conv1.weight']}
    with pytest.raises(
        ValueError,
        match=r'unexpected .*stages\.2\.6\.conv1\.weight -> params/stages_2/6/conv1/kernel',
    ):
        convert.from_torch('nf_resnet50', extra)


def test_unsupported_family_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match='no PyTorch conversion for .resnet20.'):
        convert.from_torch('resnet20', {'conv1.weight': np.zeros((16, 3, 3, 3))})
    with pytest.raises(FileNotFoundError, match='no weights file'):
        convert.from_torch('resnet18', tmp_path / 'missing.pth')
    bad = tmp_path / 'broken.safetensors'
    bad.write_bytes(b'not really a safetensors file')
    with pytest.raises(ValueError, match='cannot read .*safetensors'):
        convert.from_torch('resnet18', str(bad))
    bad_pth = tmp_path / 'broken.pth'
    bad_pth.write_bytes(b'\x00garbage')
    with pytest.raises(ValueError, match='cannot read .*PyTorch checkpoint'):
        convert.from_torch('resnet18', bad_pth)
