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

import jax
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import _registry as timm_registry
from timm.models._hub import save_for_hf

import jaxcnn
from ml_collections import ConfigDict

from jaxcnn import convert, hub, train
from jaxcnn.data import eval_transform
from helpers import randomise_batchnorm

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


def timm_arch(name):
    arch = jaxcnn.model_info(name).torch_name.split(':', 1)[1]
    return arch if timm.is_model(arch) else None


def meta_state_dict(arch, **kwargs):
    """Names and shapes of timm's state dict, read without allocating the weights."""
    with torch.device('meta'):
        ref = timm.create_model(arch, pretrained=False, **kwargs)
    return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize('name', [n for n in TWINS if timm_arch(n)])
def test_every_timm_layout_fits_its_model(name):
    # The hub file holds the state dict of timm's architecture, also for torchvision's weights
    # (tv_in1k tags): for a torchvision twin its names and shapes must fit too. (A timm twin's
    # full file is the state dict whose conversion test_convert.py checks logit by logit.)
    arch = timm_arch(name)
    if jaxcnn.model_info(name).torch_name.startswith('tv:'):
        assert convert.misfit(name, meta_state_dict(arch)) == ''
    # and a backbone saved without its classifier (timm's num_classes=0) converts to the model
    # without its head
    assert convert.misfit(name, meta_state_dict(arch, num_classes=0)) == ''


def randomised_timm(model_id, seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomise_batchnorm(timm.create_model(model_id, pretrained=False, **kwargs), seed)


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
# layout without the auxiliary head (every other layout: test_every_timm_layout_fits_its_model
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
    # the trainer normalises fine-tuning data with the statistics the weights were trained with
    from ml_collections import ConfigDict
    from jaxcnn import train
    run = ConfigDict(dict(init_from='hf:' + repo_id, normalization='model'))
    out['stats'] = train.model_stats(run, name, 3)
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
    np.testing.assert_allclose(out['stats'], [ref_cfg['mean'], ref_cfg['std']])


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
    with pytest.raises(ValueError, match='no pretrained weights on the hub for mnasnet_050'):
        jaxcnn.create_model('mnasnet_050', pretrained=True)


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


@pytest.mark.parametrize(
    'name, torch_name',
    [('resnet18', 'timm:resnet18'), ('inception_v3', 'tv:inception_v3')],
    ids=['timm_twin', 'torchvision_twin_with_aux_heads'],
)
def test_saved_weights_load_in_timm_with_the_same_logits(name, torch_name, tmp_path):
    # jaxcnn variables (here converted from a randomised twin) -> a folder in the hub layout ->
    # timm's own loader. torchvision's Inception-v3 holds auxiliary heads that timm's has no
    # place for: they are left out, as timm's tv_in1k file leaves them out.
    from test_convert import build_reference

    kwargs = dict(init_weights=True) if torch_name.startswith('tv:') else {}
    variables = convert.from_torch(name, build_reference(torch_name, seed=5, **kwargs).state_dict())
    cfg = {'mean': [0.5, 0.4, 0.3], 'std': [0.2, 0.25, 0.3], 'crop_pct': 0.9}
    jaxcnn.save_pretrained(str(tmp_path / 'export'), name, variables, cfg)
    theirs = timm.create_model(f'local-dir:{tmp_path / "export"}', pretrained=True).eval()
    size = max(64, jaxcnn.model_info(name).min_input)
    x = np.random.RandomState(1).randn(2, 3, size, size).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    model = jaxcnn.create_model(name)
    got = np.asarray(model.apply(variables, x.transpose(0, 2, 3, 1), train=False))
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    data = timm.data.resolve_data_config({}, model=theirs)
    assert data['crop_pct'] == 0.9 and list(data['mean']) == cfg['mean']
    # JAX -> file -> JAX: bit for bit (without the heads the file has no place for)
    again, again_cfg = jaxcnn.load_pretrained(
        str(tmp_path / 'export/model.safetensors'), name, cache=False
    )
    aux = {head for _, head in getattr(jaxcnn.create_model(name), 'aux_taps', ())}
    kept = {c: {k: v for k, v in tree.items() if k not in aux} for c, tree in variables.items()}
    assert jax.tree.structure(again) == jax.tree.structure(kept)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(a, b)
    assert again_cfg['std'] == cfg['std']
    # fine-tuning from the folder normalises with its statistics
    run = ConfigDict(
        dict(init_from=str(tmp_path / 'export/model.safetensors'), normalization='model')
    )
    assert train.model_stats(run, name, 3) == (tuple(cfg['mean']), tuple(cfg['std']))


def test_predict_names_timms_top_classes(hf_home, tmp_path):
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    rng = np.random.RandomState(0)
    paths = []
    for i, (h, w) in enumerate([(180, 240), (256, 200)]):
        paths.append(str(tmp_path / f'image{i}.png'))
        Image.fromarray(rng.randint(0, 256, (h, w, 3), np.uint8)).save(paths[-1])
    result = _run_module(['jaxcnn.predict', '--model', 'resnet18', *paths], hf_home, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # timm, on the very file the command read from the hub cache
    snapshots = os.path.join(hf_home, 'hub', 'models--timm--resnet18.a1_in1k', 'snapshots')
    weights = os.path.join(snapshots, os.listdir(snapshots)[0], 'model.safetensors')
    ref = timm.create_model(
        'resnet18.a1_in1k', pretrained=True, pretrained_cfg_overlay=dict(file=weights)
    ).eval()
    transform = create_transform(**resolve_data_config({}, model=ref))
    info = ImageNetInfo()
    lines = result.stdout.splitlines()
    for path in paths:
        with torch.no_grad():
            probs = ref(transform(Image.open(path).convert('RGB'))[None]).softmax(-1)[0].numpy()
        top = np.argsort(-probs)[:5]
        block = lines[lines.index(path) + 1 : lines.index(path) + 6]
        for rank, (line, i) in enumerate(zip(block, top), 1):
            number, percent, rest = line.split(maxsplit=2)
            assert number == f'{rank}.' and rest.endswith(f'[{i}]'), (line, i)
            assert rest.startswith(info.index_to_description(int(i)))
            assert abs(float(percent.rstrip('%')) - 100 * probs[i]) <= 0.01


def test_predict_says_what_is_wrong_in_one_line(hf_home, tmp_path):
    (tmp_path / 'notes.png').write_text('not an image')
    cases = [
        (['--model', 'resnet18', str(tmp_path / 'notes.png')], 'as an image'),
        (['--model', 'resnet18', str(tmp_path / 'absent.png')], 'no image at'),
        (['--model', 'resnet_eighteen', str(tmp_path / 'notes.png')], 'unknown model'),
    ]
    env = dict(
        os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE='1', JAXCNN_CACHE=str(tmp_path / 'cache')
    )
    procs = [
        subprocess.Popen(
            [sys.executable, '-m', 'jaxcnn.predict', *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for args, _ in cases
    ]
    for proc, (_, message) in zip(procs, cases):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 2
        assert err.strip().count('\n') == 0 and message in err, err


def _run_module(args, hf_home, tmp_path):
    env = dict(
        os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE='1', JAXCNN_CACHE=str(tmp_path / 'cache')
    )
    return subprocess.run(
        [sys.executable, '-m', *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


def test_torchvision_weights_are_torchvisions(tmp_path, monkeypatch):
    # the twins that timm has no hub weights for take torchvision's own files
    import torchvision

    from test_convert import build_reference

    for name, (url, resize) in hub.TORCHVISION_WEIGHTS.items():
        weights = torchvision.models.get_model_weights(timm_arch(name) or name).DEFAULT
        assert (url, [resize], [224]) == (
            weights.url,
            weights.transforms().resize_size,
            weights.transforms().crop_size,
        )
    assert {
        n for n in TWINS if n not in hub.DEFAULT_HUB_IDS and timm_default_hub_id(n) is None
    } >= set(hub.TORCHVISION_WEIGHTS)
    monkeypatch.setenv('JAXCNN_CACHE', str(tmp_path))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(FileNotFoundError, match='googlenet-1378be20.pth is not cached'):
        jaxcnn.create_model('googlenet', pretrained=True)
    # offline, from the cache: a file in torchvision's layout with its auxiliary heads
    ref = build_reference('tv:googlenet', seed=2, init_weights=True)
    os.makedirs(tmp_path / 'pretrained' / 'urls')
    torch.save(ref.state_dict(), tmp_path / 'pretrained' / 'urls' / 'googlenet-1378be20.pth')
    model, variables = jaxcnn.create_model('googlenet', pretrained=True)
    x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    got = np.asarray(model.apply(variables, x.transpose(0, 2, 3, 1), train=False))
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    cfg = jaxcnn.hub.weights_config(True, 'googlenet')
    assert cfg['crop_pct'] == 224 / 256 and cfg['input_size'] == [3, 224, 224]
