"""jaxcnn.data: datasets, device-side augmentation and evaluation views.

Local datasets (no TensorFlow needed) load into an :class:`ArrayDataset` (uint8 NHWC images,
int32 labels, train-set mean/std); ``tfds:NAME`` gives a :class:`TFDSDataset` whose host
pipelines yield normalised numpy batches. Importing this package never imports TensorFlow.

  load_dataset(config) -> ArrayDataset | TFDSDataset     dispatch on config.dataset:
      'fmnist'            Fashion-MNIST IDX files (config.data_dir / $JAXCNN_FMNIST_DIR /
                          /usr/share/datasets/fashion-mnist)
      'fmnist_masks'      the same images segmented: per-pixel labels (N, H, W), 0 background,
                          1 + the garment's class on its pixels (fmnist.garment_masks)
      'npz:PATH'          arrays x_train, y_train, x_test, y_test
      'folder:PATH'       PATH/<class>/<img> or PATH/{train,test}/<class>/<img>, resized to
                          config.image_size; config.on_bad_image = 'skip' | 'raise'
      'tfds:NAME'         TensorFlow Datasets (lazy import)

See ``jaxcnn.data.augment`` and ``jaxcnn.data.views`` for the jittable batch functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxcnn.data.arrays import ArrayDataset, channel_stats, make_array_dataset
from jaxcnn.data.transforms import eval_transform
from jaxcnn.data.augment import (
    augment_batch,
    cutmix,
    cutout,
    device_dataset,
    epoch_permutation,
    mixup,
    normalize,
    one_hot,
    random_crop,
    random_erasing,
    random_flip,
    resize,
    take_batch,
)
from jaxcnn.data.views import (
    EVAL_MODES,
    average_views,
    center_crop,
    eval_views,
    flip_pair,
    multiscale,
    ten_crop,
)
from jaxcnn.data.fmnist import FMNIST_CLASSES, garment_masks, load_fmnist, read_idx
from jaxcnn.data.folder import load_image_folder
from jaxcnn.data.npz import load_npz, save_npz

__all__ = [
    "ArrayDataset",
    "make_array_dataset",
    "channel_stats",
    "load_dataset",
    "load_fmnist",
    "read_idx",
    "FMNIST_CLASSES",
    "load_image_folder",
    "load_npz",
    "save_npz",
    "TFDSDataset",
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
    "eval_views",
    "center_crop",
    "flip_pair",
    "ten_crop",
    "multiscale",
    "average_views",
    "EVAL_MODES",
    "DATASET_SCHEMES",
    "select_classes",
]

DATASET_SCHEMES = ("fmnist", "fmnist_masks", "npz:PATH", "folder:PATH", "tfds:NAME")


def __getattr__(name):
    # TFDSDataset lives in a module that only imports TensorFlow when instantiated, but keep even
    # that module out of `import jaxcnn.data`.
    if name == "TFDSDataset":
        from jaxcnn.data.tfds_input import TFDSDataset

        return TFDSDataset
    raise AttributeError(f"module 'jaxcnn.data' has no attribute {name!r}")


def _get(config: Any, key: str, default=None):
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def select_classes(ds, classes, spec: str = "dataset"):
    """The examples of ``classes`` only, relabelled 0..k-1 in the order given (e.g. to pre-train
    on some classes of a dataset and transfer to the others)."""
    if not isinstance(ds, ArrayDataset):
        raise ValueError(
            f"config.classes works with in-memory datasets, not {spec}; unset --config.classes"
        )
    bad = [c for c in classes if not 0 <= int(c) < ds.num_classes]
    if bad or len(set(classes)) != len(classes):
        raise ValueError(
            f"config.classes={tuple(classes)} must be distinct labels in "
            f"[0, {ds.num_classes}) of {spec}"
        )
    lookup = np.full(ds.num_classes, -1, np.int64)
    lookup[np.asarray(classes, np.int64)] = np.arange(len(classes))

    def pick(images, labels):
        keep = lookup[labels] >= 0
        return images[keep], lookup[labels[keep]].astype(np.int32)

    train_images, train_labels = pick(ds.train_images, ds.train_labels)
    test_images, test_labels = pick(ds.test_images, ds.test_labels)
    return dataclasses.replace(
        ds,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=len(classes),
        class_names=tuple(ds.class_names[c] for c in classes),
    )


def load_dataset(config: Any, mean=None, std=None):
    """Loads ``config.dataset`` (see the module docstring for the schemes).

    ``mean``/``std`` only matter for ``tfds:`` datasets, whose host pipeline normalises (pass
    model_info(...).mean/std when config.normalization == 'model'); array datasets are
    normalised on device by the caller with :func:`normalize`.
    An unset config.num_classes (None) is set to the dataset's; a different one is a ValueError, as
    is an unknown scheme.
    """
    spec = str(_get(config, "dataset", "fmnist")).strip()
    scheme, _, arg = spec.partition(":")
    if scheme == "fmnist" and not arg:
        ds = load_fmnist(_get(config, "data_dir", "") or None)
    elif scheme == "fmnist_masks" and not arg:
        ds = garment_masks(load_fmnist(_get(config, "data_dir", "") or None))
    elif scheme == "npz" and arg:
        ds = load_npz(arg)
    elif scheme == "folder" and arg:
        ds = load_image_folder(
            arg,
            _get(config, "image_size", 224),
            test_fraction=float(_get(config, "test_fraction", 0.1)),
            seed=int(_get(config, "seed", 0)),
            on_error=_get(config, "on_bad_image", "skip"),
        )
    elif scheme == "tfds" and arg:
        from jaxcnn.data.tfds_input import TFDSDataset

        ds = TFDSDataset(
            arg,
            image_size=int(_get(config, "image_size", 224)),
            test_image_size=int(_get(config, "test_image_size", 0)) or None,
            augment=_get(config, "augment"),
            mean=mean,
            std=std,
            data_dir=_get(config, "tfds_data_dir", "") or None,
        )
    else:
        raise ValueError(f"unknown dataset {spec!r}; use one of {', '.join(DATASET_SCHEMES)}")
    classes = tuple(_get(config, "classes", ()) or ())
    if classes:
        ds = select_classes(ds, classes, spec)
    wanted = _get(config, "num_classes")
    if wanted is None and hasattr(config, "num_classes"):
        config.num_classes = ds.num_classes  # unset: the head has one output per class of the data
    elif wanted is not None and int(wanted) != ds.num_classes:
        raise ValueError(
            f"config.num_classes={wanted} but dataset {spec} has {ds.num_classes} classes; "
            f"set --config.num_classes={ds.num_classes}, or leave it unset to take the "
            f"dataset's"
        )
    return ds
