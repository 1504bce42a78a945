"""TensorFlow Datasets input pipelines (``config.dataset = 'tfds:NAME'``), one per host.

TensorFlow and tensorflow-datasets are imported lazily, only when a ``TFDSDataset`` is built,
so ``import jaxcnn.data`` never pulls them in. Each JAX process reads an even, disjoint slice
of every split (``tfds.even_splits`` indexed by ``jax.process_index()``) and produces batches
of ``global_batch_size // jax.process_count()`` examples as numpy dicts::

  train: {'image': float32 (B, H, W, C) normalised, 'label': int32 (B,)}      (endless)
  eval:  {'image': ..., 'label': ..., 'mask': bool (B,)}   (last batch padded; mask=False rows
          are padding and must be ignored; every host yields the same number of batches)

Preprocessing (host side, tf.data):
  * fixed-size datasets (every image has the same stored shape, e.g. CIFAR, MNIST): training
    uses zero-padding + random crop (config.augment.crop_padding) and flips; images are
    resized to ``image_size`` only when it differs from the stored size. Eval resizes to
    ``test_image_size`` when it differs.
  * variable-size datasets (e.g. imagenet2012): training uses the random-resized ("Inception")
    crop of Szegedy et al. 2015 (area 8–100 %, aspect 3/4–4/3) + flip; eval resizes the shorter
    side to ``test_image_size / 0.875`` and takes the central crop.
  * RandAugment (Cubuk et al. 2020, arXiv:1909.13719) when config.augment.randaugment_layers>0,
    magnitude on the paper's 0–10 scale. Implemented ops: identity, autocontrast, rotate,
    shear x/y, translate x/y, brightness, contrast, colour (saturation, RGB only; identity for
    grayscale), solarize, posterize. Equalize and sharpness are omitted (no tf.image op).
  * normalisation ``(x / 255 - mean) / std``.

Usage::

  ds = TFDSDataset('cifar10', image_size=32, augment=config.augment)
  it = ds.train_iter(global_batch_size=128, seed=0)
  for batch in ds.eval_iter(global_batch_size=1000): ...
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from typing import Any, Iterator, Sequence

import numpy as np

__all__ = ["TFDSDataset", "import_tfds", "KNOWN_STATS"]

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Widely used per-channel statistics (0–1 scale) of the training splits.
KNOWN_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagenet2012": IMAGENET_STATS,
    "imagenette": IMAGENET_STATS,
    "imagenet_v2": IMAGENET_STATS,
}
_EVAL_CROP_FRACTION = 0.875


def import_tfds():
    """Imports (tensorflow, tensorflow_datasets) or raises ImportError with the install line."""
    # Triton (which torch.compile, torchvision and timm load) crashes the process when it is
    # imported after TensorFlow; imported before it, both work. So where it is installed it goes
    # first, and a later --vs timm or weight conversion in the same process stays safe.
    if "tensorflow" not in sys.modules and importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"tfds:* datasets need TensorFlow Datasets ({e}); install them with "
            "`pip install tensorflow-cpu tensorflow-datasets`"
        ) from None
    # Keep TensorFlow off the accelerators: JAX owns them.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised; harmless
        pass
    return tf, tfds


def _cfg_get(cfg: Any, key: str, default):
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


# ----------------------------------------------------------------------------- RandAugment
def _randaugment(tf, image, layers: int, magnitude: float):
    """Applies ``layers`` uniformly chosen ops of strength ``magnitude`` (0–10) to a uint8 image."""
    frac = magnitude / 10.0
    h, w, c = image.shape
    img = tf.cast(image, tf.float32)

    def signed(v):
        return tf.where(tf.random.uniform([]) < 0.5, -v, v)

    def transform(x, a0, a1, a2, b0, b1, b2):
        # Maps output (x, y) to input (a0 x + a1 y + a2, b0 x + b1 y + b2); grey fill outside.
        t = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None]
        t = tf.cast(t, tf.float32)
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=x[None],
            transforms=t,
            output_shape=tf.constant([h, w], tf.int32),
            fill_value=128.0,
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        )
        return tf.reshape(out[0], [h, w, c])

    def rotate(x):
        theta = signed(frac * 30.0) * (math.pi / 180.0)
        cos, sin = tf.cos(theta), tf.sin(theta)
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        return transform(x, cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)

    def shear_x(x):
        s = signed(frac * 0.3)
        return transform(x, 1.0, s, -s * (h - 1) / 2.0, 0.0, 1.0, 0.0)

    def shear_y(x):
        s = signed(frac * 0.3)
        return transform(x, 1.0, 0.0, 0.0, s, 1.0, -s * (w - 1) / 2.0)

    def translate_x(x):
        return transform(x, 1.0, 0.0, signed(frac * 0.3 * w), 0.0, 1.0, 0.0)

    def translate_y(x):
        return transform(x, 1.0, 0.0, 0.0, 0.0, 1.0, signed(frac * 0.3 * h))

    def blend(a, b, factor):  # factor 1 -> a, 0 -> b
        return b + factor * (a - b)

    def brightness(x):
        return blend(x, tf.zeros_like(x), 1.0 + signed(frac * 0.9))

    def contrast(x):
        mean = tf.reduce_mean(tf.image.rgb_to_grayscale(x) if c == 3 else x)
        return blend(x, tf.fill(tf.shape(x), mean), 1.0 + signed(frac * 0.9))

    def color(x):
        if c != 3:
            return x
        grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x))
        return blend(x, grey, 1.0 + signed(frac * 0.9))

    def solarize(x):
        threshold = 256.0 - frac * 256.0
        return tf.where(x >= threshold, 255.0 - x, x)

    def posterize(x):
        shift = int(round(frac * 4))
        q = tf.cast(tf.cast(x, tf.uint8), tf.int32)
        return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(q, shift), shift), tf.float32)

    def autocontrast(x):
        lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
        hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
        scaled = (x - lo) * 255.0 / tf.maximum(hi - lo, 1.0)
        return tf.where(hi > lo, scaled, x)

    ops = [
        lambda x: x,
        autocontrast,
        rotate,
        shear_x,
        shear_y,
        translate_x,
        translate_y,
        brightness,
        contrast,
        color,
        solarize,
        posterize,
    ]
    for _ in range(layers):
        idx = tf.random.uniform([], 0, len(ops), dtype=tf.int32)
        branches = [lambda op=op: tf.clip_by_value(op(img), 0.0, 255.0) for op in ops]
        img = tf.switch_case(idx, branches)
        img = tf.reshape(img, [h, w, c])
    return tf.cast(tf.round(img), tf.uint8)


# ----------------------------------------------------------------------------- dataset
class TFDSDataset:
    """A TFDS dataset read per host; see the module docstring for preprocessing.

    Args:
      name: TFDS name, optionally with a config/version ('cifar10', 'imagenet2012:5.1.0').
      image_size / test_image_size: training / evaluation resolution (int).
      augment: config.augment (crop_padding, flip, randaugment_layers, randaugment_magnitude).
      mean, std: per-channel normalisation (0–1 scale); default KNOWN_STATS or an estimate
        from the first 1000 training images.
      data_dir: TFDS data folder (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
      train_split / test_split: split names; test defaults to 'test', else 'validation'.
      process_index / process_count: host slice (default jax.process_index()/process_count()).
    """

    def __init__(
        self,
        name: str,
        *,
        image_size: int,
        test_image_size: int | None = None,
        augment: Any = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        data_dir: str | None = None,
        train_split: str = "train",
        test_split: str | None = None,
        shuffle_buffer: int = 10_000,
        image_key: str = "image",
        label_key: str = "label",
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        tf, tfds = import_tfds()
        self._tf, self._tfds = tf, tfds
        self.name = name
        self.image_size = int(image_size)
        self.test_image_size = int(test_image_size or image_size)
        self.augment = augment
        self.shuffle_buffer = shuffle_buffer
        self.image_key, self.label_key = image_key, label_key
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        self.process_index, self.process_count = int(process_index), int(process_count)

        try:
            self.builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # DatasetNotFoundError and friends
            raise ValueError(
                f"unknown TFDS dataset {name!r} ({type(e).__name__}); see "
                "https://www.tensorflow.org/datasets/catalog for valid names"
            ) from None
        self._prepare()
        features = self.builder.info.features
        if image_key not in features or label_key not in features:
            raise ValueError(
                f"TFDS dataset {name} has features {list(features)}; expected "
                f"{image_key!r} and {label_key!r} (pass image_key/label_key)"
            )
        self.stored_shape = tuple(features[image_key].shape)
        self.channels = int(self.stored_shape[-1] or 3)
        self.fixed_size = all(d is not None for d in self.stored_shape)
        self.num_classes = int(features[label_key].num_classes)
        self.class_names = tuple(features[label_key].names)

        splits = self.builder.info.splits
        self.train_split = train_split
        if test_split is None:
            test_split = (
                "validation" if ("test" not in splits and "validation" in splits) else "test"
            )
        self.test_split = test_split
        self.num_train = self._global_count(train_split)
        self.num_test = self._global_count(test_split)

        if mean is None or std is None:
            mean, std = KNOWN_STATS.get(name.split(":")[0].split("/")[0], (None, None))
            if mean is None or len(mean) != self.channels:
                mean, std = self._estimate_stats()
        if len(mean) not in (1, self.channels) or len(std) != len(mean):
            raise ValueError(
                f"mean/std need 1 or {self.channels} entries for {name}, got {len(mean)}/{len(std)}"
            )
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    # -- preparation / sizes
    def _prepare(self):
        b = self.builder
        is_prepared = b.is_prepared() if hasattr(b, "is_prepared") else os.path.isdir(b.data_dir)
        if is_prepared:
            return
        if getattr(b, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
            raise FileNotFoundError(
                f"TFDS dataset {self.name} is not prepared and needs a manual download: put its archives in "
                "~/tensorflow_datasets/downloads/manual (or $TFDS_DATA_DIR/downloads/manual) and run "
                f"`tfds build {self.name}`"
            )
        try:
            b.download_and_prepare()
        except Exception as e:
            raise FileNotFoundError(
                f"TFDS dataset {self.name} is not prepared and could not be downloaded ({type(e).__name__}); "
                f"run `tfds build {self.name}` on a machine with internet access and copy "
                f"~/tensorflow_datasets/{self.name} here (or set TFDS_DATA_DIR)"
            ) from None

    def _host_split(self, split: str, drop_remainder: bool):
        return self._tfds.even_splits(split, n=self.process_count, drop_remainder=drop_remainder)[
            self.process_index
        ]

    def _global_count(self, split: str) -> int:
        splits = self.builder.info.splits
        if split in splits:
            return int(splits[split].num_examples)
        # Split sizes are unknown (e.g. under tfds.testing.mock_data): count what this host sees.
        card = int(self.builder.as_dataset(split=split).cardinality().numpy())
        if card < 0:
            raise ValueError(f"cannot determine the size of split {split!r} of {self.name}")
        return card

    def host_num_examples(self, split: str, drop_remainder: bool = False) -> int:
        """Number of examples of ``split`` read by this host."""
        ds = self.builder.as_dataset(split=self._host_split(split, drop_remainder))
        card = int(ds.cardinality().numpy())
        return card if card >= 0 else sum(1 for _ in ds)

    def per_host_batch(self, global_batch_size: int) -> int:
        if global_batch_size % self.process_count:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by the "
                f"{self.process_count} processes; pick a multiple of {self.process_count}"
            )
        return global_batch_size // self.process_count

    def steps_per_epoch(self, global_batch_size: int) -> int:
        """Training steps per epoch (remainder dropped)."""
        return max(1, self.num_train // global_batch_size)

    def eval_steps(self, global_batch_size: int) -> int:
        """Eval batches every host yields (the largest host slice, rounded up)."""
        per_host = self.per_host_batch(global_batch_size)
        return math.ceil(math.ceil(self.num_test / self.process_count) / per_host)

    def _estimate_stats(self, n: int = 1000):
        tf = self._tf
        ds = self.builder.as_dataset(split=self.train_split).take(n)
        ds = ds.map(
            lambda ex: self._eval_image(ex[self.image_key]), num_parallel_calls=tf.data.AUTOTUNE
        )
        imgs = np.concatenate(
            [b.reshape(-1, b.shape[-1]) for b in ds.batch(256).as_numpy_iterator()]
        )
        mean = imgs.mean(0) / 255.0
        std = np.maximum(imgs.std(0) / 255.0, 1e-3)
        return tuple(mean.tolist()), tuple(std.tolist())

    # -- preprocessing (tf graph functions)
    def _normalize(self, image):
        tf = self._tf
        mean = tf.constant(self.mean, tf.float32)
        std = tf.constant(self.std, tf.float32)
        return (tf.cast(image, tf.float32) / 255.0 - mean) / std

    def _train_image(self, image):
        tf = self._tf
        size, c = self.image_size, self.channels
        pad = int(_cfg_get(self.augment, "crop_padding", 0))
        if self.fixed_size:
            h, w = self.stored_shape[:2]
            if pad > 0:
                image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
                image = tf.image.random_crop(image, [h, w, c])
            if (h, w) != (size, size):
                image = tf.image.resize(image, [size, size], antialias=True)
        else:
            begin, crop, _ = tf.image.sample_distorted_bounding_box(
                tf.shape(image),
                bounding_boxes=tf.zeros([1, 0, 4]),
                min_object_covered=0.0,
                aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=(0.08, 1.0),
                max_attempts=10,
                use_image_if_no_bounding_boxes=True,
            )
            image = tf.slice(image, begin, crop)
            image = tf.image.resize(image, [size, size], antialias=True)
        image = tf.reshape(image, [size, size, c])
        if _cfg_get(self.augment, "flip", False):
            image = tf.image.random_flip_left_right(image)
        layers = int(_cfg_get(self.augment, "randaugment_layers", 0))
        if layers > 0:
            magnitude = float(_cfg_get(self.augment, "randaugment_magnitude", 9))
            if not 0 <= magnitude <= 10:
                raise ValueError(f"randaugment_magnitude is on a 0–10 scale, got {magnitude}")
            image = tf.saturate_cast(tf.round(tf.cast(image, tf.float32)), tf.uint8)
            image = _randaugment(tf, image, layers, magnitude)
        return self._normalize(image)

    def _eval_image(self, image):
        """Resized (fixed-size data) or resize + central crop (variable-size data), 0..255 float."""
        tf = self._tf
        size, c = self.test_image_size, self.channels
        if self.fixed_size:
            if tuple(self.stored_shape[:2]) != (size, size):
                image = tf.image.resize(image, [size, size], antialias=True)
        else:
            shape = tf.cast(tf.shape(image)[:2], tf.float32)
            scale = (size / _EVAL_CROP_FRACTION) / tf.reduce_min(shape)
            new = tf.cast(tf.round(shape * scale), tf.int32)
            image = tf.image.resize(image, new, antialias=True)
            top, left = (new[0] - size) // 2, (new[1] - size) // 2
            image = image[top : top + size, left : left + size]
        return tf.reshape(tf.cast(image, tf.float32), [size, size, c])

    # -- iterators
    def train_dataset(self, global_batch_size: int, seed: int = 0):
        """The endless tf.data pipeline of this host's training slice."""
        tf, tfds = self._tf, self._tfds
        per_host = self.per_host_batch(global_batch_size)
        seed = int(seed) + 1000 * self.process_index  # different augmentation stream per host
        ds = self.builder.as_dataset(
            split=self._host_split(self.train_split, drop_remainder=True),
            shuffle_files=True,
            read_config=tfds.ReadConfig(shuffle_seed=seed),
        )
        ds = ds.repeat().shuffle(self.shuffle_buffer, seed=seed)
        ds = ds.map(
            lambda ex: {
                "image": self._train_image(ex[self.image_key]),
                "label": tf.cast(ex[self.label_key], tf.int32),
            },
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        return ds.batch(per_host, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def train_iter(self, global_batch_size: int, seed: int = 0) -> Iterator[dict]:
        """Endless iterator of {'image': float32 NHWC, 'label': int32} numpy batches."""
        return self.train_dataset(global_batch_size, seed).as_numpy_iterator()

    def eval_iter(self, global_batch_size: int, split: str | None = None) -> Iterator[dict]:
        """One pass over this host's slice of the test split, padded to full batches with 'mask'."""
        tf = self._tf
        split = split or self.test_split
        per_host = self.per_host_batch(global_batch_size)
        steps = self.eval_steps(global_batch_size) if split == self.test_split else None
        ds = self.builder.as_dataset(
            split=self._host_split(split, drop_remainder=False), shuffle_files=False
        )
        ds = ds.map(
            lambda ex: {
                "image": self._normalize(self._eval_image(ex[self.image_key])),
                "label": tf.cast(ex[self.label_key], tf.int32),
            },
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        ds = ds.batch(per_host).prefetch(tf.data.AUTOTUNE)
        shape = (per_host, self.test_image_size, self.test_image_size, self.channels)
        done = 0
        for batch in ds.as_numpy_iterator():
            n = batch["label"].shape[0]
            image = np.zeros(shape, np.float32)
            label = np.zeros((per_host,), np.int32)
            image[:n], label[:n] = batch["image"], batch["label"]
            yield {"image": image, "label": label, "mask": np.arange(per_host) < n}
            done += 1
        # Hosts with fewer examples emit empty batches so that every host runs the same steps.
        while steps is not None and done < steps:
            yield {
                "image": np.zeros(shape, np.float32),
                "label": np.zeros((per_host,), np.int32),
                "mask": np.zeros((per_host,), bool),
            }
            done += 1
