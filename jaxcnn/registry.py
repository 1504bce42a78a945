"""The model registry: every architecture is a row (module class, its arguments, metadata)."""

import dataclasses
import difflib
import fnmatch
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a user needs to feed a model and what it is verified against.

    reference: where the architecture is checked, e.g. 'torchvision resnet50' or
      'He et al. 2016, Table 6'. reference_params: that reference's exact parameter count
      (at ``num_classes`` outputs), or the paper's rounded figure with ``params_rounding``.
    torch_name: the timm/torchvision model with identical layout, if any ('timm:...' / 'tv:...');
      weights convert from it with :func:`jaxcnn.convert.from_torch`.
    """

    name: str
    family: str
    input_size: Tuple[int, int, int] = (224, 224, 3)
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    num_classes: int = 1000
    reference: str = ''
    reference_params: Optional[float] = None
    params_rounding: Optional[float] = None  # e.g. 1e4 for a paper's "0.27M"
    torch_name: Optional[str] = None
    min_input: int = 32  # smallest square input the model accepts


@dataclasses.dataclass(frozen=True)
class _Entry:
    module_cls: Any
    kwargs: Dict[str, Any]
    info: ModelInfo


_REGISTRY: Dict[str, _Entry] = {}


def register(name: str, module_cls, kwargs: Optional[dict] = None, **info):
    """Register ``name`` as ``module_cls(**kwargs)`` with the given :class:`ModelInfo` fields."""
    if name in _REGISTRY:
        raise ValueError(f'model {name!r} registered twice')
    _REGISTRY[name] = _Entry(module_cls, dict(kwargs or {}), ModelInfo(name=name, **info))


def _ensure_loaded():
    # models register themselves on import; importing here keeps `import jaxcnn` cheap to read
    from . import models  # noqa: F401


def _lookup(name: str) -> _Entry:
    _ensure_loaded()
    if not isinstance(name, str) or name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY.keys(), n=5, cutoff=0.5)
        hint = f'closest: {", ".join(close)}' if close else "see jaxcnn.list_models()"
        raise ValueError(f'unknown model {name!r}; {hint}')
    return _REGISTRY[name]


def _module_fields(cls):
    return [f.name for f in dataclasses.fields(cls) if f.name not in ('parent', 'name')]


def list_models(pattern: str = '*'):
    """Registered model names matching an fnmatch wildcard, sorted."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def model_info(name: str) -> ModelInfo:
    """Input size, mean/std, classes and the reference a model is verified against."""
    return _lookup(name).info


def create_model(
    name: str,
    num_classes: Optional[int] = None,
    pretrained=False,
    features_only: bool = False,
    out_indices: Optional[Sequence[int]] = None,
    **overrides,
):
    """Build a registered model as a ``flax.linen.Module``.

    ``num_classes`` defaults to the model's own (1000 for ImageNet models, 10 for CIFAR ones);
    0 returns pooled features. ``overrides`` set any field of the model class
    (``dtype``, ``param_dtype``, ``drop_rate``, ``drop_path_rate``, ...).

    ``pretrained`` (``True`` for timm's default weights, a tag such as ``'tv_in1k'``, a hub id or
    a local ``.safetensors``/``.pth`` file; see :mod:`jaxcnn.hub`) returns ``(model,
    variables)`` instead: a Linen module holds no weights, so they come beside it. A
    ``num_classes`` other than the weights' gives a new, randomly initialised head.

    ``features_only=True`` returns a :class:`~jaxcnn.layers.features.FeaturePyramid`, as timm's
    argument of that name does: applied, it gives the list of feature maps at ``out_indices``
    (every level by default, finest first), described by :func:`feature_info`. Its variables
    are the classifier's less the head, so pretrained weights load into it.
    """
    if features_only:
        from .layers.features import FeaturePyramid, select_levels

        built = create_model(name, 0, pretrained, **overrides)
        backbone, variables = built if isinstance(built, tuple) else (built, None)
        if out_indices is not None:  # a bad index fails here, not at the first apply
            select_levels(len(feature_info(name, **overrides)), out_indices)
        pyramid = FeaturePyramid(backbone, None if out_indices is None else tuple(out_indices))
        return pyramid if variables is None else (pyramid, variables)
    if out_indices is not None:
        raise ValueError('out_indices selects feature levels; pass features_only=True with it')
    if pretrained is not False and pretrained is not None:
        from .hub import create_pretrained

        _lookup(name)
        return create_pretrained(name, pretrained, num_classes=num_classes, **overrides)
    entry = _lookup(name)
    fields = _module_fields(entry.module_cls)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(
            f'{name} got unknown argument(s) {", ".join(unknown)}; '
            f'accepted: {", ".join(sorted(fields))}'
        )
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
        raise ValueError(f'num_classes must be a non-negative int, got {num_classes!r}')
    kwargs = {**entry.kwargs, **overrides}
    kwargs['num_classes'] = entry.info.num_classes if num_classes is None else num_classes
    return entry.module_cls(**kwargs)


def feature_info(
    name: str,
    input_size: Optional[Tuple[int, int, int]] = None,
    out_indices: Optional[Sequence[int]] = None,
    **overrides,
):
    """The feature levels of ``create_model(name, features_only=True)``, as timm's
    ``feature_info.get_dicts()``: for each, ``module`` (timm's module name where the model has a
    timm twin), ``num_chs``, ``reduction`` (input side over the map's) and ``index``. Read from
    shapes at ``input_size`` (the model's own by default), without computing anything."""
    from .layers.features import feature_info as _info

    backbone = create_model(name, 0, **overrides)
    return _info(backbone, tuple(input_size or model_info(name).input_size), out_indices)


def count_params(params) -> int:
    """Total number of scalars in a pytree of parameters (works on ShapeDtypeStructs too)."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
