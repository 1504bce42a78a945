"""Pretrained weights from the hub: timm's default tags, every hub layout, offline loads that
give timm's logits from the same file, the cache of converted weights, and timm's evaluation
preprocessing. Nothing can reach the hub here, so the hub cache is built in a temporary HF_HOME
in the hub's own layout from randomised timm models saved by timm's own exporter."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import _registry as timm_registry
from timm.models._hub import save_for_hf

import jaxcnn
from jaxcnn import convert, hub
from jaxcnn.data import eval_transform

TWINS = [n for n in jaxcnn.list_models() if jaxcnn.model_info(n).torch_name]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timm_default_hub_id(name):
    arch = jaxcnn.model_info(name).torch_name.split(':', 1)[1]
    if arch not in timm_registry._model_default_cfgs:
        return None
    cfg = timm_registry.get_pretrained_cfg(
        f'{arch}.{timm_registry._model_default_cfgs[arch].tags[0]}'
    )
    return cfg.hf_hub_id if cfg is not None else None


def test_default_tags_are_timms():
    # timm.create_model(arch, pretrained=True) loads the first tag of the architecture
    expected = {n: timm_default_hub_id(n) for n in TWINS}
    assert hub.DEFAULT_HUB_IDS == {n: h for n, h in expected.items() if h}


@pytest.mark.parametrize(
    'name',
    [n for n in sorted(hub.DEFAULT_HUB_IDS) if jaxcnn.model_info(n).torch_name.startswith('tv:')],
)
def test_every_hub_layout_fits_its_model(name):
    # The hub file holds the state dict of timm's architecture, also for torchvision's weights
    # (tv_in1k tags): for a torchvision twin its names and shapes, read without allocating the
    # weights, must fit too. (A timm twin's hub file is the state dict whose conversion
    # test_convert.py checks logit by logit.)
    arch = hub.DEFAULT_HUB_IDS[name].split('/', 1)[1].split('.')[0]
    with torch.device('meta'):
        ref = timm.create_model(arch, pretrained=False)
    shapes = {
        k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.state_dict().items()
    }
    assert convert.misfit(name, shapes) == ''


def randomised_timm(model_id, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(model_id, pretrained=False, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def put_in_hub_cache(hf_home, repo_id, folder):
    """The files of ``folder`` as huggingface_hub caches a download of ``repo_id``: content in
    blobs/<sha256>, snapshots/<commit>/<file> linking to it, refs/main naming the commit."""
    repo = os.path.join(hf_home, 'hub', 'models--' + repo_id.replace('/', '--'))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = os.path.join(repo, 'snapshots', commit)
    os.makedirs(snapshot)
    os.makedirs(os.path.join(repo, 'blobs'))
    os.makedirs(os.path.join(repo, 'refs'))
    with open(os.path.join(repo, 'refs', 'main'), 'w') as f:
        f.write(commit)
    for filename in os.listdir(folder):
        data = open(os.path.join(folder, filename), 'rb').read()
        blob = os.path.join(repo, 'blobs', hashlib.sha256(data).hexdigest())
        with open(blob, 'wb') as f:
            f.write(data)
        os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, filename))


# (jaxcnn model, hub id): a timm twin, and a torchvision twin whose hub weights are in timm's
# layout without the auxiliary head (every other layout: test_every_hub_layout_fits_its_model
# and test_convert.py)
HUB_CASES = [
    ('resnet18', 'timm/resnet18.a1_in1k'),
    ('inception_v3', 'timm/inception_v3.tv_in1k'),
]


@pytest.fixture(scope='module')
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp('hf_home')
    for i, (_, repo_id) in enumerate(HUB_CASES):
        out = tmp_path_factory.mktemp('export')
        save_for_hf(
            randomised_timm(repo_id.split('/', 1)[1], seed=i), str(out), safe_serialization=True
        )
        put_in_hub_cache(str(home), repo_id, str(out))
    return str(home)


PROBE = textwrap.dedent('''
    import json, os, sys
    import numpy as np, timm, torch, jax.numpy as jnp
    import jaxcnn
    from jaxcnn import convert
    name, repo_id = sys.argv[1], sys.argv[2]
    out = {}
    ref = timm.create_model('hf-hub:' + repo_id, pretrained=True).eval()  # timm, from the cache
    size = max(64, jaxcnn.model_info(name).min_input)
    x = np.random.RandomState(0).randn(2, 3, size, size).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    model, variables = jaxcnn.create_model(name, pretrained=True)
    got = np.asarray(model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=False))
    out['err'] = float(np.abs(got - expected).max() / np.abs(expected).max())
    # the second load reads the cached conversion
    convert.from_torch = lambda *a, **k: (_ for _ in ()).throw(AssertionError('converted again'))
    again, cfg = jaxcnn.load_pretrained(repo_id)   # the model from config.json's architecture
    same = all(
        np.array_equal(a, b) for a, b in zip(
            __import__('jax').tree.leaves(again), __import__('jax').tree.leaves(variables)))
    # the trainer's --config.init_from=hf:<hub id>
    from jaxcnn import transfer
    init = transfer.load_pretrained('hf:' + repo_id, name)
    same = same and all(
        np.array_equal(a, b) for a, b in zip(
            __import__('jax').tree.leaves(init), __import__('jax').tree.leaves(variables)))
    out.update(same=same, cfg=cfg)
    model5, v5 = jaxcnn.create_model(name, pretrained=True, num_classes=5)
    out['head'] = list(v5['params']['head']['fc']['kernel'].shape)
    # the model built for the weights trains: auxiliary heads only where the file has them
    y, _ = model5.apply(v5, jnp.asarray(x.transpose(0, 2, 3, 1)), train=True,
                        mutable=['batch_stats'], rngs={'dropout': __import__('jax').random.key(0)})
    out['train_shape'] = list(np.shape(y[0] if isinstance(y, tuple) else y))
    print('RESULT ' + json.dumps(out))
''')


def _run(code, args, hf_home, cache):
    env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE='1', JAXCNN_CACHE=cache)
    return subprocess.run(
        [sys.executable, '-c', code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


@pytest.mark.parametrize('name, repo_id', HUB_CASES, ids=[c[0] for c in HUB_CASES])
def test_pretrained_true_gives_timms_logits_offline(name, repo_id, hf_home, tmp_path):
    result = _run(PROBE, [name, repo_id], hf_home, str(tmp_path / 'cache'))
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith('RESULT ')]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(lines[0][len('RESULT ') :])
    assert out['err'] <= 1e-4
    assert out['same'], 'the cached conversion differs from the first'
    assert out['head'][1] == 5 and out['train_shape'] == [2, 5]
    cfg = out['cfg']
    assert cfg['source'] == repo_id and cfg['num_classes'] == 1000
    ref_cfg = timm_registry.get_pretrained_cfg(repo_id.split('/', 1)[1]).to_dict()
    assert cfg['interpolation'] == ref_cfg['interpolation']
    for key in ('input_size', 'crop_pct', 'mean', 'std'):
        np.testing.assert_allclose(cfg[key], ref_cfg[key], err_msg=key)


def test_nothing_cached_offline_is_one_line_naming_the_fetch(tmp_path):
    code = textwrap.dedent('''
        import jaxcnn
        try:
            jaxcnn.create_model('resnet18', pretrained=True)
        except FileNotFoundError as e:
            print('ERROR ' + str(e))
    ''')
    result = _run(code, [], str(tmp_path / 'empty'), str(tmp_path / 'cache'))
    line = [ln for ln in result.stdout.splitlines() if ln.startswith('ERROR ')]
    assert line, result.stdout + result.stderr
    assert 'huggingface-cli download timm/resnet18.a1_in1k' in line[0]
    assert "pretrained='path/to/model.safetensors'" in line[0]


def test_a_local_file_stands_for_a_tag(tmp_path):
    ref = randomised_timm('resnet18', seed=3)
    path = tmp_path / 'mine.safetensors'
    convert.to_safetensors(ref.state_dict(), str(path))
    os.environ['JAXCNN_CACHE'] = str(tmp_path / 'cache')
    try:
        model, variables = jaxcnn.create_model('resnet18', pretrained=str(path))
    finally:
        del os.environ['JAXCNN_CACHE']
    np.testing.assert_array_equal(
        variables['params']['conv1']['kernel'],
        ref.state_dict()['conv1.weight'].numpy().transpose(2, 3, 1, 0),
    )
    with pytest.raises(ValueError, match='no pretrained weights on the hub for googlenet'):
        jaxcnn.create_model('googlenet', pretrained=True)


@pytest.mark.parametrize(
    'model_id',
    ['resnet50.a1_in1k', 'vgg11.tv_in1k', 'inception_v3.tv_in1k', 'convnext_tiny.in12k_ft_in1k'],
)
def test_eval_transform_is_timms(model_id, tmp_path):
    from timm.data import create_transform, resolve_data_config

    ref = timm.create_model(model_id, pretrained=False)
    save_for_hf(ref, str(tmp_path), safe_serialization=True)
    config = json.loads((tmp_path / 'config.json').read_text())
    ours = eval_transform(hub.pretrained_config(None, config))
    theirs = create_transform(**resolve_data_config({}, model=ref))
    std = np.asarray(ref.pretrained_cfg['std'], np.float32)
    rng = np.random.RandomState(0)
    for h, w in [(300, 200), (375, 500), (224, 224), (97, 131)]:
        image = Image.fromarray(rng.randint(0, 256, (h, w, 3), np.uint8))
        a = ours(image)
        b = theirs(image).numpy().transpose(1, 2, 0)
        assert a.shape == b.shape
        assert np.abs((a - b) * std).max() <= 1 / 255 + 1e-6
