"""Tests of jaxcnn.data: local loaders, device augmentation, eval views and TFDS pipelines."""

import gzip
import importlib.util
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import data
from jaxcnn.data import augment as aug
from jaxcnn.data import views as ev
from helpers import tfds_or_skip

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------- helpers
def write_idx(path, array, type_code=0x08, dtype=">u1", compress=False, truncate=0):
    """Writes an IDX file byte by byte, independently of the reader under test."""
    array = np.asarray(array)
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    payload = header + array.astype(dtype).tobytes()
    if truncate:
        payload = payload[:-truncate]
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)


def write_tiny_fmnist(directory, n_train=12, n_test=4, compress=True):
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        write_idx(
            os.path.join(directory, f"{split}-images-idx3-ubyte{suffix}"), x, compress=compress
        )
        write_idx(
            os.path.join(directory, f"{split}-labels-idx1-ubyte{suffix}"), y, compress=compress
        )
        arrays[split] = (x, y)
    return arrays


# ----------------------------------------------------------------------------- IDX / Fashion-MNIST
def test_import_does_not_pull_tensorflow_or_torch():
    code = "import sys, jaxcnn.data; print('tensorflow' in sys.modules or 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.stdout.strip() == "False"


def test_read_idx_hand_written(tmp_path):
    # uint8, 3-D: header 00 00 08 03 | 2 3 2 | 12 data bytes
    raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 2]) + bytes(range(12))
    (tmp_path / "a-idx3-ubyte").write_bytes(raw)
    np.testing.assert_array_equal(
        data.read_idx(str(tmp_path / "a-idx3-ubyte")),
        np.arange(12, dtype=np.uint8).reshape(2, 3, 2),
    )
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(raw)
    assert data.read_idx(str(tmp_path / "a.gz")).shape == (2, 3, 2)
    # int32 big-endian, 1-D: 1, -2, 70000
    raw32 = bytes([0, 0, 0x0C, 1, 0, 0, 0, 3]) + bytes.fromhex("00000001fffffffe00011170")
    (tmp_path / "b").write_bytes(raw32)
    got = data.read_idx(str(tmp_path / "b"))
    assert got.dtype == np.int32 and got.tolist() == [1, -2, 70000]


def test_read_idx_corrupt_files(tmp_path):
    truncated = tmp_path / "trunc-idx3-ubyte"
    write_idx(truncated, np.zeros((2, 3, 3), np.uint8), truncate=5)
    with pytest.raises(ValueError, match="trunc-idx3-ubyte.*truncated"):
        data.read_idx(str(truncated))
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic.*not an IDX"):
        data.read_idx(str(bad_magic))
    bad_gz = tmp_path / "broken.gz"
    bad_gz.write_bytes(b"this is not gzip data at all")
    with pytest.raises(ValueError, match="broken.gz.*corrupt") as e:
        data.read_idx(str(bad_gz))
    assert "\n" not in str(e.value)
    # A gzip stream cut short in the middle.
    good = tmp_path / "good.gz"
    write_idx(good, np.arange(4000, dtype=np.uint8).reshape(40, 100) % 251, compress=True)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(ValueError, match="cut.gz"):
        data.read_idx(str(cut))


def test_missing_fmnist_dir_message(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXCNN_FMNIST_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        data.load_fmnist(str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "\n" not in msg
    for part in (
        "nowhere",
        "apt-get install dataset-fashion-mnist",
        "JAXCNN_FMNIST_DIR",
        "--config.data_dir",
        "pip install tensorflow-datasets",
        "tfds:fashion_mnist",
    ):
        assert part in msg
    # A folder that exists but lacks a file names the file.
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_fmnist(str(tmp_path / "empty"))


def test_tiny_fmnist_via_env_and_dispatcher(tmp_path, monkeypatch):
    arrays = write_tiny_fmnist(str(tmp_path / "fm"), compress=False)
    monkeypatch.setenv("JAXCNN_FMNIST_DIR", str(tmp_path / "fm"))
    ds = data.load_dataset({"dataset": "fmnist", "data_dir": ""})
    x, y = arrays["train"]
    np.testing.assert_array_equal(ds.train_images[..., 0], x)
    np.testing.assert_array_equal(ds.train_labels, y.astype(np.int32))
    np.testing.assert_array_equal(ds.test_images[..., 0], arrays["t10k"][0])
    assert ds.train_labels.dtype == np.int32 and ds.train_images.dtype == np.uint8
    assert ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top"
    np.testing.assert_allclose(ds.mean, [x.mean() / 255], rtol=1e-6)
    np.testing.assert_allclose(ds.std, [x.std() / 255], rtol=1e-6)
    with pytest.raises(ValueError, match="num_classes=5"):
        data.load_dataset({"dataset": "fmnist", "num_classes": 5})


@pytest.mark.skipif(
    not os.path.isdir(FMNIST_DIR),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("JAXCNN_FMNIST_DIR", raising=False)
    ds = data.load_fmnist()
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (
        10000,
        28,
        28,
        1,
    )
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
    # Published Fashion-MNIST train statistics.
    assert abs(ds.mean[0] - 0.2860) < 1e-3 and abs(ds.std[0] - 0.3530) < 1e-3


def test_unknown_scheme_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        data.load_dataset({"dataset": "cifar:/x"})
    for scheme in ("fmnist", "npz:PATH", "folder:PATH", "tfds:NAME"):
        assert scheme in str(e.value)


# ----------------------------------------------------------------------------- image folders
COLORS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "emu": (0, 255, 0)}


def make_folder(root, per_class=5, corrupt=True, split_dirs=False):
    from PIL import Image

    for split in ("train", "test") if split_dirs else ("",):
        for name, color in COLORS.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.new(
                    "RGB" if i % 2 else "L", (10, 8), color if i % 2 else sum(color) // 3
                )
                img.save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
    if corrupt:
        (root / ("train" if split_dirs else "") / "dog" / "broken.jpg").write_bytes(
            b"\xff\xd8\xff garbage"
        )
    return root


def test_image_folder_skips_and_counts_corrupt(tmp_path, caplog):
    root = make_folder(tmp_path / "imgs")
    with caplog.at_level("WARNING"):
        ds = data.load_dataset(
            {"dataset": f"folder:{root}", "image_size": 6, "on_bad_image": "skip"}
        )
    assert ds.skipped == 1 and "skipped 1 unreadable" in caplog.text
    assert ds.class_names == ("cat", "dog", "emu") and ds.num_classes == 3
    assert ds.num_train + ds.num_test == 15
    assert ds.train_images.shape[1:] == (6, 6, 3) and ds.train_images.dtype == np.uint8
    # Held-out split is stratified: round(0.1 * 5) = 0 or 1 per class, never the corrupt file alone.
    assert set(np.unique(ds.train_labels)) == {0, 1, 2}
    # Every pixel has the colour of its class (PNG exact; grey JPEGs become equal-channel RGB).
    for img, label in zip(ds.train_images, ds.train_labels):
        color = np.array(COLORS[ds.class_names[label]])
        assert np.all(img == img[0, 0])
        px = img[0, 0].astype(int)
        assert np.array_equal(px, color) or (np.ptp(px) == 0 and abs(px[0] - color.sum() // 3) <= 2)
    again = data.load_image_folder(str(root), 6)
    np.testing.assert_array_equal(again.train_labels, ds.train_labels)
    np.testing.assert_array_equal(again.test_images, ds.test_images)
    with pytest.raises(ValueError, match="broken.jpg"):
        data.load_image_folder(str(root), 6, on_error="raise")


def test_image_folder_train_test_dirs(tmp_path):
    root = make_folder(tmp_path / "split", per_class=2, corrupt=False, split_dirs=True)
    ds = data.load_image_folder(str(root), (4, 5), test_fraction=0.5)
    assert ds.num_train == 6 and ds.num_test == 6 and ds.skipped == 0
    assert ds.test_images.shape == (6, 4, 5, 3)
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [2, 2, 2])


# ----------------------------------------------------------------------------- npz
def test_npz_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    xtr = rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    ytr = np.array([0, 1, 2, 3, 0, 1, 2])
    xte = rng.integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    yte = np.array([3, 2, 1])
    np.savez(tmp_path / "d.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    ds = data.load_dataset({"dataset": f"npz:{tmp_path / 'd.npz'}"})
    np.testing.assert_array_equal(ds.train_images, xtr)
    np.testing.assert_array_equal(ds.test_labels, yte)
    assert ds.num_classes == 4 and ds.train_labels.dtype == np.int32
    np.testing.assert_allclose(ds.mean, (xtr / 255.0).mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(ds.std, (xtr / 255.0).std(axis=(0, 1, 2)), rtol=1e-6)
    data.save_npz(str(tmp_path / "e.npz"), ds)
    back = data.load_npz(str(tmp_path / "e.npz"))
    np.testing.assert_array_equal(back.test_images, xte)
    assert back.class_names == ds.class_names

    np.savez(tmp_path / "keys.npz", images=xtr, labels=ytr)
    with pytest.raises(
        ValueError, match="expected keys x_train, y_train, x_test, y_test.*found images, labels"
    ):
        data.load_npz(str(tmp_path / "keys.npz"))
    np.savez(tmp_path / "float.npz", x_train=xtr / 255.0, y_train=ytr, x_test=xte, y_test=yte)
    with pytest.raises(ValueError, match="uint8"):
        data.load_npz(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "len.npz", x_train=xtr, y_train=ytr[:5], x_test=xte, y_test=yte)
    with pytest.raises(ValueError, match=r"train labels must have shape \(7,\)"):
        data.load_npz(str(tmp_path / "len.npz"))
    with pytest.raises(FileNotFoundError, match="np.savez"):
        data.load_npz(str(tmp_path / "missing.npz"))


# ----------------------------------------------------------------------------- augmentation
def distinct_images(n=8, h=6, w=5, c=2):
    return jnp.arange(1, n * h * w * c + 1, dtype=jnp.float32).reshape(n, h, w, c)


def test_random_crop_is_shifted_copy():
    x = distinct_images()
    pad = 2
    out = np.asarray(jax.jit(lambda k, x: aug.random_crop(k, x, pad))(jax.random.PRNGKey(3), x))
    padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = []
    for i in range(x.shape[0]):
        matches = [
            (oy, ox)
            for oy in range(2 * pad + 1)
            for ox in range(2 * pad + 1)
            if np.array_equal(out[i], padded[i, oy : oy + 6, ox : ox + 5])
        ]
        assert len(matches) == 1, f"image {i} is not a padded crop"
        offsets.append(matches[0])
    assert any(o != (pad, pad) for o in offsets)  # some images really moved
    assert len(set(offsets)) > 1  # offsets are per image


def test_random_flip():
    x = distinct_images(n=32)
    f = jax.jit(aug.random_flip, static_argnums=2)
    np.testing.assert_array_equal(f(jax.random.PRNGKey(0), x, 1.0), np.asarray(x)[:, :, ::-1])
    out = np.asarray(f(jax.random.PRNGKey(0), x, 0.5))
    flipped = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, np.asarray(x))]
    same = [np.array_equal(o, xi) for o, xi in zip(out, np.asarray(x))]
    assert all(a or b for a, b in zip(flipped, same)) and any(flipped) and any(same)


def test_cutout_zeroes_square():
    x = jnp.ones((64, 12, 12, 3))
    out = np.asarray(jax.jit(lambda k, x: aug.cutout(k, x, 4))(jax.random.PRNGKey(1), x))
    full = 0
    for img in out:
        zero = np.all(img == 0, axis=-1)
        assert np.all((img == 0) | (img == 1)) and np.all(img.min(-1) == img.max(-1))
        rows, cols = np.nonzero(zero)
        assert 0 < zero.sum() <= 16
        # The zeroed pixels form exactly one (possibly border-clipped) rectangle.
        box = zero[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and box.shape[0] <= 4 and box.shape[1] <= 4
        if zero.sum() == 16:
            full += 1
            assert box.shape == (4, 4)
    assert full > 10


def test_random_erasing_rectangle_area():
    x = jnp.full((64, 20, 20, 1), 1000.0)
    out = np.asarray(jax.jit(lambda k, x: aug.random_erasing(k, x, 1.0))(jax.random.PRNGKey(2), x))
    for img in out:
        erased = img[..., 0] != 1000.0
        rows, cols = np.nonzero(erased)
        assert erased.any()
        assert erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        bh, bw = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        # Sizes are rounded to whole pixels, so allow half a pixel on each side.
        assert (bh - 0.5) * (bw - 0.5) <= 0.4 * 400 and (bh + 0.5) * (bw + 0.5) >= 0.02 * 400
    none = jax.jit(lambda k, x: aug.random_erasing(k, x, 0.0))(jax.random.PRNGKey(2), x)
    np.testing.assert_array_equal(none, x)


def test_mixup_mixes_images_and_labels():
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 3))
    labels = jnp.arange(6)
    targets = aug.one_hot(labels, 6)
    mx, mt = jax.jit(lambda k, x, t: aug.mixup(k, x, t, 0.4))(jax.random.PRNGKey(5), x, targets)
    mt = np.asarray(mt)
    np.testing.assert_allclose(mt.sum(1), 1.0, rtol=1e-6)
    lam = mt[0, 0]
    assert 0.0 < lam < 1.0
    partner = np.asarray(x)[::-1]
    np.testing.assert_allclose(mx, lam * np.asarray(x) + (1 - lam) * partner, rtol=1e-5, atol=1e-6)
    for i in range(6):
        assert abs(mt[i, i] - lam) < 1e-6 and abs(mt[i, 5 - i] - (1 - lam)) < 1e-6


def test_cutmix_label_weight_equals_pasted_area():
    n, h, w = 4, 10, 12
    x = jnp.broadcast_to(jnp.arange(1.0, n + 1)[:, None, None, None], (n, h, w, 1))
    targets = aug.one_hot(jnp.arange(n), n)
    f = jax.jit(lambda k, x, t: aug.cutmix(k, x, t, 1.0))
    fractions = []
    for seed in range(6):
        cx, ct = map(np.asarray, f(jax.random.PRNGKey(seed), x, targets))
        np.testing.assert_allclose(ct.sum(1), 1.0, rtol=1e-6)
        for i in range(n):
            partner = n - 1 - i
            pasted = np.mean(cx[i] == partner + 1)
            assert np.all((cx[i] == i + 1) | (cx[i] == partner + 1))
            assert abs(ct[i, partner] - pasted) < 1e-6 and abs(ct[i, i] - (1 - pasted)) < 1e-6
        fractions.append(pasted)
    assert any(0 < f < 1 for f in fractions)


def test_augment_batch_full_config():
    cfg = dict(crop_padding=2, flip=True, cutout=3, random_erasing=0.5, mixup=0.2, cutmix=1.0)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 3))
    labels = jnp.arange(8) % 5
    f = jax.jit(lambda k, x, y: aug.augment_batch(k, x, y, cfg, 5, label_smoothing=0.1))
    xi, t = f(jax.random.PRNGKey(1), x, labels)
    assert xi.shape == x.shape and t.shape == (8, 5) and xi.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(t).sum(1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(t) >= 0.1 / 5 - 1e-6)
    # No augmentation: images untouched and targets are plain one-hot.
    xi, t = aug.augment_batch(jax.random.PRNGKey(1), x, labels, None, 5)
    np.testing.assert_array_equal(xi, x)
    np.testing.assert_array_equal(t, np.eye(5)[np.asarray(labels)])


def test_normalize_resize_and_batches():
    x = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    got = jax.jit(lambda x: aug.normalize(x, mean, std))(x)
    np.testing.assert_allclose(
        got, (x / 255.0 - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="1 or 3 entries"):
        aug.normalize(x, (0.1, 0.2), (0.5, 0.5))
    up = aug.resize(jnp.ones((2, 4, 4, 1)) * 3.0, 8)
    assert up.shape == (2, 8, 8, 1) and np.allclose(up, 3.0)
    images, labels = np.arange(10)[:, None] * np.ones((10, 2)), np.arange(10)
    perm = aug.epoch_permutation(jax.random.PRNGKey(0), 10)
    assert sorted(np.asarray(perm).tolist()) == list(range(10))
    take = jax.jit(aug.take_batch, static_argnums=4)
    seen = []
    for step in range(3):
        bx, by = take(images, labels, perm, step, 3)
        np.testing.assert_array_equal(np.asarray(bx)[:, 0], np.asarray(by))
        seen += np.asarray(by).tolist()
    assert seen == np.asarray(perm)[:9].tolist()


# ----------------------------------------------------------------------------- eval views
def test_eval_views_match_numpy_slicing():
    x = np.random.default_rng(0).normal(size=(2, 7, 9, 3)).astype(np.float32)
    views = np.asarray(jax.jit(lambda x: ev.eval_views(x, "ten_crop", 5))(x))
    expected = [x[:, :5, :5], x[:, :5, 4:], x[:, 2:, :5], x[:, 2:, 4:], x[:, 1:6, 2:7]]
    expected += [e[:, :, ::-1] for e in expected]
    assert views.shape == (10, 2, 5, 5, 3)
    np.testing.assert_array_equal(views, np.stack(expected))
    center = np.asarray(ev.eval_views(x, "center", (5, 5)))
    np.testing.assert_array_equal(center, x[None, :, 1:6, 2:7])
    ms = np.asarray(ev.eval_views(x[:, :6, :6], "multiscale", 4, scales=(1.0, 1.5)))
    assert ms.shape == (2, 2, 4, 4, 3)
    np.testing.assert_allclose(ms[1], x[:, 1:5, 1:5], rtol=1e-5)  # 1.5 * 4 = 6: no resize
    np.testing.assert_allclose(ms[0], aug.resize(x[:, :6, :6], 4), rtol=1e-5)
    pair = np.asarray(ev.eval_views(x, "flip", 5))
    np.testing.assert_array_equal(pair, np.stack([x[:, 1:6, 2:7], x[:, 1:6, 2:7][:, :, ::-1]]))
    with pytest.raises(ValueError, match="center, flip, ten_crop, multiscale"):
        ev.eval_views(x, "five_crop", 5)
    logits = jnp.log(jnp.array([[[0.2, 0.8]], [[0.6, 0.4]]]))
    np.testing.assert_allclose(jnp.exp(ev.average_views(logits)), [[0.4, 0.6]], rtol=1e-5)


# ----------------------------------------------------------------------------- TFDS
@pytest.fixture(scope="module")
def tfds_mod():
    return tfds_or_skip()


def test_torch_can_be_imported_after_the_tfds_input(tfds_mod):
    # Triton, which torchvision loads, crashes the process when imported after TensorFlow
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision not installed")
    code = (
        "from jaxcnn.data.tfds_input import import_tfds; import_tfds(); import torchvision; "
        "print('both imported')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "both imported" in proc.stdout, proc.stderr[-2000:]


def test_tfds_mock_pipeline(tfds_mod):
    from jaxcnn.data.tfds_input import TFDSDataset

    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.5)
    with tfds_mod.testing.mock_data(num_examples=10):
        ds = TFDSDataset(
            "cifar10",
            image_size=32,
            mean=mean,
            std=std,
            process_index=0,
            process_count=1,
            augment=dict(crop_padding=4, flip=True, randaugment_layers=2, randaugment_magnitude=9),
        )
        assert ds.num_classes == 10 and ds.channels == 3 and ds.fixed_size
        batch = next(ds.train_iter(global_batch_size=4, seed=0))
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and np.all(
            (batch["label"] >= 0) & (batch["label"] < 10)
        )
        lo = (0 - np.array(mean)) / np.array(std)
        hi = (1 - np.array(mean)) / np.array(std)
        assert np.all(batch["image"] >= lo - 1e-5) and np.all(batch["image"] <= hi + 1e-5)
        # Eval: exact normalisation of the raw pixels, in order, padded with a mask.
        raw = list(ds.builder.as_dataset(split="test").as_numpy_iterator())
        evals = list(ds.eval_iter(global_batch_size=4))
        assert [int(b["mask"].sum()) for b in evals] == [4, 4, 2]
        images = np.concatenate([b["image"][b["mask"]] for b in evals])
        labels = np.concatenate([b["label"][b["mask"]] for b in evals])
        want = (np.stack([r["image"] for r in raw]) / 255.0 - mean) / std
        np.testing.assert_allclose(images, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(labels, [r["label"] for r in raw])
        # Variable-size images: inception crop for training, resize + centre crop for eval.
        ds2 = TFDSDataset(
            "imagenette",
            image_size=24,
            test_image_size=20,
            process_index=0,
            process_count=1,
            augment=dict(flip=True),
        )
        assert not ds2.fixed_size and ds2.mean == (0.485, 0.456, 0.406)
        assert next(ds2.train_iter(2))["image"].shape == (2, 24, 24, 3)
        assert next(ds2.eval_iter(2))["image"].shape == (2, 20, 20, 3)


def test_tfds_host_splits_sum_to_total(tfds_mod, tmp_path):
    from jaxcnn.data.tfds_input import TFDSDataset

    class JaxcnnTinyImages(tfds_mod.core.GeneratorBasedBuilder):
        """23 train / 7 test 6x6 grey images; label = index % 3, pixel value = index."""

        VERSION = tfds_mod.core.Version("1.0.0")

        def _info(self):
            return tfds_mod.core.DatasetInfo(
                builder=self,
                features=tfds_mod.features.FeaturesDict(
                    {
                        "image": tfds_mod.features.Image(shape=(6, 6, 1)),
                        "label": tfds_mod.features.ClassLabel(num_classes=3),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(0, 23),
                "test": self._generate_examples(100, 107),
            }

        def _generate_examples(self, start, stop):
            for i in range(start, stop):
                yield i, {"image": np.full((6, 6, 1), i, np.uint8), "label": i % 3}

    JaxcnnTinyImages(data_dir=str(tmp_path)).download_and_prepare()
    seen, steps = [], set()
    for host in range(3):
        ds = TFDSDataset(
            "jaxcnn_tiny_images",
            image_size=6,
            data_dir=str(tmp_path),
            mean=(0.0,),
            std=(1 / 255,),
            process_index=host,
            process_count=3,
        )
        assert ds.num_train == 23 and ds.num_test == 7
        batches = list(ds.eval_iter(global_batch_size=6))
        steps.add(len(batches))
        for b in batches:
            seen += b["image"][b["mask"], 0, 0, 0].round().astype(int).tolist()
        assert next(ds.train_iter(6))["image"].shape == (2, 6, 6, 1)
    assert len(steps) == 1  # every host runs the same number of eval steps
    assert sorted(seen) == list(range(100, 107))  # disjoint host slices covering the split
    with pytest.raises(ValueError, match="divisible"):
        ds.eval_iter(global_batch_size=4).__next__()
    cfg = {"dataset": "tfds:jaxcnn_tiny_images", "image_size": 6, "tfds_data_dir": str(tmp_path)}
    assert data.load_dataset(cfg).num_classes == 3


def test_tfds_unprepared_manual_dataset_message(tfds_mod, tmp_path):
    from jaxcnn.data.tfds_input import TFDSDataset

    with pytest.raises(FileNotFoundError) as e:
        TFDSDataset(
            "imagenet2012", image_size=224, data_dir=str(tmp_path), process_index=0, process_count=1
        )
    assert "downloads/manual" in str(e.value) and "tfds build imagenet2012" in str(e.value)


def test_tfds_missing_gives_install_line(monkeypatch):
    from jaxcnn.data.tfds_input import import_tfds

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install tensorflow-cpu tensorflow-datasets"):
        import_tfds()
