"""Evaluation preprocessing of pretrained weights, as timm defines it, on the host with Pillow.

``eval_transform(model_or_tag)`` builds what timm's ``resolve_data_config`` +
``create_transform`` give for the same weights: resize by ``input_size / crop_pct`` (the
shorter side, or both sides for ``crop_mode='squash'``) with the weights' interpolation, a
centre crop to ``input_size``, then scaling to [0, 1] and the weights' mean/std. torchvision's
transforms resize PIL images with PIL itself, so the pixels are the same ones.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

_RESAMPLE = {'nearest': 0, 'bilinear': 2, 'bicubic': 3, 'lanczos': 1, 'box': 4, 'hamming': 5}


def resolve_config(model_or_tag: Any) -> dict:
    """The pretrained config of a registered model (its default hub weights), a hub id or tag
    source, or an already resolved config dict."""
    if isinstance(model_or_tag, dict):
        return model_or_tag
    from jaxcnn import hub
    from jaxcnn.registry import list_models

    name = model_or_tag if model_or_tag in list_models() else None
    source = hub.resolve_source(name, True if name else model_or_tag)
    if hub._is_local(source) and hub.config_beside(source) is None:
        raise ValueError(
            f'{source}: a weights file without a config.json beside it says nothing of its '
            'preprocessing; pass a config dict'
        )
    return hub.weights_config(source, name)


def eval_transform(model_or_tag: Any) -> Callable:
    """A function from a PIL image to the float32 HWC array that the weights expect."""
    from PIL import Image

    cfg = resolve_config(model_or_tag)
    _, height, width = cfg['input_size']
    crop_pct = cfg.get('crop_pct') or 0.875
    interpolation = cfg.get('interpolation', 'bilinear')
    if interpolation not in _RESAMPLE:
        raise ValueError(f'unknown interpolation {interpolation!r}; one of {sorted(_RESAMPLE)}')
    resample = _RESAMPLE[interpolation]
    crop_mode = cfg.get('crop_mode', 'center')
    if crop_mode not in ('center', 'squash'):
        raise ValueError(f"crop_mode {crop_mode!r} is not supported; 'center' or 'squash'")
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    mean = np.asarray(cfg.get('mean', (0.485, 0.456, 0.406)), np.float32)
    std = np.asarray(cfg.get('std', (0.229, 0.224, 0.225)), np.float32)

    def transform(image: 'Image.Image') -> np.ndarray:
        image = image.convert('RGB')
        w, h = image.size
        if crop_mode == 'squash':
            size = (scale[1], scale[0])
        elif scale[0] == scale[1]:
            # torchvision's Resize(int): the shorter side to the size, the longer truncated
            if w <= h:
                size = (scale[0], int(scale[0] * h / w))
            else:
                size = (int(scale[0] * w / h), scale[0])
        else:
            raise ValueError(f'a non-square resize {scale} in crop_mode center is not supported')
        image = image.resize(size, resample)
        w, h = image.size
        # torchvision's CenterCrop rounding
        top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
        image = image.crop((left, top, left + width, top + height))
        return (np.asarray(image, np.float32) / 255.0 - mean) / std

    return transform
