"""Test-time evaluation views: centre crop, mirror pair, 10-crop and multi-scale averaging.

``eval_views(images, mode, crop_size, scales)`` returns a stacked array of views
(V, N, crop_h, crop_w, C); run the model on each view and combine the predictions with
``average_views``. The 10-crop protocol (four corners + centre and their mirrors) follows
Krizhevsky et al. 2012; multi-scale averaging follows Simonyan & Zisserman 2015.

Signatures::

  center_crop(images, crop_size) -> (N, h, w, C)
  flip_pair(images, crop_size) -> (2, N, h, w, C)   [centre crop and its mirror]
  ten_crop(images, crop_size) -> (10, N, h, w, C)   [TL, TR, BL, BR, C, then the same flipped]
  multiscale(images, crop_size, scales) -> (len(scales), N, h, w, C)
  eval_views(images, mode='center'|'flip'|'ten_crop'|'multiscale', crop_size=None, scales=(1.0,))
  average_views(logits, average='probs'|'logits') -> (N, K)

All are pure and jittable with ``mode``/``crop_size``/``scales`` static.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.data.augment import resize

__all__ = [
    "center_crop",
    "flip_pair",
    "ten_crop",
    "multiscale",
    "eval_views",
    "average_views",
    "EVAL_MODES",
]
EVAL_MODES = ("center", "flip", "ten_crop", "multiscale")


def _size(crop_size, images) -> tuple[int, int]:
    if crop_size is None:
        return tuple(images.shape[1:3])
    return (
        (int(crop_size), int(crop_size))
        if np.isscalar(crop_size)
        else tuple(int(s) for s in crop_size)
    )


def _crop(images, top, left, h, w):
    return images[:, top : top + h, left : left + w, :]


def center_crop(images, crop_size):
    """Central crop; images smaller than the crop are first resized up to cover it."""
    h, w = _size(crop_size, images)
    ih, iw = images.shape[1:3]
    if ih < h or iw < w:
        scale = max(h / ih, w / iw)
        images = resize(images, (max(h, round(ih * scale)), max(w, round(iw * scale))))
        ih, iw = images.shape[1:3]
    return _crop(images, (ih - h) // 2, (iw - w) // 2, h, w)


def flip_pair(images, crop_size):
    """The centre crop and its left-right mirror: the cheapest test-time augmentation, and what
    10-crop reduces to when the crop is the whole image."""
    c = center_crop(images, crop_size)
    return jnp.stack([c, c[:, :, ::-1, :]])


def ten_crop(images, crop_size):
    """Four corner crops, the centre crop, then the same five mirrored left-right."""
    h, w = _size(crop_size, images)
    ih, iw = images.shape[1:3]
    if ih < h or iw < w:
        raise ValueError(
            f"ten_crop needs images at least {h}x{w}, got {ih}x{iw}; lower crop_size or "
            "upscale the test images (config.test_image_size)"
        )
    crops = [
        _crop(images, 0, 0, h, w),
        _crop(images, 0, iw - w, h, w),
        _crop(images, ih - h, 0, h, w),
        _crop(images, ih - h, iw - w, h, w),
        _crop(images, (ih - h) // 2, (iw - w) // 2, h, w),
    ]
    crops += [c[:, :, ::-1, :] for c in crops]
    return jnp.stack(crops)


def multiscale(images, crop_size, scales: Sequence[float]):
    """One centre crop per scale: resize so the crop is ``1/scale`` of each side, then crop.

    ``scales`` are multiples (>= 1) of ``crop_size``: 1.0 resizes the image to exactly the crop,
    1.15 resizes to 1.15x the crop and keeps the central part.
    """
    h, w = _size(crop_size, images)
    if not scales:
        raise ValueError(
            "multiscale evaluation needs at least one scale, e.g. config.eval.scales=(1.0, 1.15)"
        )
    views = []
    for s in scales:
        if s < 1.0:
            raise ValueError(
                f"multiscale scales are multiples of the crop size and must be >= 1, got {s}"
            )
        resized = resize(images, (int(round(h * s)), int(round(w * s))))
        views.append(center_crop(resized, (h, w)))
    return jnp.stack(views)


def eval_views(images, mode: str = "center", crop_size=None, scales: Sequence[float] = (1.0,)):
    """Stacked evaluation views (V, N, h, w, C) for ``mode`` in EVAL_MODES (V = 1, 2, 10, len(scales))."""
    if mode == "center":
        return center_crop(images, crop_size)[None]
    if mode == "flip":
        return flip_pair(images, crop_size)
    if mode == "ten_crop":
        return ten_crop(images, crop_size)
    if mode == "multiscale":
        return multiscale(images, crop_size, tuple(scales))
    raise ValueError(f"unknown eval mode {mode!r}; use one of {', '.join(EVAL_MODES)}")


def average_views(logits, average: str = "probs"):
    """Combines per-view predictions (V, N, K) into (N, K).

    'probs' averages softmax probabilities and returns their log (usable as logits for argmax
    and cross-entropy); 'logits' averages the raw logits.
    """
    logits = jnp.asarray(logits, jnp.float32)
    if average == "logits":
        return logits.mean(0)
    if average == "probs":
        return jnp.log(jax.nn.softmax(logits, axis=-1).mean(0))
    raise ValueError(f"average must be 'probs' or 'logits', got {average!r}")
