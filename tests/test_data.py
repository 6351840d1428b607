"""Tests of jax_memat.data: sources, corruptions and on-device batching."""

import dataclasses
import functools
import gzip
import os
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_memat import data
from jax_memat.data import sources
from tests.helpers import F32_EPS

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _write_idx(path, array, type_code=0x08, compress=True):
    """Writes ``array`` as an IDX file, independently of the reader under test."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    payload = header + np.asarray(array, dtype=dtype[type_code]).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)


def _write_mnist_like(folder, n_train=6, n_test=4, seed=0):
    """Writes a tiny MNIST-like dataset of IDX files; returns its arrays."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images)
        _write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), labels)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def no_default_dirs(monkeypatch, tmp_path):
    """Hides $JAX_MEMAT_DATA_DIR and the system folders, so only what a test writes is found."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    for name in ("mnist", "fashion_mnist"):
        hidden = dataclasses.replace(
            sources._SOURCES[name], system_dirs=(str(tmp_path / "no-system-dir"),)
        )
        monkeypatch.setitem(sources._SOURCES, name, hidden)


# ----------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize(
    "type_code, dtype, shape",
    [(0x08, np.uint8, (3, 4, 5)), (0x09, np.int8, (7,)), (0x0B, np.int16, (2, 3)),
     (0x0C, np.int32, (4, 2)), (0x0D, np.float32, (3, 1, 2)), (0x0E, np.float64, (5,))],
)  # fmt: skip
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, type_code, dtype, shape, compress):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=shape) * 100).astype(dtype)
    path = tmp_path / ("x-idx.gz" if compress else "x-idx")
    _write_idx(path, array, type_code, compress)
    out = data.read_idx(path)
    assert out.dtype == dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    out[...] = 0  # Writable.


def test_read_idx_rejects_malformed_files(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(ValueError, match="two zero bytes"):
        data.read_idx(path)
    path.write_bytes(b"\x00\x00\x42\x01" + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(ValueError, match="element type 0x42"):
        data.read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x00\x00")
    with pytest.raises(ValueError, match="holds 2 bytes"):
        data.read_idx(path)


def test_load_idx_from_data_dir(tmp_path, no_default_dirs):
    arrays = _write_mnist_like(tmp_path / "mine")
    for split in ("train", "test"):
        ds = data.load_dataset("mnist", split, data_dir=str(tmp_path / "mine"), source="idx")
        images, labels = arrays[split]
        assert ds.name == "mnist" and ds.num_classes == 10
        assert ds.images.dtype == np.uint8 and ds.images.shape == (len(labels), 28, 28, 1)
        assert ds.labels.dtype == np.int32
        np.testing.assert_array_equal(ds.images[..., 0], images)
        np.testing.assert_array_equal(ds.labels, labels)
    first = data.load_dataset("mnist", "train", data_dir=str(tmp_path / "mine"), num_examples=2)
    np.testing.assert_array_equal(first.labels, arrays["train"][1][:2])
    with pytest.raises(ValueError, match="only 6 examples"):
        data.load_dataset("mnist", "train", data_dir=str(tmp_path / "mine"), num_examples=7)


def test_data_dir_env_override(tmp_path, monkeypatch, no_default_dirs):
    env_arrays = _write_mnist_like(tmp_path / "env" / "fashion-mnist", n_train=3, seed=1)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    ds = data.load_dataset("fashion_mnist", "train", source="idx")
    np.testing.assert_array_equal(ds.labels, env_arrays["train"][1])
    # The variable may also name the folder of the files itself.
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env" / "fashion-mnist"))
    assert data.load_dataset("fashion_mnist", "test", source="idx").num_examples == 4
    # An explicit data_dir comes first.
    dir_arrays = _write_mnist_like(tmp_path / "explicit", n_train=5, seed=2)
    ds = data.load_dataset("fashion_mnist", "train", data_dir=str(tmp_path / "explicit"))
    np.testing.assert_array_equal(ds.labels, dir_arrays["train"][1])


def test_missing_idx_files_raise_helpful_error(tmp_path, no_default_dirs):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset("mnist", "train", data_dir=str(empty), source="idx")
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    for expected in ("train-images-idx3-ubyte", str(empty), "data_dir", data.DATA_DIR_ENV, "http"):
        assert expected in message


@pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR),
    reason=f"{FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    for split, n in (("train", 60000), ("test", 10000)):
        ds = data.load_dataset("fashion_mnist", split, source="idx")
        assert ds.num_examples == n and ds.image_shape == (28, 28, 1)
        assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
        np.testing.assert_array_equal(np.bincount(ds.labels), np.full(10, n // 10))
        assert ds.images.max() == 255


# ------------------------------------------------------------------------------- tfds


def test_tfds_cifar10_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load_dataset("cifar10", "train", num_examples=7)
        assert ds.images.shape == (7, 32, 32, 3) and ds.images.dtype == np.uint8
        assert ds.labels.dtype == np.int32 and ds.labels.max() < 10
        assert ds.num_classes == 10 and ds.name == "cifar10"
        assert data.load_dataset("cifar100", "test").num_classes == 100
        with pytest.raises(ValueError, match="only 12 examples"):
            data.load_dataset("cifar10", "test", num_examples=13)


def test_auto_falls_back_to_tfds(tmp_path, no_default_dirs):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):
        ds = data.load_dataset("mnist", "test", data_dir=str(tmp_path))
    assert ds.images.shape == (3, 28, 28, 1)


def test_tfds_failure_becomes_dataset_not_found(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def fail(*args, **kwargs):
        raise AssertionError("Dataset cifar10: could not find data in /somewhere.")

    monkeypatch.setattr(tfds, "load", fail)
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset("cifar10", "train", data_dir=str(tmp_path))
    message = str(info.value)
    assert "cifar10" in message and str(tmp_path) in message and "download_and_prepare" in message
    assert "could not find data" in message
    assert info.value.__suppress_context__  # No deep tfds traceback attached.


def test_works_without_tensorflow(tmp_path):
    """The package imports TensorFlow only for tfds sources, and says so when it is absent."""
    _write_mnist_like(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tensorflow"] = None  # Makes `import tensorflow` fail, as if absent.
        sys.modules["tensorflow_datasets"] = None
        from jax_memat import data
        assert data.load_dataset("synthetic", "train").num_examples == 512
        assert data.load_dataset("mnist", "train", data_dir={str(tmp_path)!r}).num_examples == 6
        try:
            data.load_dataset("cifar10", "train", source="tfds")
        except ImportError as e:
            assert "pip install" in str(e), e
        else:
            raise AssertionError("no ImportError")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- validation, synthetic


def test_bad_arguments_are_rejected_before_any_io(monkeypatch):
    def no_io(*args, **kwargs):
        raise AssertionError("I/O attempted before validation")

    monkeypatch.setattr(sources, "_load_tfds", no_io)
    monkeypatch.setattr(sources, "_load_files", no_io)
    with pytest.raises(ValueError, match="'cifar10', 'cifar100', 'svhn'"):
        data.load_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="'train', 'test'"):
        data.load_dataset("cifar10", "validation")
    with pytest.raises(ValueError, match="'auto', 'files', 'tfds', 'idx'"):
        data.load_dataset("mnist", "train", source="http")
    with pytest.raises(ValueError, match="only for mnist and fashion_mnist"):
        data.load_dataset("cifar10", "train", source="idx")
    with pytest.raises(ValueError, match="synthetic"):
        data.load_dataset("cifar10", "train", num_classes=10)
    with pytest.raises(ValueError, match="num_examples"):
        data.load_dataset("cifar10", "train", num_examples=0)
    with pytest.raises(ValueError, match="seed"):
        data.load_dataset("synthetic", "train", seed=-1)
    with pytest.raises(ValueError, match="source must be 'auto'"):
        data.load_dataset("synthetic", "train", source="tfds")
    assert data.validate_dataset_name("svhn") == "svhn"
    with pytest.raises(ValueError, match="'fashion_mnist', 'synthetic'"):
        data.validate_dataset_name("fashion-mnist")
    assert data.dataset_spec("svhn") == ((32, 32, 3), 10)


def test_dataset_validation():
    images, labels = np.zeros((3, 4, 4, 1), np.uint8), np.array([0, 1, 2], np.int32)
    ds = data.Dataset(images, labels, 3, "toy")
    assert ds.num_examples == 3 and ds.image_shape == (4, 4, 1)
    with pytest.raises(ValueError, match="uint8"):
        data.Dataset(images.astype(np.float32), labels, 3, "toy")
    with pytest.raises(ValueError, match="int32"):
        data.Dataset(images, labels.astype(np.int64), 3, "toy")
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        data.Dataset(images, labels[:2], 3, "toy")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        data.Dataset(images, labels, 2, "toy")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"


def test_synthetic_is_deterministic_and_learnable():
    train = data.load_dataset("synthetic", "train", seed=3)
    test = data.load_dataset("synthetic", "test", seed=3)
    assert (train.num_examples, test.num_examples) == (512, 256)
    assert train.image_shape == (8, 8, 1) and train.num_classes == 10
    again = data.load_dataset("synthetic", "train", seed=3)
    np.testing.assert_array_equal(train.images, again.images)
    np.testing.assert_array_equal(train.labels, again.labels)
    other = data.load_dataset("synthetic", "train", seed=4)
    assert not np.array_equal(train.images, other.images)
    # The first n examples do not depend on how many are generated.
    head = data.load_dataset("synthetic", "train", seed=3, num_examples=100)
    np.testing.assert_array_equal(head.images, train.images[:100])
    # Same templates, different noise: class means of train classify test well.
    x_train = train.images.reshape(512, -1).astype(np.float64)
    x_test = test.images.reshape(256, -1).astype(np.float64)
    means = np.stack([x_train[train.labels == k].mean(0) for k in range(10)])
    predicted = np.argmin(((x_test[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(predicted == test.labels) > 0.9
    assert not np.array_equal(train.images[:256], test.images)
    custom = data.load_dataset(
        "synthetic", "test", num_examples=20, image_shape=(4, 6, 3), num_classes=3
    )
    assert custom.images.shape == (20, 4, 6, 3) and custom.labels.max() < 3


# ------------------------------------------------------------------------- corruptions


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_label_noise_statistics(rate):
    n, k = 100_000, 10
    clean = np.random.default_rng(0).integers(0, k, n).astype(np.int32)
    noisy = data.corrupt_labels(clean, k, rate, seed=1)
    assert noisy.dtype == np.int32 and noisy.shape == (n,)
    p = rate * (1 - 1 / k)
    changed = np.mean(noisy != clean)
    assert abs(changed - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12
    if rate == 0.0:
        np.testing.assert_array_equal(noisy, clean)
    if rate == 1.0:  # Completely random labels: uniform and independent of the clean ones.
        counts = np.bincount(noisy[clean == 0], minlength=k)
        expected = counts.sum() / k
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_label_noise_seeds_and_nesting():
    clean = np.arange(10_000, dtype=np.int32) % 10
    a = data.corrupt_labels(clean, 10, 0.4, seed=0)
    np.testing.assert_array_equal(a, data.corrupt_labels(clean, 10, 0.4, seed=0))
    assert not np.array_equal(a, data.corrupt_labels(clean, 10, 0.4, seed=1))
    # Lower rates redraw a subset of the labels of higher rates, to the same values.
    b = data.corrupt_labels(clean, 10, 0.8, seed=0)
    np.testing.assert_array_equal(b[a != clean], a[a != clean])
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            data.corrupt_labels(clean, 10, bad, seed=0)


def test_shuffled_pixels_one_permutation_for_all_images():
    h, w = 8, 8
    positions = np.arange(h * w, dtype=np.uint8).reshape(h, w)
    first = np.stack([positions, positions + 64, positions + 128], -1)  # Distinct per position.
    second = first[::-1, ::-1]  # Another image with other values at each position.
    rng = np.random.default_rng(0)
    others = rng.integers(0, 256, (5, h, w, 3), dtype=np.uint8)
    images = np.concatenate([first[None], second[None], others])
    out = data.corrupt_images(images, "shuffled_pixels", seed=0)
    assert out.dtype == np.uint8 and out.shape == images.shape
    # The permutation read off the first image: out[j] = in[perm[j]], channels together.
    perm = out[0, ..., 0].ravel().astype(int)
    assert sorted(perm) == list(range(h * w)) and perm.tolist() != list(range(h * w))
    np.testing.assert_array_equal(out[0].reshape(-1, 3), first.reshape(-1, 3)[perm])
    for i in range(1, len(images)):
        np.testing.assert_array_equal(out[i].reshape(-1, 3), images[i].reshape(-1, 3)[perm])
    np.testing.assert_array_equal(out, data.corrupt_images(images, "shuffled_pixels", seed=0))
    assert not np.array_equal(out, data.corrupt_images(images, "shuffled_pixels", seed=1))


def test_random_pixels_a_permutation_per_image():
    image = np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1)
    rng = np.random.default_rng(0)
    images = np.concatenate([np.repeat(image, 4, axis=0), rng.integers(0, 256, (3, 8, 8, 1))])
    images = images.astype(np.uint8)
    out = data.corrupt_images(images, "random_pixels", seed=0)
    for i in range(len(images)):  # Each image's multiset of pixels is kept.
        np.testing.assert_array_equal(np.sort(out[i].ravel()), np.sort(images[i].ravel()))
    # Four equal inputs, four different permutations.
    assert len({out[i].tobytes() for i in range(4)}) == 4
    np.testing.assert_array_equal(out, data.corrupt_images(images, "random_pixels", seed=0))


def test_gaussian_images_match_channel_statistics():
    images = np.zeros((2000, 8, 8, 3), np.uint8)
    out = data.corrupt_images(images, "gaussian", seed=0, mean=[100, 128, 150], std=[20, 30, 25])
    assert out.dtype == np.uint8 and out.shape == images.shape
    values = out.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(values.mean(0), [100, 128, 150], atol=0.5)
    np.testing.assert_allclose(values.std(0), [20, 30, 25], atol=0.5)
    # Without mean/std, the statistics of the images given are used.
    source = np.random.default_rng(0).normal([60, 120, 180], [10, 20, 15], (2000, 8, 8, 3))
    source = np.clip(np.rint(source), 0, 255).astype(np.uint8)
    values = data.corrupt_images(source, "gaussian", seed=1).reshape(-1, 3).astype(np.float64)
    flat = source.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(values.mean(0), flat.mean(0), atol=0.5)
    np.testing.assert_allclose(values.std(0), flat.std(0), atol=0.5)


def test_image_corruption_validation():
    images = np.zeros((2, 4, 4, 1), np.uint8)
    copy = data.corrupt_images(images, "none", seed=0)
    assert copy is not images
    np.testing.assert_array_equal(copy, images)
    with pytest.raises(ValueError, match="'none', 'shuffled_pixels', 'random_pixels', 'gaussian'"):
        data.corrupt_images(images, "blur", seed=0)
    with pytest.raises(ValueError, match="gaussian"):
        data.corrupt_images(images, "random_pixels", seed=0, mean=0.5)


def test_apply_corruptions():
    clean = data.load_dataset("synthetic", "train", num_examples=300)
    clean_labels = clean.labels.copy()
    noisy, record = data.apply_corruptions(
        clean, label_noise=0.6, image_corruption="shuffled_pixels", seed=5
    )
    assert isinstance(noisy, data.Dataset) and noisy.num_classes == clean.num_classes
    assert set(record) == {"labels", "clean_labels", "changed"}
    np.testing.assert_array_equal(record["labels"], noisy.labels)
    np.testing.assert_array_equal(record["clean_labels"], clean_labels)
    np.testing.assert_array_equal(record["changed"], noisy.labels != clean_labels)
    assert 0.3 < record["changed"].mean() < 0.8
    np.testing.assert_array_equal(clean.labels, clean_labels)  # Input left alone.
    np.testing.assert_array_equal(
        noisy.images, data.corrupt_images(clean.images, "shuffled_pixels", seed=5)
    )
    again, _ = data.apply_corruptions(clean, label_noise=0.6, image_corruption="none", seed=5)
    np.testing.assert_array_equal(again.labels, noisy.labels)
    np.testing.assert_array_equal(again.images, clean.images)
    with pytest.raises(ValueError, match="accepted"):
        data.apply_corruptions(clean, label_noise=0.1, image_corruption="blur", seed=0)


# ---------------------------------------------------------------------------- pipeline


def test_epoch_plans():
    n, b = 103, 10
    plan = data.train_batch_indices(n, b, seed=0, epoch=1)
    assert plan.dtype == np.int32 and plan.shape == (10, 10) == (data.steps_per_epoch(n, b), b)
    assert len(np.unique(plan)) == 100 and plan.min() >= 0 and plan.max() < n
    np.testing.assert_array_equal(plan, data.train_batch_indices(n, b, seed=0, epoch=1))
    np.testing.assert_array_equal(plan.ravel(), data.epoch_permutation(n, 0, 1)[:100])
    assert not np.array_equal(plan, data.train_batch_indices(n, b, seed=0, epoch=2))
    assert not np.array_equal(plan, data.train_batch_indices(n, b, seed=1, epoch=1))
    with pytest.raises(ValueError, match="larger than the number of examples"):
        data.train_batch_indices(5, 6, seed=0, epoch=0)
    for n, b in ((10, 3), (9, 3), (1, 4)):
        indices, mask = data.eval_batches(n, b)
        assert indices.shape == mask.shape == (-(-n // b), b) and mask.dtype == np.float32
        assert mask.sum() == n
        np.testing.assert_array_equal(np.sort(indices[mask == 1]), np.arange(n))
        assert np.all(indices[mask == 0] == 0)


def _images(b=6, h=5, w=7, c=2, seed=0):
    return np.random.default_rng(seed).random((b, h, w, c)).astype(np.float32)


def test_augment_identity_and_determinism():
    images = _images()
    key = jax.random.key(0)
    out = data.augment(jnp.asarray(images), key, crop_padding=0, flip=False)
    np.testing.assert_array_equal(out, images)
    run = jax.jit(functools.partial(data.augment, crop_padding=2, flip=True))
    first = np.asarray(run(images, key))
    np.testing.assert_array_equal(first, run(images, key))
    assert not np.array_equal(first, run(images, jax.random.key(1)))
    with pytest.raises(ValueError, match="crop_padding"):
        data.augment(images, key, crop_padding=-1)


def test_augment_flip():
    images = _images(b=32)
    out = np.asarray(data.augment(jnp.asarray(images), jax.random.key(0), crop_padding=0))
    flipped = [np.array_equal(o, np.flip(x, axis=1)) for o, x in zip(out, images, strict=True)]
    kept = [np.array_equal(o, x) for o, x in zip(out, images, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # Exactly one of the two.
    assert 0 < sum(flipped) < len(images)


def _windows(image, p):
    """Every crop of the zero-padded image, by a naive loop."""
    h, w, _ = image.shape
    padded = np.pad(image, ((p, p), (p, p), (0, 0)))
    return {
        (top, left): padded[top : top + h, left : left + w]
        for top in range(2 * p + 1)
        for left in range(2 * p + 1)
    }


@pytest.mark.parametrize("flip", [False, True])
def test_augment_crops_are_windows_of_the_padded_image(flip):
    p = 2
    images = _images(b=40)
    out = np.asarray(
        data.augment(jnp.asarray(images), jax.random.key(3), crop_padding=p, flip=flip)
    )
    offsets, flips = set(), 0
    for o, x in zip(out, images, strict=True):
        windows = _windows(x, p)
        matches = [k for k, win in windows.items() if np.array_equal(o, win)]
        flipped = [k for k, win in windows.items() if np.array_equal(o, np.flip(win, axis=1))]
        assert len(matches) + len(flipped) == 1
        if not flip:
            assert matches
        offsets.update(matches + flipped)
        flips += bool(flipped)
    assert len(offsets) > 5  # Many different offsets are drawn.
    if flip:
        assert 0 < flips < len(images)


def test_make_batch():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, 20, dtype=np.int32))
    indices = jnp.array([4, 0, 19, 4], jnp.int32)
    plain = jax.jit(functools.partial(data.make_batch, augment=False))
    batch = plain(images, labels, indices, None)
    assert batch["image"].dtype == jnp.float32 and batch["label"].dtype == jnp.int32
    # uint8 / 255 in float32 against float64: XLA may compute the division as a
    # multiplication by a rounded 1/255, three half-ulp roundings in all (1.8e-7
    # relative at most). A wrong pixel is off by 1/255 or more.
    scaled = np.asarray(images)[[4, 0, 19, 4]] / 255.0
    np.testing.assert_allclose(batch["image"], scaled, rtol=4 * F32_EPS, atol=0)
    np.testing.assert_array_equal(batch["label"], np.asarray(labels)[[4, 0, 19, 4]])
    np.testing.assert_array_equal(batch["index"], indices)
    augmented = jax.jit(functools.partial(data.make_batch, augment=True, crop_padding=1))
    key = jax.random.key(0)
    batch = augmented(images, labels, indices, key)
    expected = data.augment(jnp.asarray(images)[indices] / 255.0, key, crop_padding=1)
    # Jitted and eager runs may round the scaling differently (see above).
    np.testing.assert_allclose(batch["image"], expected, rtol=4 * F32_EPS, atol=0)
    with pytest.raises(ValueError, match="PRNG key"):
        data.make_batch(images, labels, indices, None, augment=True)
