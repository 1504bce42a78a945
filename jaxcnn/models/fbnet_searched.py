"""A network found by FBNet's architecture search (``jaxcnn.search``) as a registered model.

``fbnet_searched`` is :class:`jaxcnn.models.efficientnet.MBConvNet` whose architecture -- stage
table, stem width, head width, activation -- is read from the ``architecture.json`` that
``python -m jaxcnn.search`` writes, given as the ``arch`` argument (a path, or the JSON text):

    model = jaxcnn.create_model('fbnet_searched', num_classes=10, arch='runs/s/architecture.json')
    python -m jaxcnn.train --config fbnet_search_fmnist:train \\
        --config.model_kwargs.arch=runs/s/architecture.json

The file's architecture fields replace the registered defaults; the other arguments (classes,
dropout, stochastic depth, dtype) stay the caller's. Without ``arch`` the model is FBNet-C
(Wu et al. 2019, Fig. 4; the ``fbnetc_100`` table), the network FBNet's own search found on
ImageNet, so the registered entry is checked against timm's ``fbnetc_100`` count.

The file format (``ARCH_FORMAT``) lives here, next to the model that reads it, so that the
registry does not import the search tool.
"""

import json
import os
from typing import Any, Dict

from ..registry import register
from .efficientnet import MBConvNet, Row, Stages
from .mnasnet import FBNET_C

ARCH_FORMAT = 'jaxcnn.fbnet_search/1'
# MBConvNet fields an architecture file sets (besides ``stages``).
ARCH_MODEL_FIELDS = ('stem_width', 'num_features', 'act')


def stages_to_json(stages: Stages) -> list:
    """A stage table as JSON-ready lists of row dicts: ``Row``'s required fields, and its
    optional ones only where they differ from their defaults."""
    optional = Row._field_defaults
    return [
        [
            {k: v for k, v in r._asdict().items() if k not in optional or v != optional[k]}
            for r in stage
        ]
        for stage in stages
    ]


def stages_from_json(stages: list) -> Stages:
    """The inverse of :func:`stages_to_json`."""
    return tuple(tuple(Row(**row) for row in stage) for stage in stages)


def architecture_json(
    stages: Stages, stem_width: int, num_features: int, act: str, **extra
) -> Dict[str, Any]:
    """The content of an architecture file: format tag, model fields, stage table, ``extra``."""
    return {
        'format': ARCH_FORMAT,
        'model': {'stem_width': int(stem_width), 'num_features': int(num_features), 'act': act},
        'stages': stages_to_json(stages),
        **extra,
    }


_CACHE: Dict[tuple, Dict[str, Any]] = {}


def load_architecture(arch: str) -> Dict[str, Any]:
    """MBConvNet keyword arguments (stages, stem_width, num_features, act, head_scaling) of an
    architecture file, given as a path or as its JSON text. Raises FileNotFoundError or
    ValueError with one line saying what is wrong."""
    text = arch.strip()
    if text.startswith('{'):
        key = ('text', text)
    else:
        path = os.path.expanduser(text)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f'architecture file {arch!r} does not exist; write one with `python -m '
                f'jaxcnn.search --config fbnet_search_fmnist --workdir DIR` and pass '
                f'DIR/architecture.json'
            )
        st = os.stat(path)
        key = ('file', os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key not in _CACHE:  # a module is re-created at every bind: read each file once
        if key[0] == 'file':
            with open(key[1]) as f:
                text = f.read()
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f'architecture {arch!r} is not valid JSON: {e}') from None
        if not isinstance(spec, dict) or spec.get('format') != ARCH_FORMAT:
            raise ValueError(
                f'architecture {arch!r} is not a {ARCH_FORMAT} file (written by jaxcnn.search)'
            )
        try:
            stages = stages_from_json(spec['stages'])
            model = {k: spec['model'][k] for k in ARCH_MODEL_FIELDS}
        except (KeyError, TypeError) as e:
            raise ValueError(f'architecture {arch!r} lacks or mangles {e}') from None
        if not stages or not all(stages):
            raise ValueError(f'architecture {arch!r} has an empty stage')
        _CACHE[key] = dict(stages=stages, head_scaling='fixed', **model)
    return dict(_CACHE[key])


class FBNetSearched(MBConvNet):
    """MBConvNet whose architecture comes from ``arch`` (an architecture.json path or its text;
    '' keeps the registered table). See the module docstring."""

    arch: str = ''

    def __post_init__(self):
        if self.arch:
            # The file decides the architecture; set before Flax finalises the dataclass.
            for field, value in load_architecture(self.arch).items():
                object.__setattr__(self, field, value)
        super().__post_init__()


register(
    'fbnet_searched',
    FBNetSearched,
    dict(
        stages=FBNET_C,
        stem_width=16,
        num_features=1984,
        head_scaling='fixed',
        act='relu',
        drop_rate=0.2,
    ),
    family='mnasnet',
    input_size=(224, 224, 3),
    min_input=32,
    reference='timm fbnetc_100 (FBNet-C, Wu et al. 2019, Fig. 4) without `arch`; with '
    '`arch=architecture.json` the network `python -m jaxcnn.search` found',
    reference_params=5_572_200,
)
