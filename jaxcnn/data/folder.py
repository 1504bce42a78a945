"""Image-folder datasets: ``root/<class_name>/<image>`` (JPEG/PNG, decoded with Pillow).

Layout: either ``root/train/<class>/...`` and ``root/test/<class>/...``, or just
``root/<class>/...`` in which case a deterministic, per-class stratified fraction is held
out as the test split. Class names are the sorted sub-folder names (of ``train/`` when
split folders exist). Every image is converted to RGB and resized to ``image_size``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os

import numpy as np

from jaxcnn.data.arrays import ArrayDataset, make_array_dataset

__all__ = ["load_image_folder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_log = logging.getLogger(__name__)


def _class_dirs(root: str) -> list[str]:
    return sorted(
        d
        for d in os.listdir(root)
        if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
    )


def _list_files(class_dir: str) -> list[str]:
    return sorted(
        os.path.join(class_dir, f)
        for f in os.listdir(class_dir)
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
    )


def _decode(path: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image  # Pillow is only needed for folder datasets.

    with Image.open(path) as img:
        img = img.convert("RGB")  # also forces a full decode, so truncated files fail here
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def _load_files(items, size, on_error):
    """Decodes (path, label) pairs; returns images, labels and the list of unreadable paths."""

    def work(item):
        try:
            return _decode(item[0], size), None
        except Exception as e:  # Pillow raises several types (OSError, SyntaxError, ValueError...)
            if on_error == "raise":
                raise ValueError(
                    f"{item[0]}: cannot read image ({type(e).__name__}: {e}); remove the file or "
                    "set --config.on_bad_image=skip"
                ) from None
            return None, item[0]

    # Pillow releases the GIL while decoding, so threads give a real speed-up.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(work, items))
    images, labels, bad = [], [], []
    for (img, failed), (_, label) in zip(results, items):
        if failed is not None:
            bad.append(failed)
        else:
            images.append(img)
            labels.append(label)
    images = np.stack(images) if images else np.zeros((0, size[0], size[1], 3), np.uint8)
    return images, np.asarray(labels, np.int32), bad


def load_image_folder(
    root: str, image_size, *, test_fraction: float = 0.1, seed: int = 0, on_error: str = "skip"
) -> ArrayDataset:
    """Loads an image-folder dataset into memory.

    Args:
      root: dataset folder (see module docstring for the layout).
      image_size: int or (H, W) every image is resized to.
      test_fraction: held-out fraction per class when there are no train/test folders.
      seed: seed of the deterministic held-out selection.
      on_error: 'skip' (count unreadable files in ``ArrayDataset.skipped`` and log a warning)
        or 'raise' (ValueError naming the first unreadable file).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    size = (
        (int(image_size), int(image_size))
        if np.isscalar(image_size)
        else tuple(int(s) for s in image_size)
    )
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"image folder {root} does not exist; expected {root}/<class_name>/<image>.jpg"
        )

    split_dirs = os.path.isdir(os.path.join(root, "train")) and os.path.isdir(
        os.path.join(root, "test")
    )
    base = os.path.join(root, "train") if split_dirs else root
    classes = _class_dirs(base)
    if not classes:
        raise ValueError(
            f"{base} has no class sub-folders; expected {base}/<class_name>/<image>.jpg"
        )
    index = {c: i for i, c in enumerate(classes)}

    if split_dirs:
        extra = sorted(set(_class_dirs(os.path.join(root, "test"))) - set(classes))
        if extra:
            raise ValueError(f"{root}/test has classes {extra} missing from {root}/train")
        train_items = [(f, index[c]) for c in classes for f in _list_files(os.path.join(base, c))]
        test_items = [
            (f, index[c])
            for c in _class_dirs(os.path.join(root, "test"))
            for f in _list_files(os.path.join(root, "test", c))
        ]
    else:
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        rng = np.random.default_rng(seed)
        train_items, test_items = [], []
        for c in classes:
            files = _list_files(os.path.join(base, c))
            # Stratified: every class contributes the same fraction to the held-out split.
            order = rng.permutation(len(files))
            n_test = int(round(test_fraction * len(files)))
            test_items += [(files[i], index[c]) for i in sorted(order[:n_test])]
            train_items += [(files[i], index[c]) for i in sorted(order[n_test:])]
    if not train_items:
        raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images found under {base}")

    train_x, train_y, bad_train = _load_files(train_items, size, on_error)
    test_x, test_y, bad_test = _load_files(test_items, size, on_error)
    bad = bad_train + bad_test
    if bad:
        _log.warning("skipped %d unreadable image(s) under %s, e.g. %s", len(bad), root, bad[0])
    return make_array_dataset(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes=len(classes),
        class_names=classes,
        skipped=len(bad),
        source=root,
    )
