"""Pretrained weights from the Hugging Face Hub, read and converted without PyTorch.

    model, variables = jaxcnn.create_model('resnet50', pretrained=True)      # timm's default tag
    model, variables = jaxcnn.create_model('resnet50', pretrained='tv_in1k')  # another tag
    variables, cfg = jaxcnn.load_pretrained('timm/convnext_tiny.fb_in22k_ft_in1k')

timm keeps its weights on the hub as one repository per tag, ``timm/<architecture>.<tag>``,
holding ``model.safetensors`` (the PyTorch state dict) and ``config.json`` (the architecture,
``num_classes``, and a ``pretrained_cfg`` with the preprocessing the weights expect). Both are
fetched with ``huggingface_hub``, so its cache, ``HF_HOME``, ``HF_HUB_OFFLINE``, revisions and
tokens work as they do for every hub library; the weights are read with safetensors' NumPy
loader and converted by :mod:`jaxcnn.convert`. The converted variables are cached under
``$JAXCNN_CACHE`` (default ``~/.cache/jaxcnn``), keyed by the file they came from, so a second
load does no conversion. A local ``.safetensors`` or ``.pth`` path is accepted wherever a tag is.

The way back: :func:`save_pretrained` writes jaxcnn variables in the same layout, which timm
loads (``timm.create_model('local-dir:<dir>', pretrained=True)``) and ``huggingface_hub``
uploads as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import numpy as np

from .registry import create_model as _create_model
from .registry import list_models, model_info

# jaxcnn model -> the hub repository of the weights timm loads for its twin by default
# (``timm.create_model(arch, pretrained=True)``: the first tag of the architecture's
# default_cfgs in timm 1.0.31). tests/test_hub.py checks the table against timm's registry.
# Twins that timm has no hub weights for (alexnet, googlenet, squeezenet*, shufflenet_v2*, and
# architectures timm lists as untrained or as a download from elsewhere) have no entry.
DEFAULT_HUB_IDS = {
    'convnext_base': 'timm/convnext_base.fb_in22k_ft_in1k',
    'convnext_large': 'timm/convnext_large.fb_in22k_ft_in1k',
    'convnext_small': 'timm/convnext_small.in12k_ft_in1k',
    'convnext_tiny': 'timm/convnext_tiny.in12k_ft_in1k',
    'convnext_xlarge': 'timm/convnext_xlarge.fb_in22k_ft_in1k',
    'densenet121': 'timm/densenet121.ra_in1k',
    'densenet161': 'timm/densenet161.tv_in1k',
    'densenet169': 'timm/densenet169.tv_in1k',
    'densenet201': 'timm/densenet201.tv_in1k',
    'efficientnet_b0': 'timm/efficientnet_b0.ra_in1k',
    'efficientnet_b1': 'timm/efficientnet_b1.ra4_e3600_r240_in1k',
    'efficientnet_b2': 'timm/efficientnet_b2.ra_in1k',
    'efficientnet_b3': 'timm/efficientnet_b3.ra2_in1k',
    'efficientnet_b4': 'timm/efficientnet_b4.ra2_in1k',
    'efficientnet_b5': 'timm/efficientnet_b5.sw_in12k_ft_in1k',
    'fbnetc_100': 'timm/fbnetc_100.rmsp_in1k',
    'ghostnet_100': 'timm/ghostnet_100.in1k',
    'inception_v3': 'timm/inception_v3.tv_in1k',
    'mnasnet_100': 'timm/mnasnet_100.rmsp_in1k',
    'mobilenetv1_100': 'timm/mobilenetv1_100.ra4_e3600_r224_in1k',
    'mobilenetv1_125': 'timm/mobilenetv1_125.ra4_e3600_r224_in1k',
    'mobilenetv2_050': 'timm/mobilenetv2_050.lamb_in1k',
    'mobilenetv2_100': 'timm/mobilenetv2_100.ra_in1k',
    'mobilenetv2_140': 'timm/mobilenetv2_140.ra_in1k',
    'mobilenetv3_large_100': 'timm/mobilenetv3_large_100.ra_in1k',
    'mobilenetv3_small_050': 'timm/mobilenetv3_small_050.lamb_in1k',
    'mobilenetv3_small_075': 'timm/mobilenetv3_small_075.lamb_in1k',
    'mobilenetv3_small_100': 'timm/mobilenetv3_small_100.lamb_in1k',
    'nf_resnet50': 'timm/nf_resnet50.ra2_in1k',
    'nfnet_f0': 'timm/dm_nfnet_f0.dm_in1k',
    'nfnet_f1': 'timm/dm_nfnet_f1.dm_in1k',
    'nfnet_f2': 'timm/dm_nfnet_f2.dm_in1k',
    'nfnet_f3': 'timm/dm_nfnet_f3.dm_in1k',
    'nfnet_f4': 'timm/dm_nfnet_f4.dm_in1k',
    'nfnet_f5': 'timm/dm_nfnet_f5.dm_in1k',
    'nfnet_f6': 'timm/dm_nfnet_f6.dm_in1k',
    'resnet101': 'timm/resnet101.a1h_in1k',
    'resnet152': 'timm/resnet152.a1h_in1k',
    'resnet18': 'timm/resnet18.a1_in1k',
    'resnet34': 'timm/resnet34.a1_in1k',
    'resnet50': 'timm/resnet50.a1_in1k',
    'resnetv2_101': 'timm/resnetv2_101.a1h_in1k',
    'resnetv2_50': 'timm/resnetv2_50.a1h_in1k',
    'resnext101_32x8d': 'timm/resnext101_32x8d.tv_in1k',
    'resnext101_64x4d': 'timm/resnext101_64x4d.c1_in1k',
    'resnext50_32x4d': 'timm/resnext50_32x4d.a1h_in1k',
    'seresnet50': 'timm/seresnet50.a1_in1k',
    'seresnext50_32x4d': 'timm/seresnext50_32x4d.racm_in1k',
    'tf_efficientnet_cc_b0_4e': 'timm/tf_efficientnet_cc_b0_4e.in1k',
    'vgg11': 'timm/vgg11.tv_in1k',
    'vgg11_bn': 'timm/vgg11_bn.tv_in1k',
    'vgg13': 'timm/vgg13.tv_in1k',
    'vgg13_bn': 'timm/vgg13_bn.tv_in1k',
    'vgg16': 'timm/vgg16.tv_in1k',
    'vgg16_bn': 'timm/vgg16_bn.tv_in1k',
    'vgg19': 'timm/vgg19.tv_in1k',
    'vgg19_bn': 'timm/vgg19_bn.tv_in1k',
    'wide_resnet101_2': 'timm/wide_resnet101_2.tv_in1k',
    'wide_resnet50_2': 'timm/wide_resnet50_2.racm_in1k',
}

# jaxcnn model -> (URL, resize size) of torchvision's default ImageNet weights, for the
# torchvision twins that timm has no hub weights for (``get_model_weights(arch).DEFAULT`` in
# torchvision 0.29; its evaluation transform resizes the shorter side to that size, bilinear,
# then crops 224 px). The files are .pth, so reading them needs torch.
TORCHVISION_WEIGHTS = {
    'alexnet': ('https://download.pytorch.org/models/alexnet-owt-7be5be79.pth', 256),
    'googlenet': ('https://download.pytorch.org/models/googlenet-1378be20.pth', 256),
    'shufflenet_v2_x0_5': (
        'https://download.pytorch.org/models/shufflenetv2_x0.5-f707e7126e.pth',
        256,
    ),
    'shufflenet_v2_x1_0': (
        'https://download.pytorch.org/models/shufflenetv2_x1-5666bf0f80.pth',
        256,
    ),
    'shufflenet_v2_x1_5': (
        'https://download.pytorch.org/models/shufflenetv2_x1_5-3c479a10.pth',
        232,
    ),
    'shufflenet_v2_x2_0': (
        'https://download.pytorch.org/models/shufflenetv2_x2_0-8be3c8ee.pth',
        232,
    ),
    'squeezenet1_0': ('https://download.pytorch.org/models/squeezenet1_0-b66bff10.pth', 256),
    'squeezenet1_1': ('https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth', 256),
}

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
LOCAL_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin')


def cache_dir() -> str:
    return os.path.join(
        os.environ.get('JAXCNN_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'jaxcnn')),
        'pretrained',
    )


def _arch(name: str) -> str:
    torch_name = model_info(name).torch_name
    if not torch_name:
        raise ValueError(f'{name} has no timm or torchvision twin, so no pretrained weights')
    return torch_name.split(':', 1)[1]


def resolve_source(name: Optional[str], pretrained: Any) -> str:
    """The hub id or local path that ``pretrained`` means for model ``name``: ``True`` is
    timm's default tag, a bare tag ``'a1_in1k'`` is ``timm/<arch>.a1_in1k``, and a hub id
    (``timm/...``, optionally ``hf:`` or ``hf-hub:`` in front) or a file path is itself."""
    if isinstance(pretrained, os.PathLike):
        return os.fspath(pretrained)
    if pretrained is True:
        if name in TORCHVISION_WEIGHTS:
            return TORCHVISION_WEIGHTS[name][0]
        if name not in DEFAULT_HUB_IDS:
            twin = model_info(name).torch_name
            raise ValueError(
                f'no pretrained weights on the hub for {name}'
                + (f' (timm has none for its twin {twin})' if twin else ' (it has no twin)')
                + "; pass a local file instead: pretrained='path/to/model.safetensors'"
            )
        return DEFAULT_HUB_IDS[name]
    if not isinstance(pretrained, str) or not pretrained:
        raise TypeError(f'pretrained must be True, a tag, a hub id or a path, got {pretrained!r}')
    for prefix in ('hf-hub:', 'hf:'):
        if pretrained.startswith(prefix):
            return pretrained[len(prefix) :]
    if pretrained.endswith(LOCAL_SUFFIXES) or os.sep in pretrained and os.path.exists(pretrained):
        return pretrained
    if '/' in pretrained:
        return pretrained
    if name is None:
        raise ValueError(f'the tag {pretrained!r} needs a model name; or pass a hub id')
    return f'timm/{_arch(name)}.{pretrained}'


def _is_url(source: str) -> bool:
    return source.startswith(('https://', 'http://'))


def _is_local(source: str) -> bool:
    return not _is_url(source) and (source.endswith(LOCAL_SUFFIXES) or os.path.exists(source))


def _fetch_url(url: str) -> str:
    """The local copy of a weights file at ``url``, under ``$JAXCNN_CACHE/pretrained/urls``,
    fetched when absent. Downloads are off where the hub's are (``HF_HUB_OFFLINE``). The
    hash prefix in torchvision's file names is checked after a download."""
    import re
    import urllib.request

    path = os.path.join(cache_dir(), 'urls', url.rsplit('/', 1)[-1])
    if os.path.isfile(path):
        return path
    how = (
        f'download {url} where there is a network and put it at {path}, or pass the file: '
        f"pretrained='path/to/{os.path.basename(path)}'"
    )
    if os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on'):
        raise FileNotFoundError(f'{url} is not cached and downloads are off; {how}')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        urllib.request.urlretrieve(url, tmp)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise FileNotFoundError(f'cannot fetch {url} ({e}); {how}') from None
    prefix = re.search(r'-([0-9a-f]{8,})\.pth$', path)
    if prefix and not hashlib.sha256(open(tmp, 'rb').read()).hexdigest().startswith(prefix[1]):
        os.remove(tmp)
        raise ValueError(f'{url} arrived damaged (its SHA-256 does not start with {prefix[1]})')
    os.replace(tmp, path)
    return path


def _torchvision_config(name: str) -> dict:
    """config.json's facts for torchvision's weights: ImageNet-1k, resized and cropped to
    224 px as its evaluation transform does."""
    resize = TORCHVISION_WEIGHTS[name][1]
    return {
        'architecture': _arch(name),
        'num_classes': 1000,
        'pretrained_cfg': {
            'input_size': [3, 224, 224],
            'crop_pct': 224 / resize,
            'interpolation': 'bilinear',
            'mean': [0.485, 0.456, 0.406],
            'std': [0.229, 0.224, 0.225],
        },
    }


def _remote_missing():
    """The error that means the hub answered and the repository lacks the file."""
    from huggingface_hub import errors

    return getattr(errors, 'RemoteEntryNotFoundError', errors.EntryNotFoundError)


def _download(repo_id: str, filename: str, revision: Optional[str]) -> str:
    """The local path of a hub file (from the cache, or fetched); one line when it cannot be
    had, saying how to get it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except LocalEntryNotFoundError:  # offline, or no network, and not in the cache
        hf_home = os.environ.get('HF_HOME', '~/.cache/huggingface')
        raise FileNotFoundError(
            f'{repo_id}/{filename} is not in the hub cache ({hf_home}) and the hub cannot be '
            f'reached; fetch it where there is a network with `huggingface-cli download '
            f'{repo_id} {filename} config.json` and copy the cache here, or pass a local file: '
            f"pretrained='path/to/model.safetensors'"
        ) from None
    except _remote_missing():
        raise
    except Exception as e:  # noqa: BLE001 (unknown repository, gated, network: one line)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f'cannot fetch {repo_id}/{filename} from the hub: {first}'
        ) from None


def hub_files(repo_id: str, revision: Optional[str] = None) -> tuple[str, dict]:
    """(weights path, config.json contents) of a hub repository in timm's layout."""
    config = json.loads(open(_download(repo_id, 'config.json', revision)).read())
    for filename in WEIGHT_FILES:
        try:
            return _download(repo_id, filename, revision), config
        except _remote_missing():
            continue
    raise FileNotFoundError(f'{repo_id} holds none of {", ".join(WEIGHT_FILES)}')


def model_for_architecture(arch: str) -> str:
    """The jaxcnn model whose twin is timm's or torchvision's architecture ``arch``."""
    for name in list_models():
        twin = model_info(name).torch_name
        if twin and twin.split(':', 1)[1] == arch:
            return name
    raise ValueError(
        f'no jaxcnn model is a twin of the architecture {arch!r}; '
        f'pass name= to convert the weights into a model of your choice'
    )


def pretrained_config(name: Optional[str], config: dict) -> dict:
    """The preprocessing and label facts of a set of weights: ``config.json``'s
    ``pretrained_cfg`` with its top-level ``num_classes`` and ``label_names``, filled from the
    model's registry entry where the file says nothing."""
    cfg = dict(config.get('pretrained_cfg') or {})
    for key in ('num_classes', 'label_names', 'label_descriptions', 'architecture'):
        if key in config and key not in cfg:
            cfg[key] = config[key]
    if name is not None:
        info = model_info(name)
        h, w, c = info.input_size
        cfg.setdefault('input_size', [c, h, w])
        cfg.setdefault('mean', list(info.mean))
        cfg.setdefault('std', list(info.std))
        cfg.setdefault('num_classes', info.num_classes)
    cfg.setdefault('interpolation', 'bilinear')
    cfg.setdefault('crop_pct', 0.875)
    cfg.setdefault('crop_mode', 'center')
    return cfg


def config_beside(path: str) -> Optional[dict]:
    """The ``config.json`` in the folder of a local weights file (as save_pretrained and the hub
    lay them out), or None where there is none."""
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), 'config.json')
    return json.loads(open(beside).read()) if os.path.isfile(beside) else None


def weights_config(source: Any, name: Optional[str] = None) -> dict:
    """The pretrained config (preprocessing, classes) of a set of weights, read from their
    ``config.json`` alone: nothing is converted."""
    source = resolve_source(name, source)
    if _is_local(source):
        config = config_beside(source) or {}
    elif _is_url(source):
        config = _torchvision_config(name) if name in TORCHVISION_WEIGHTS else {}
    else:
        config = json.loads(open(_download(source, 'config.json', None)).read())
    cfg = pretrained_config(name, config)
    cfg['source'] = source
    return cfg


def _cached_conversion(name: str, weights: str, convert_fn):
    """Converted variables for ``weights`` from the cache, or converted now and cached."""
    from flax import serialization

    st = os.stat(weights)
    key = hashlib.sha256(
        f'{os.path.realpath(weights)}|{st.st_size}|{st.st_mtime_ns}|{name}'.encode()
    ).hexdigest()[:20]
    path = os.path.join(cache_dir(), f'{name}-{key}.msgpack')
    if os.path.exists(path):
        try:
            with open(path, 'rb') as f:
                return serialization.msgpack_restore(f.read())
        except Exception:  # noqa: BLE001 (a damaged cache entry is converted again)
            pass
    variables = convert_fn()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f'{path}.tmp{os.getpid()}'
        with open(tmp, 'wb') as f:
            f.write(serialization.msgpack_serialize(_to_numpy(variables)))
        os.replace(tmp, path)  # whole or absent, even with loads running side by side
    except OSError:
        pass  # a read-only cache only costs the next load a conversion
    return variables


def _to_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


def load_pretrained(
    source: Any,
    name: Optional[str] = None,
    *,
    num_classes: Optional[int] = None,
    revision: Optional[str] = None,
    cache: bool = True,
) -> tuple[dict, dict]:
    """``(variables, pretrained_cfg)`` for a hub id (``'timm/resnet50.a1_in1k'``), a tag of
    model ``name`` (``True`` for timm's default), or a local weights file.

    The model is the twin of ``config.json``'s architecture unless ``name`` is given.
    ``num_classes`` other than the file's gives a new, randomly initialised head (0: none).
    """
    import jax
    import jax.numpy as jnp

    from . import convert

    source = resolve_source(name, source)
    if _is_local(source):
        if name is None:
            raise ValueError(f'converting the local file {source} needs name= (the jaxcnn model)')
        if not os.path.isfile(source):
            raise FileNotFoundError(f'no weights file at {source!r}')
        weights = source
        config = config_beside(source) or {}
    elif _is_url(source):
        if name is None:
            name = next((n for n, (url, _) in TORCHVISION_WEIGHTS.items() if url == source), None)
        if name is None:
            raise ValueError(f'converting the weights at {source} needs name= (the jaxcnn model)')
        weights = _fetch_url(source)
        config = _torchvision_config(name) if name in TORCHVISION_WEIGHTS else {}
    else:
        weights, config = hub_files(source, revision)
        if name is None:
            name = model_for_architecture(config.get('architecture', ''))
    cfg = pretrained_config(name, config)
    cfg['source'] = source

    def convert_now():
        return convert.from_torch(name, weights)

    variables = _cached_conversion(name, weights, convert_now) if cache else convert_now()
    variables = jax.tree.map(jnp.asarray, variables)
    head = variables['params'].get('head', {}).get('fc', {}).get('kernel')
    file_classes = 0 if head is None else int(head.shape[-1])
    cfg['num_classes'] = file_classes
    if num_classes is not None and num_classes != file_classes:
        variables = _new_head(name, variables, num_classes)
        cfg['num_classes'] = num_classes
        cfg.pop('label_names', None)
        cfg.pop('label_descriptions', None)
    return variables, cfg


def _model_kwargs_for(name: str, variables: dict) -> dict:
    """Constructor arguments that the weights decide: no auxiliary heads where the file had
    none (timm's inception_v3, torchvision's with aux_logits=False)."""
    from .convert import _has_aux

    if getattr(_create_model(name), 'aux_logits', False) and not _has_aux(name, variables):
        return {'aux_logits': False}
    return {}


def _new_head(name: str, variables: dict, num_classes: int) -> dict:
    """The pretrained trunk with a freshly initialised classifier for ``num_classes``."""
    import jax
    import jax.numpy as jnp

    from .transfer import merge_pretrained

    info = model_info(name)
    model = _create_model(name, num_classes=num_classes, **_model_kwargs_for(name, variables))
    size = max(info.min_input, 32)
    x = jnp.zeros((1, size, size, info.input_size[2]), jnp.float32)
    target = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
    return merge_pretrained(dict(target), variables)


def model_for_weights(name: str, variables: dict, num_classes: int, **overrides):
    """Model ``name`` built to fit loaded weights: their head size, and auxiliary heads only
    where the file had them."""
    kwargs = {**_model_kwargs_for(name, variables), **overrides}
    return _create_model(name, num_classes=num_classes, **kwargs)


def create_pretrained(name: str, pretrained: Any, num_classes: Optional[int] = None, **overrides):
    """``(model, variables)``: the model built to fit the weights, and the weights."""
    variables, cfg = load_pretrained(pretrained, name, num_classes=num_classes)
    return model_for_weights(name, variables, cfg['num_classes'], **overrides), variables


# pretrained_cfg fields that say where a file came from, not what it holds
_SOURCE_FIELDS = ('source', 'file', 'hf_hub_id', 'url', 'architecture', 'tag')


def save_pretrained(
    directory: str,
    name: str,
    variables,
    pretrained_cfg: Optional[dict] = None,
    *,
    template=None,
) -> str:
    """Write the ``variables`` of model ``name`` as a hub repository in timm's layout:
    ``model.safetensors`` (the state dict of timm's twin, :func:`jaxcnn.convert.to_torch`) and
    ``config.json`` (``architecture``, ``num_classes`` and the ``pretrained_cfg`` that
    :func:`load_pretrained` returned, or the model's registry defaults). timm loads the folder
    with ``timm.create_model('local-dir:' + directory, pretrained=True)``, and
    ``huggingface_hub.upload_folder`` publishes it. Both files are written whole or not at all.
    """
    from safetensors.numpy import save_file

    from . import convert

    state = convert.to_torch(name, variables, layout='timm', template=template, tensors=False)
    head = variables['params'].get('head', {}).get('fc', {}).get('kernel')
    num_classes = 0 if head is None else int(np.shape(head)[-1])
    given = dict(pretrained_cfg or {})
    cfg = {
        k: v
        for k, v in pretrained_config(name, {'pretrained_cfg': given}).items()
        if k not in _SOURCE_FIELDS and k not in ('label_names', 'label_descriptions')
    }
    cfg['num_classes'] = num_classes
    config = {'architecture': _arch(name), 'num_classes': num_classes, 'pretrained_cfg': cfg}
    if given.get('label_names') and len(given['label_names']) == num_classes:
        config['label_names'] = list(given['label_names'])
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, 'model.safetensors')
    save_file({k: np.array(v, order='C') for k, v in state.items()}, weights + '.tmp')
    with open(os.path.join(directory, 'config.json.tmp'), 'w') as f:
        json.dump(config, f, indent=2)
    os.replace(weights + '.tmp', weights)
    os.replace(os.path.join(directory, 'config.json.tmp'), os.path.join(directory, 'config.json'))
    return directory
