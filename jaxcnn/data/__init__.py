"""jaxcnn.data: datasets, device-side augmentation and evaluation views.

Local datasets (no TensorFlow needed) load into an :class:`ArrayDataset` (uint8 NHWC images,
int32 labels, train-set mean/std); ``tfds:NAME`` gives a :class:`TFDSDataset` whose host
pipelines yield normalised numpy batches. Importing this package never imports TensorFlow.

  load_dataset(config) -> ArrayDataset | TFDSDataset     dispatch on config.dataset:
      'fmnist'            Fashion-MNIST IDX files (config.data_dir / $JAXCNN_FMNIST_DIR /
                          /usr/share/datasets/fashion-mnist)
      'npz:PATH'          arrays x_train, y_train, x_test, y_test
      'folder:PATH'       PATH/<class>/<img> or PATH/{train,test}/<class>/<img>, resized to
                          config.image_size; config.on_bad_image = 'skip' | 'raise'
      'tfds:NAME'         TensorFlow Datasets (lazy import)

See ``jaxcnn.data.augment`` and ``jaxcnn.data.views`` for the jittable batch functions.
"""
from __future__ import annotations

from typing import Any

from jaxcnn.data.arrays import ArrayDataset, channel_stats, make_array_dataset
from jaxcnn.data.augment import (augment_batch, cutmix, cutout, device_dataset, epoch_permutation,
                                 mixup, normalize, one_hot, random_crop, random_erasing,
                                 random_flip, resize, take_batch)
from jaxcnn.data.views import (EVAL_MODES, average_views, center_crop, eval_views, flip_pair,
                                    multiscale, ten_crop)
from jaxcnn.data.fmnist import FMNIST_CLASSES, load_fmnist, read_idx
from jaxcnn.data.folder import load_image_folder
from jaxcnn.data.npz import load_npz, save_npz

__all__ = [
    "ArrayDataset", "make_array_dataset", "channel_stats", "load_dataset", "load_fmnist",
    "read_idx", "FMNIST_CLASSES", "load_image_folder", "load_npz", "save_npz", "TFDSDataset",
    "normalize", "resize", "random_crop", "random_flip", "cutout", "random_erasing", "one_hot",
    "mixup", "cutmix", "augment_batch", "epoch_permutation", "take_batch", "device_dataset",
    "eval_views", "center_crop", "flip_pair", "ten_crop", "multiscale", "average_views", "EVAL_MODES",
    "DATASET_SCHEMES",
]

DATASET_SCHEMES = ("fmnist", "npz:PATH", "folder:PATH", "tfds:NAME")


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


def load_dataset(config: Any, mean=None, std=None):
  """Loads ``config.dataset`` (see the module docstring for the schemes).

  ``mean``/``std`` only matter for ``tfds:`` datasets, whose host pipeline normalises (pass
  model_info(...).mean/std when config.normalization == 'model'); array datasets are
  normalised on device by the caller with :func:`normalize`.
  Raises ValueError for an unknown scheme or a config.num_classes smaller than the data needs.
  """
  spec = str(_get(config, "dataset", "fmnist")).strip()
  scheme, _, arg = spec.partition(":")
  if scheme == "fmnist" and not arg:
    ds = load_fmnist(_get(config, "data_dir", "") or None)
  elif scheme == "npz" and arg:
    ds = load_npz(arg)
  elif scheme == "folder" and arg:
    ds = load_image_folder(arg, _get(config, "image_size", 224),
                           test_fraction=float(_get(config, "test_fraction", 0.1)),
                           seed=int(_get(config, "seed", 0)),
                           on_error=_get(config, "on_bad_image", "skip"))
  elif scheme == "tfds" and arg:
    from jaxcnn.data.tfds_input import TFDSDataset
    ds = TFDSDataset(arg, image_size=int(_get(config, "image_size", 224)),
                     test_image_size=int(_get(config, "test_image_size", 0)) or None,
                     augment=_get(config, "augment"), mean=mean, std=std,
                     data_dir=_get(config, "tfds_data_dir", "") or None)
  else:
    raise ValueError(f"unknown dataset {spec!r}; use one of {', '.join(DATASET_SCHEMES)}")
  wanted = _get(config, "num_classes")
  if wanted is not None and int(wanted) < ds.num_classes:
    raise ValueError(f"config.num_classes={wanted} but dataset {spec} has {ds.num_classes} classes; "
                     f"set --config.num_classes={ds.num_classes}")
  return ds
