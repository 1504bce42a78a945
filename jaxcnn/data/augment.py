"""Device-side batch augmentation: pure, jittable functions used inside the train step.

All functions take a PRNG key and a float32 NHWC batch and return arrays of the same shape;
the per-image randomness is drawn from that single key. Static arguments (sizes, probabilities,
alphas) are plain Python numbers, so close over them (or mark them static) when jitting.

Signatures::

  normalize(images_uint8, mean, std) -> float32          (x / 255 - mean) / std per channel
  resize(images, size, method='bilinear') -> images       size: int or (H, W)
  random_crop(rng, images, padding, fill=0.) -> images    zero-pad then per-image random crop
  random_flip(rng, images, prob=0.5) -> images            per-image horizontal flip
  cutout(rng, images, size, fill=0.) -> images            DeVries & Taylor 2017, arXiv:1708.04552
  random_erasing(rng, images, prob, area=(0.02, 0.4), aspect=(0.3, 3.3), attempts=10)
                                                          Zhong et al. 2020, arXiv:1708.04896
  one_hot(labels, num_classes, smoothing=0.) -> float32 targets
  mixup(rng, images, targets, alpha) -> (images, targets) Zhang et al. 2018, arXiv:1710.09412
  cutmix(rng, images, targets, alpha) -> (images, targets) Yun et al. 2019, arXiv:1905.04899
  augment_batch(rng, images, labels, aug_cfg, num_classes, label_smoothing=0.)
                                                          -> (images, soft_targets)
  epoch_permutation(rng, n) -> int32 (n,)                 shuffled indices for one epoch
  take_batch(images, labels, perm, step, batch_size) -> (images, labels)
                                                          rows perm[step*B:(step+1)*B], jittable
  device_dataset(dataset, sharding=None) -> dict          ArrayDataset arrays put on device

Recommended order inside the step: ``normalize`` -> ``augment_batch``; the zero fill of
padding/Cutout then equals the dataset mean, as in the Cutout paper.
RandAugment is only available in the TFDS host pipeline (``jaxcnn.data.tfds_input``).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "normalize",
    "resize",
    "random_crop",
    "random_flip",
    "cutout",
    "random_erasing",
    "one_hot",
    "mixup",
    "cutmix",
    "augment_batch",
    "epoch_permutation",
    "take_batch",
    "device_dataset",
]
_log = logging.getLogger(__name__)


def normalize(images, mean: Sequence[float], std: Sequence[float]):
    """uint8 (or 0..255) images -> float32 ``(x / 255 - mean) / std``; stats on a 0–1 scale.

    ``mean``/``std`` have one entry per channel, or one entry for all channels.
    """
    c = images.shape[-1]
    mean = np.asarray(mean, np.float32).reshape(-1)
    std = np.asarray(std, np.float32).reshape(-1)
    if mean.shape != std.shape or mean.size not in (1, c):
        raise ValueError(
            f"mean/std must have 1 or {c} entries to match the images' channels, got "
            f"{mean.size} and {std.size}"
        )
    return (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std


def resize(images, size, method: str = "bilinear"):
    """Resizes an NHWC batch to ``size`` (int or (H, W)) with antialiasing when downscaling."""
    h, w = (size, size) if np.isscalar(size) else tuple(size)
    if images.shape[1:3] == (h, w):
        return images
    n, _, _, c = images.shape
    return jax.image.resize(images, (n, int(h), int(w), c), method=method, antialias=True)


def random_crop(rng, images, padding: int, fill: float = 0.0):
    """Pads each side by ``padding`` with ``fill`` and crops back at a random per-image offset."""
    if padding <= 0:
        return images
    n, h, w, c = images.shape
    padded = jnp.pad(
        images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=fill
    )
    offsets = jax.random.randint(rng, (n, 2), 0, 2 * padding + 1)

    def crop_one(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    return jax.vmap(crop_one)(padded, offsets)


def random_flip(rng, images, prob: float = 0.5):
    """Flips each image left-right with probability ``prob``."""
    flip = jax.random.bernoulli(rng, prob, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def _box_mask(h, w, top, left, bh, bw):
    """(N, H, W, 1) bool mask of per-image boxes [top, top+bh) x [left, left+bw)."""
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    top, left, bh, bw = (jnp.asarray(v).reshape(-1, 1, 1) for v in (top, left, bh, bw))
    inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    return inside[..., None]


def cutout(rng, images, size: int, fill: float = 0.0):
    """Cutout: one ``size`` x ``size`` square per image set to ``fill``.

    The square's centre is uniform over the image, so squares near the border are clipped
    (as in DeVries & Taylor).
    """
    if size <= 0:
        return images
    n, h, w, _ = images.shape
    ky, kx = jax.random.split(rng)
    cy = jax.random.randint(ky, (n,), 0, h)
    cx = jax.random.randint(kx, (n,), 0, w)
    mask = _box_mask(h, w, cy - size // 2, cx - size // 2, size, size)
    return jnp.where(mask, jnp.asarray(fill, images.dtype), images)


def random_erasing(
    rng,
    images,
    prob: float,
    area: tuple = (0.02, 0.4),
    aspect: tuple = (0.3, 3.3),
    attempts: int = 10,
):
    """Random Erasing: with probability ``prob`` a random rectangle gets N(0, 1) noise.

    Area fraction ~ U(area), aspect ratio log-uniform in ``aspect``; of ``attempts`` candidate
    rectangles the first that fits is used (the paper's retry loop, made static for jit); if
    none fits the image is left unchanged. Noise N(0, 1) suits normalised inputs.
    """
    if prob <= 0:
        return images
    n, h, w, c = images.shape
    k_apply, k_area, k_ratio, k_y, k_x, k_noise = jax.random.split(rng, 6)
    frac = jax.random.uniform(k_area, (n, attempts), minval=area[0], maxval=area[1])
    log_r = jax.random.uniform(
        k_ratio, (n, attempts), minval=np.log(aspect[0]), maxval=np.log(aspect[1])
    )
    ratio = jnp.exp(log_r)
    bh = jnp.round(jnp.sqrt(frac * h * w * ratio)).astype(jnp.int32)
    bw = jnp.round(jnp.sqrt(frac * h * w / ratio)).astype(jnp.int32)
    fits = (bh <= h) & (bw <= w) & (bh > 0) & (bw > 0)
    first = jnp.argmax(fits, axis=1)  # index of the first fitting attempt (0 if none fits)
    pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
    bh, bw, any_fit = pick(bh), pick(bw), jnp.any(fits, axis=1)
    top = jnp.floor(jax.random.uniform(k_y, (n,)) * (h - bh + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_x, (n,)) * (w - bw + 1)).astype(jnp.int32)
    apply = jax.random.bernoulli(k_apply, prob, (n,)) & any_fit
    mask = _box_mask(h, w, top, left, bh, bw) & apply[:, None, None, None]
    noise = jax.random.normal(k_noise, images.shape, images.dtype)
    return jnp.where(mask, noise, images)


def one_hot(labels, num_classes: int, smoothing: float = 0.0):
    """Integer labels -> float32 targets with optional label smoothing (Szegedy et al. 2016)."""
    t = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if smoothing > 0:
        t = t * (1.0 - smoothing) + smoothing / num_classes
    return t


def mixup(rng, images, targets, alpha: float):
    """MixUp with one lambda ~ Beta(alpha, alpha) per batch; partner = the reversed batch."""
    lam = jax.random.beta(rng, alpha, alpha).astype(images.dtype)
    images = lam * images + (1.0 - lam) * images[::-1]
    targets = lam * targets + (1.0 - lam) * targets[::-1]
    return images, targets


def cutmix(rng, images, targets, alpha: float):
    """CutMix: paste a box from the reversed batch; targets weighted by the exact box area.

    lambda ~ Beta(alpha, alpha) sets the box side to sqrt(1 - lambda) of the image side; the box
    centre is uniform and the box is clipped at the border, then lambda is recomputed as
    1 - (clipped box area) / (H * W).
    """
    n, h, w, _ = images.shape
    k_lam, k_y, k_x = jax.random.split(rng, 3)
    lam = jax.random.beta(k_lam, alpha, alpha)
    cut = jnp.sqrt(1.0 - lam)
    bh = jnp.floor(h * cut).astype(jnp.int32)
    bw = jnp.floor(w * cut).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, h)
    cx = jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - bh // 2, 0, h), jnp.clip(cy - bh // 2 + bh, 0, h)
    x0, x1 = jnp.clip(cx - bw // 2, 0, w), jnp.clip(cx - bw // 2 + bw, 0, w)
    mask = _box_mask(h, w, y0, x0, y1 - y0, x1 - x0)[0]  # same box for the whole batch
    images = jnp.where(mask[None], images[::-1], images)
    lam_exact = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
    targets = lam_exact * targets + (1.0 - lam_exact) * targets[::-1]
    return images, targets


def _get(cfg: Any, key: str, default):
    """Reads ``key`` from a ConfigDict / dict / object, or ``default`` when absent."""
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def augment_batch(rng, images, labels, aug_cfg, num_classes: int, label_smoothing: float = 0.0):
    """Applies the augmentations ``aug_cfg`` asks for (config.augment) to a normalised batch.

    Order: random crop (``crop_padding``) -> flip (``flip``) -> Cutout (``cutout``) ->
    Random Erasing (``random_erasing``) -> MixUp (``mixup``) / CutMix (``cutmix``). When both
    MixUp and CutMix are on, one of them is chosen per batch with probability 1/2.
    Returns (images, soft targets of shape (N, num_classes)); per-pixel labels (N, H, W) give
    targets (N, H, W, num_classes), cropped and flipped with their images.
    """
    k_crop, k_flip, k_cut, k_erase, k_mix, k_cutmix, k_choice = jax.random.split(rng, 7)
    pad = int(_get(aug_cfg, "crop_padding", 0) or 0)
    dense = labels.ndim == 3  # per-pixel labels (N, H, W): crops and flips move them too
    if dense:
        if float(_get(aug_cfg, "cutmix", 0.0) or 0.0) > 0:
            raise ValueError(
                "CutMix mixes whole-image targets; set --config.augment.cutmix=0 for per-pixel "
                "labels"
            )
        # as one more channel; the crop's zero padding is the background label
        images = jnp.concatenate([images, labels[..., None].astype(images.dtype)], axis=-1)
    images = random_crop(k_crop, images, pad)
    if _get(aug_cfg, "flip", False):
        images = random_flip(k_flip, images)
    if dense:
        images, labels = images[..., :-1], jnp.round(images[..., -1]).astype(jnp.int32)
    images = cutout(k_cut, images, int(_get(aug_cfg, "cutout", 0) or 0))
    images = random_erasing(k_erase, images, float(_get(aug_cfg, "random_erasing", 0.0) or 0.0))
    if int(_get(aug_cfg, "randaugment_layers", 0) or 0) > 0:
        _log.warning(
            "RandAugment is applied only in the TFDS input pipeline; ignored for array datasets"
        )
    targets = one_hot(labels, num_classes, label_smoothing)
    mix_alpha = float(_get(aug_cfg, "mixup", 0.0) or 0.0)
    cutmix_alpha = float(_get(aug_cfg, "cutmix", 0.0) or 0.0)
    if mix_alpha > 0 and cutmix_alpha > 0:
        mi, mt = mixup(k_mix, images, targets, mix_alpha)
        ci, ct = cutmix(k_cutmix, images, targets, cutmix_alpha)
        use_mix = jax.random.bernoulli(k_choice, 0.5)
        images = jnp.where(use_mix, mi, ci)
        targets = jnp.where(use_mix, mt, ct)
    elif mix_alpha > 0:
        images, targets = mixup(k_mix, images, targets, mix_alpha)
    elif cutmix_alpha > 0:
        images, targets = cutmix(k_cutmix, images, targets, cutmix_alpha)
    return images, targets


def epoch_permutation(rng, n: int):
    """A random permutation of ``range(n)`` (int32) for one epoch of sampling."""
    return jax.random.permutation(rng, n).astype(jnp.int32)


def take_batch(images, labels, perm, step, batch_size: int):
    """Rows ``perm[step * batch_size : (step + 1) * batch_size]`` of images and labels.

    ``step`` may be traced; callers keep ``step < len(perm) // batch_size`` (drop remainder).
    """
    idx = jax.lax.dynamic_slice_in_dim(perm, step * batch_size, batch_size)
    return jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0)


def device_dataset(dataset, sharding=None) -> dict:
    """Puts an ArrayDataset's arrays on device (replicated by ``sharding`` if given).

    Returns {'train_images', 'train_labels', 'test_images', 'test_labels'}; images stay uint8
    to save memory, so call ``normalize`` on each batch.
    """
    keys = ("train_images", "train_labels", "test_images", "test_labels")
    return {k: jax.device_put(getattr(dataset, k), sharding) for k in keys}
