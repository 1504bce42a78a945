"""Fashion-MNIST from local IDX files (Xiao, Rasul & Vollgraf, 2017, arXiv:1708.07747).

The IDX format (LeCun et al., MNIST) is a big-endian header: two zero bytes, a type code,
the number of dimensions, then one uint32 per dimension, followed by the raw data.
Files may be gzip-compressed (``*.gz``) or raw.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib

import numpy as np

from jaxcnn.data.arrays import ArrayDataset, make_array_dataset

__all__ = ["read_idx", "load_fmnist", "fmnist_dir", "FMNIST_CLASSES", "DEFAULT_FMNIST_DIR"]

DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_HOW_TO_GET = (
    "install it with `apt-get install dataset-fashion-mnist` (Debian), or set "
    "JAXCNN_FMNIST_DIR / --config.data_dir to a folder holding the four IDX files, "
    "or `pip install tensorflow-datasets` and use --config.dataset=tfds:fashion_mnist when online"
)


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise ValueError(
            f"{path}: corrupt or truncated file ({type(e).__name__}: {e}); "
            "delete it and download it again"
        ) from None


def read_idx(path: str) -> np.ndarray:
    """Parses one IDX file (optionally gzipped) into a native-endian numpy array.

    Raises ValueError naming ``path`` if the header is invalid or the data length does not
    match the dimensions in the header.
    """
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: corrupt IDX file (only {len(data)} bytes, no header)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise ValueError(
            f"{path}: not an IDX file (bad magic number {data[:4].hex()}); "
            "delete it and download it again"
        )
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, expected {header_len})")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header_len
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX file {what}: header dims {dims} need {expected} data bytes, "
            f"found {got}; delete it and download it again"
        )
    arr = np.frombuffer(data, dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def fmnist_dir(data_dir: str | None = None) -> str:
    """The Fashion-MNIST folder: ``data_dir``, else $JAXCNN_FMNIST_DIR, else the Debian default."""
    return data_dir or os.environ.get("JAXCNN_FMNIST_DIR") or DEFAULT_FMNIST_DIR


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}: {_HOW_TO_GET}"
    )


def load_fmnist(data_dir: str | None = None) -> ArrayDataset:
    """Loads Fashion-MNIST (60000 train / 10000 test, 28x28x1 uint8, 10 classes).

    Raises FileNotFoundError with instructions if the folder or a file is missing, and
    ValueError naming the file if one is corrupt.
    """
    directory = fmnist_dir(data_dir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Fashion-MNIST folder {directory} does not exist: {_HOW_TO_GET}")
    arrays = {key: read_idx(_find(directory, stem)) for key, stem in _FILES.items()}
    for key in ("train_images", "test_images"):
        if arrays[key].ndim != 3 or arrays[key].dtype != np.uint8:
            raise ValueError(
                f"{_find(directory, _FILES[key])}: expected uint8 images (N, H, W), got "
                f"{arrays[key].dtype} {arrays[key].shape}"
            )
    for key in ("train_labels", "test_labels"):
        if arrays[key].ndim != 1:
            raise ValueError(
                f"{_find(directory, _FILES[key])}: expected a 1-D label file, got shape "
                f"{arrays[key].shape}"
            )
    return make_array_dataset(
        arrays["train_images"],
        arrays["train_labels"],
        arrays["test_images"],
        arrays["test_labels"],
        num_classes=10,
        class_names=FMNIST_CLASSES,
        source=directory,
    )


# Fashion-MNIST's backgrounds are 0 and its garments' faintest pixels a few grey levels; a
# pixel at least this bright (of 255) is the garment's.
FOREGROUND_LEVEL = 32


def garment_masks(ds: ArrayDataset) -> ArrayDataset:
    """Fashion-MNIST as a segmentation task: each pixel's label is 1 + its garment's class where
    the pixel is at least ``FOREGROUND_LEVEL`` bright, 0 (background) elsewhere; labels (N, H, W).
    Telling the garments apart takes recognising them, so the task needs the backbone's features
    as well as the boundary."""

    def masks(images, labels):
        fg = images[..., 0] >= FOREGROUND_LEVEL
        return np.where(fg, labels[:, None, None] + 1, 0).astype(np.int32)

    return dataclasses.replace(
        ds,
        train_labels=masks(ds.train_images, ds.train_labels),
        test_labels=masks(ds.test_images, ds.test_labels),
        num_classes=ds.num_classes + 1,
        class_names=("background", *ds.class_names),
    )
