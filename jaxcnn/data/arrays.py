"""In-memory datasets: the :class:`ArrayDataset` container shared by all local loaders.

All local loaders (Fashion-MNIST IDX files, image folders, ``.npz`` files) return an
``ArrayDataset`` whose images are ``uint8`` NHWC and labels ``int32``; the per-channel
``mean``/``std`` (0–1 scale) are computed from the *training* split only so that test
statistics never leak into preprocessing.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

__all__ = ["ArrayDataset", "make_array_dataset", "channel_stats"]


@dataclasses.dataclass
class ArrayDataset:
    """A small dataset held in host memory.

    Attributes:
      train_images: uint8 array (N, H, W, C).
      train_labels: int32 array (N,).
      test_images: uint8 array (M, H, W, C).
      test_labels: int32 array (M,).
      num_classes: number of classes (labels lie in ``[0, num_classes)``).
      class_names: tuple of ``num_classes`` names.
      mean, std: per-channel statistics of the train images on a 0–1 scale.
      skipped: number of input files that could not be read and were skipped.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    class_names: tuple
    mean: tuple
    std: tuple
    skipped: int = 0

    @property
    def image_shape(self) -> tuple:
        """(H, W, C) of the stored images."""
        return tuple(self.train_images.shape[1:])

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_images.shape[0])


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 NHWC images on a 0–1 scale.

    Accumulated in float64 chunks so that large datasets never need a full float copy.
    """
    c = images.shape[-1]
    total = np.zeros(c, np.float64)
    total_sq = np.zeros(c, np.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].reshape(-1, c).astype(np.float64) / 255.0
        total += block.sum(0)
        total_sq += np.square(block).sum(0)
        count += block.shape[0]
    if count == 0:
        raise ValueError("cannot compute dataset statistics: the training set is empty")
    mean = total / count
    # Clamp tiny negative variances caused by rounding; a floor avoids division by 0 for constant images.
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.maximum(std, 1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _check_images(name: str, images: np.ndarray, source: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:  # grayscale without a channel axis
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{source}: {name} must have shape (N, H, W) or (N, H, W, C) with C in {{1, 3}}, "
            f"got {images.shape}"
        )
    if images.dtype != np.uint8:
        if (
            np.issubdtype(images.dtype, np.integer)
            and images.size
            and (images.min() < 0 or images.max() > 255)
        ):
            raise ValueError(
                f"{source}: {name} has integer values outside 0..255; store uint8 pixels"
            )
        if not np.issubdtype(images.dtype, np.integer):
            raise ValueError(
                f"{source}: {name} has dtype {images.dtype}; store uint8 pixels in 0..255 "
                "(e.g. (x * 255).round().astype(np.uint8))"
            )
        images = images.astype(np.uint8)
    return images


def _check_labels(name: str, labels: np.ndarray, n: int, source: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(
            f"{source}: {name} must have shape ({n},) to match the images, got {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{source}: {name} must be integer class indices, got dtype {labels.dtype}"
        )
    if labels.size and labels.min() < 0:
        raise ValueError(f"{source}: {name} contains negative class indices")
    return labels.astype(np.int32)


def make_array_dataset(
    train_images,
    train_labels,
    test_images,
    test_labels,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    skipped: int = 0,
    source: str = "dataset",
) -> ArrayDataset:
    """Validates arrays and builds an :class:`ArrayDataset` with train-set statistics.

    ``num_classes`` defaults to ``len(class_names)`` or ``max(label) + 1``.
    Raises ValueError (one line, prefixed with ``source``) on inconsistent inputs.
    """
    train_images = _check_images("train images", train_images, source)
    test_images = _check_images("test images", test_images, source)
    train_labels = _check_labels("train labels", train_labels, train_images.shape[0], source)
    test_labels = _check_labels("test labels", test_labels, test_images.shape[0], source)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(
            f"{source}: train images {train_images.shape[1:]} and test images "
            f"{test_images.shape[1:]} must share (H, W, C)"
        )
    max_label = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1)))
    if num_classes is None:
        num_classes = len(class_names) if class_names else max_label + 1
    if max_label >= num_classes:
        raise ValueError(f"{source}: label {max_label} found but num_classes is {num_classes}")
    if class_names is None:
        class_names = tuple(str(i) for i in range(num_classes))
    class_names = tuple(str(c) for c in class_names)
    if len(class_names) != num_classes:
        raise ValueError(
            f"{source}: {len(class_names)} class names given for {num_classes} classes"
        )
    mean, std = channel_stats(train_images)
    return ArrayDataset(
        train_images=np.ascontiguousarray(train_images),
        train_labels=train_labels,
        test_images=np.ascontiguousarray(test_images),
        test_labels=test_labels,
        num_classes=int(num_classes),
        class_names=class_names,
        mean=mean,
        std=std,
        skipped=int(skipped),
    )
