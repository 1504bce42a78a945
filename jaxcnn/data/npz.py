"""Datasets stored as a NumPy ``.npz`` archive.

Required keys: ``x_train, y_train, x_test, y_test`` (the Keras naming); the aliases
``train_images, train_labels, test_images, test_labels`` are accepted as well.
Images: uint8 (or integer 0..255) of shape (N, H, W) or (N, H, W, C), C in {1, 3}.
Labels: integer class indices of shape (N,). Optional key ``class_names`` (1-D strings).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from jaxcnn.data.arrays import ArrayDataset, make_array_dataset

__all__ = ["load_npz", "save_npz"]

_KEYS = ("x_train", "y_train", "x_test", "y_test")
_ALIASES = ("train_images", "train_labels", "test_images", "test_labels")


def load_npz(path: str, num_classes: int | None = None) -> ArrayDataset:
    """Loads and validates an ``.npz`` dataset (see module docstring for the keys)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"npz file {path} does not exist; create it with "
            "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            for names in (_KEYS, _ALIASES):
                if set(names) <= files:
                    arrays = [z[k] for k in names]
                    break
            else:
                raise ValueError(
                    f"{path}: expected keys {', '.join(_KEYS)} (or {', '.join(_ALIASES)}), "
                    f"found {', '.join(sorted(files)) or 'none'}"
                )
            class_names = (
                tuple(str(s) for s in z["class_names"]) if "class_names" in files else None
            )
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None
    return make_array_dataset(
        *arrays, num_classes=num_classes, class_names=class_names, source=path
    )


def save_npz(path: str, dataset: ArrayDataset) -> None:
    """Writes an :class:`ArrayDataset` in the format :func:`load_npz` reads."""
    np.savez(
        path,
        x_train=dataset.train_images,
        y_train=dataset.train_labels,
        x_test=dataset.test_images,
        y_test=dataset.test_labels,
        class_names=np.asarray(dataset.class_names),
    )
