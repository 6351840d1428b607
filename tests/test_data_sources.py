"""Tests of the dataset sources: the official CIFAR and SVHN files, tfds, provenance.

The real files cannot be downloaded here, so each test writes a few records in
the official formats with its own writer (independent of the readers), and
tfds is exercised with its mock data and with its real builders fed those
files in place of the download.
"""

import dataclasses
import logging
import os
import sys
import tarfile

import numpy as np
import pytest
import scipy.io

from jax_memat import data
from jax_memat.data import cifar, sources, svhn
from jax_memat.experiment.config import ConfigError, default_config, validate_config

CIFAR10_TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR10_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()


@pytest.fixture(autouse=True)
def no_default_dirs(monkeypatch, tmp_path):
    """Hides $JAX_MEMAT_DATA_DIR and the system folders, so only what a test writes is found."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    for name in ("mnist", "fashion_mnist"):
        hidden = dataclasses.replace(
            sources._SOURCES[name], system_dirs=(str(tmp_path / "no-system"),)
        )
        monkeypatch.setitem(sources._SOURCES, name, hidden)


# --------------------------------------------------------------- writers of official files


def _cifar_record(labels, image):
    """One binary-version record: label bytes, then the R, G and B planes, each row-major."""
    planes = b"".join(image[:, :, c].tobytes(order="C") for c in range(3))
    return bytes(np.asarray(labels, np.uint8).tolist()) + planes


def _random_cifar(rng, n, label_limits):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.stack([rng.integers(0, limit, n) for limit in label_limits], axis=1)
    payload = b"".join(_cifar_record(lab, img) for lab, img in zip(labels, images, strict=True))
    return images, labels, payload


def _write_cifar10(folder, n=3, seed=0):
    """Writes cifar-10-batches-bin/ as in the official archive; returns the arrays per split."""
    rng = np.random.default_rng(seed)
    out = os.path.join(folder, "cifar-10-batches-bin")
    os.makedirs(out)
    arrays = {"train": ([], []), "test": ([], [])}
    for split, names in (("train", CIFAR10_TRAIN_FILES), ("test", ["test_batch.bin"])):
        for name in names:
            images, labels, payload = _random_cifar(rng, n, (10,))
            with open(os.path.join(out, name), "wb") as f:
                f.write(payload)
            arrays[split][0].append(images)
            arrays[split][1].append(labels[:, 0])
    with open(os.path.join(out, "batches.meta.txt"), "w") as f:
        f.write("\n".join(CIFAR10_NAMES) + "\n\n")
    return {split: (np.concatenate(i), np.concatenate(lab)) for split, (i, lab) in arrays.items()}


def _write_cifar100(folder, n=4, seed=0):
    """Writes cifar-100-binary/; returns (images, coarse labels, fine labels) per split."""
    rng = np.random.default_rng(seed)
    out = os.path.join(folder, "cifar-100-binary")
    os.makedirs(out)
    arrays = {}
    for split in ("train", "test"):
        images, labels, payload = _random_cifar(rng, n, (20, 100))
        with open(os.path.join(out, f"{split}.bin"), "wb") as f:
            f.write(payload)
        arrays[split] = (images, labels[:, 0], labels[:, 1])
    for name, count in (("coarse_label_names.txt", 20), ("fine_label_names.txt", 100)):
        with open(os.path.join(out, name), "w") as f:
            f.write("\n".join(f"class_{i}" for i in range(count)) + "\n")
    return arrays


def _tar_gz(folder, archive):
    """Packs ``folder`` as the official archives do: members prefixed by the folder's name."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=os.path.basename(folder))


def _write_svhn(folder, split, n=5, seed=0, y_dtype=np.uint8, compress=True):
    """Writes <split>_32x32.mat as on the SVHN page: X 32x32x3xN uint8, y Nx1 in 1..10."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(y_dtype)
    y[0, 0] = 10  # The digit 0.
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{split}_32x32.mat")
    scipy.io.savemat(path, {"X": x, "y": y}, do_compression=compress)
    return path, x, y


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("dataset, label_bytes", [("cifar10", 1), ("cifar100", 2)])
def test_cifar_pixel_layout_is_channel_major(tmp_path, dataset, label_bytes):
    """Byte 1 + c*1024 + r*32 + k of a record is pixel (row r, column k) of channel c."""
    record = bytearray(label_bytes + 3072)
    record[:label_bytes] = [7] * label_bytes
    marks = {(0, 1, 2): 11, (1, 5, 7): 22, (2, 31, 0): 33, (0, 0, 31): 44}
    for (c, r, k), value in marks.items():
        record[label_bytes + c * 1024 + r * 32 + k] = value
    name = "test_batch.bin" if dataset == "cifar10" else "test.bin"
    (tmp_path / name).write_bytes(bytes(record))
    images, labels = data.read_cifar_binary(tmp_path, "test", dataset)
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [7] and labels.dtype == np.int32
    expected = np.zeros((32, 32, 3), np.uint8)
    for (c, r, k), value in marks.items():
        expected[r, k, c] = value
    np.testing.assert_array_equal(images[0], expected)


@pytest.mark.parametrize("packed", ["folder", "archive", "files_in_data_dir"])
def test_cifar10_official_files_in_file_order(tmp_path, packed):
    arrays = _write_cifar10(tmp_path / "src")
    extracted = tmp_path / "src" / "cifar-10-batches-bin"
    root = tmp_path / "data"
    if packed == "folder":  # <data_dir>/cifar10/cifar-10-batches-bin/
        (root / "cifar10").mkdir(parents=True)
        extracted.rename(root / "cifar10" / "cifar-10-batches-bin")
        where = root / "cifar10" / "cifar-10-batches-bin"
    elif packed == "archive":  # <data_dir>/cifar-10-binary.tar.gz, read without extracting.
        root.mkdir()
        _tar_gz(extracted, root / "cifar-10-binary.tar.gz")
        where = root / "cifar-10-binary.tar.gz"
    else:  # data_dir is the extracted folder itself.
        extracted.rename(root)
        where = root
    for split, (images, labels) in arrays.items():
        ds = data.load_dataset("cifar10", split, data_dir=str(root), source="files")
        assert ds.num_classes == 10 and ds.name == "cifar10"
        np.testing.assert_array_equal(ds.images, images)  # data_batch_1 first, ... 5 last.
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.source.startswith(f"cifar10 {split}: {len(labels)} examples from {where}")
        assert "binary version" in ds.source
    first = data.load_dataset("cifar10", "train", data_dir=str(root), num_examples=4)
    np.testing.assert_array_equal(first.images, arrays["train"][0][:4])
    assert first.source.startswith("cifar10 train: the first 4 examples from")


def test_cifar100_uses_fine_labels_and_archive(tmp_path, monkeypatch):
    arrays = _write_cifar100(tmp_path / "src")
    root = tmp_path / "data" / "cifar100"
    root.mkdir(parents=True)
    _tar_gz(tmp_path / "src" / "cifar-100-binary", root / "cifar-100-binary.tar.gz")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "data"))  # Its cifar100/ sub-folder.
    for split, (images, coarse, fine) in arrays.items():
        assert not np.array_equal(coarse, fine)  # The test can tell them apart.
        ds = data.load_dataset("cifar100", split)
        assert ds.num_classes == 100
        np.testing.assert_array_equal(ds.images, images)
        np.testing.assert_array_equal(ds.labels, fine)
        assert "cifar-100-binary.tar.gz" in ds.source


def test_bad_cifar_files_are_named(tmp_path):
    _write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-bin"
    batch3 = folder / "data_batch_3.bin"
    good = batch3.read_bytes()

    batch3.write_bytes(good[:-100])  # Truncated inside a record.
    with pytest.raises(ValueError, match="data_batch_3.bin is truncated") as info:
        data.load_dataset("cifar10", "train", data_dir=str(tmp_path))
    assert "9119 bytes" in str(info.value) and "3073" in str(info.value)
    assert data.load_dataset("cifar10", "test", data_dir=str(tmp_path)).num_examples == 3

    batch3.write_bytes(b"")
    with pytest.raises(ValueError, match="data_batch_3.bin is truncated"):
        data.load_dataset("cifar10", "train", data_dir=str(tmp_path))

    batch3.write_bytes(bytes([10]) + good[1:])  # Label 10 in a 10-class dataset.
    with pytest.raises(ValueError, match="data_batch_3.bin: record 0 has label byte 0 = 10"):
        data.load_dataset("cifar10", "train", data_dir=str(tmp_path))

    batch3.write_bytes(good)
    (folder / "data_batch_5.bin").unlink()
    with pytest.raises(ValueError, match="data_batch_5.bin is missing"):
        data.load_dataset("cifar10", "train", data_dir=str(tmp_path))


def test_bad_cifar_archives_are_named(tmp_path):
    _write_cifar10(tmp_path / "src")
    archive = tmp_path / "data" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir()
    _tar_gz(tmp_path / "src" / "cifar-10-batches-bin", archive)
    whole = archive.read_bytes()
    archive.write_bytes(whole[: len(whole) // 2])  # An interrupted download.
    with pytest.raises(ValueError, match="cifar-10-binary.tar.gz cannot be read") as info:
        data.load_dataset("cifar10", "train", data_dir=str(archive.parent))
    assert "truncated" in str(info.value) and cifar.LAYOUTS["cifar10"].url in str(info.value)

    # An archive without the test batch.
    (tmp_path / "src" / "cifar-10-batches-bin" / "test_batch.bin").unlink()
    _tar_gz(tmp_path / "src" / "cifar-10-batches-bin", archive)
    with pytest.raises(ValueError, match="lacks cifar-10-batches-bin/test_batch.bin"):
        data.load_dataset("cifar10", "test", data_dir=str(archive.parent))


@pytest.mark.parametrize(
    "name, found",
    [("cifar10", "cifar-10-python.tar.gz"), ("cifar10", "cifar-10-batches-py"),
     ("cifar100", "cifar-100-python.tar.gz"), ("cifar100", "cifar-100-python")],
)  # fmt: skip
def test_cifar_python_version_is_refused(tmp_path, name, found):
    """The pickles are never opened, also not by 'auto' (which would otherwise try tfds)."""
    path = tmp_path / found
    if found.endswith(".tar.gz"):
        path.write_bytes(b"not read")
    else:
        path.mkdir()
    for source in ("files", "auto"):
        with pytest.raises(ValueError, match="pickles") as info:
            data.load_dataset(name, "train", data_dir=str(tmp_path), source=source)
        assert str(path) in str(info.value)
        assert cifar.LAYOUTS[name].url in str(info.value)


# ------------------------------------------------------------------------------ SVHN


@pytest.mark.parametrize("y_dtype", [np.uint8, np.float64])
@pytest.mark.parametrize("compress", [True, False])
def test_svhn_mat_files(tmp_path, y_dtype, compress):
    files = {
        split: _write_svhn(
            tmp_path / "svhn", split, n=n, seed=i, y_dtype=y_dtype, compress=compress
        )
        for i, (split, n) in enumerate((("train", 6), ("test", 4)))
    }
    for split, (path, x, y) in files.items():
        ds = data.load_dataset("svhn", split, data_dir=str(tmp_path), source="files")
        assert ds.images.shape == (x.shape[3], 32, 32, 3) and ds.num_classes == 10
        for i in range(x.shape[3]):  # Row i is X[:, :, :, i], height x width x RGB.
            np.testing.assert_array_equal(ds.images[i], x[:, :, :, i])
        expected = y[:, 0].astype(int)
        expected[expected == 10] = 0
        np.testing.assert_array_equal(ds.labels, expected)
        assert ds.labels[0] == 0 and ds.labels.dtype == np.int32
        assert ds.source.startswith(f"svhn {split}: {x.shape[3]} examples from {path}")


def test_bad_svhn_files_are_named(tmp_path):
    path, x, y = _write_svhn(tmp_path, "train", n=8)
    whole = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(whole[: len(whole) * 2 // 3])
    with pytest.raises(ValueError, match="train_32x32.mat cannot be read") as info:
        data.load_dataset("svhn", "train", data_dir=str(tmp_path))
    assert str(tmp_path) in str(info.value) and svhn.URL in str(info.value)

    scipy.io.savemat(path, {"X": x[:, :, :2], "y": y})  # Grey-level images.
    with pytest.raises(ValueError, match="32x32x3xN"):
        data.load_dataset("svhn", "train", data_dir=str(tmp_path))
    scipy.io.savemat(path, {"X": x, "y": y[:-1]})
    with pytest.raises(ValueError, match="one label per image"):
        data.load_dataset("svhn", "train", data_dir=str(tmp_path))
    bad = y.copy()
    bad[3] = 0
    scipy.io.savemat(path, {"X": x, "y": bad})
    with pytest.raises(ValueError, match=r"y\[3\] = 0"):
        data.load_dataset("svhn", "train", data_dir=str(tmp_path))
    scipy.io.savemat(path, {"images": x})
    with pytest.raises(ValueError, match="does not hold the variables X and y"):
        data.load_dataset("svhn", "train", data_dir=str(tmp_path))


# ------------------------------------------------------------------- where files are looked for


def test_missing_data_dir_is_an_error(tmp_path, monkeypatch):
    _write_svhn(tmp_path / "env", "test")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    absent = tmp_path / "absent"
    for source in ("auto", "files", "tfds"):
        with pytest.raises(data.DatasetNotFoundError, match="does not exist") as info:
            data.load_dataset("svhn", "test", data_dir=str(absent), source=source)
        assert str(absent) in str(info.value)
    # A data_dir that exists but lacks the files: an error, never the files in $JAX_MEMAT_DATA_DIR.
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset("svhn", "test", data_dir=str(tmp_path / "empty"), source="files")
    message = str(info.value)
    for expected in ("test_32x32.mat", str(tmp_path / "empty"), "data_dir", data.DATA_DIR_ENV):
        assert expected in message
    assert svhn.URL in message and str(tmp_path / "env") not in message
    assert data.load_dataset("svhn", "test", source="files").num_examples == 5
    monkeypatch.setenv(data.DATA_DIR_ENV, str(absent))
    with pytest.raises(data.DatasetNotFoundError, match=f"{data.DATA_DIR_ENV}=.*does not exist"):
        data.load_dataset("svhn", "test")


def test_missing_cifar_files_say_what_and_where(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset("cifar100", "train", data_dir=str(tmp_path), source="files")
    message = str(info.value)
    expected = ["cifar-100-binary.tar.gz", "cifar-100-binary/", "train.bin", "source='tfds'"]
    expected += [str(tmp_path), str(tmp_path / "cifar100"), cifar.LAYOUTS["cifar100"].url]
    for text in expected:
        assert text in message


def test_idx_alias_and_sources_list(tmp_path):
    assert data.SOURCES == ("auto", "files", "tfds", "idx")
    with pytest.raises(ValueError, match="only for mnist and fashion_mnist"):
        data.load_dataset("svhn", "train", source="idx")
    config = default_config()
    config.dataset.source = "files"
    validate_config(config)
    config.dataset.source = "local"
    with pytest.raises(ConfigError, match="'auto', 'files', 'tfds', 'idx'"):
        validate_config(config)


def test_readers_need_no_tensorflow(tmp_path, monkeypatch):
    _write_cifar10(tmp_path / "cifar10")
    _write_svhn(tmp_path / "svhn", "test")
    for module in ("tensorflow", "tensorflow_datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` now fails, as if absent.
    assert data.load_dataset("cifar10", "train", data_dir=str(tmp_path)).num_examples == 15
    assert data.load_dataset("svhn", "test", data_dir=str(tmp_path)).num_examples == 5
    with pytest.raises(ImportError) as info:
        data.load_dataset("cifar100", "train", source="tfds")
    assert "pip install 'jax_memat[tfds]'" in str(info.value)
    # auto: neither files nor tfds; the message has both hints.
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset("cifar100", "train", data_dir=str(tmp_path))
    assert "cifar-100-binary.tar.gz" in str(info.value)
    assert "pip install 'jax_memat[tfds]'" in str(info.value)


def test_tfds_without_importlib_resources_asks_for_the_extra(monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setitem(sys.modules, "importlib_resources", None)
    with pytest.raises(ImportError, match=r"pip install 'jax_memat\[tfds\]'") as info:
        data.load_dataset("cifar10", "test", source="tfds")
    assert "importlib_resources" in str(info.value)


def test_provenance_is_logged(tmp_path, caplog):
    _write_svhn(tmp_path, "test")
    with caplog.at_level(logging.INFO):
        ds = data.load_dataset("svhn", "test", data_dir=str(tmp_path))
        synthetic = data.load_dataset("synthetic", "test", num_examples=3, seed=1)
    assert ds.source and ds.source in caplog.text
    assert synthetic.source == (
        "synthetic test: 3 examples generated from seed 1 (8x8x1 images, 10 classes)"
    )
    assert synthetic.source in caplog.text
    with pytest.raises(ValueError, match="Dataset.source must be a str"):
        data.Dataset(ds.images, ds.labels, 10, "svhn", None)


# ------------------------------------------------------------------------------ tfds


@pytest.mark.parametrize(
    "name, tfds_name, classes",
    [("cifar10", "cifar10", 10), ("cifar100", "cifar100", 100), ("svhn", "svhn_cropped", 10)],
)
def test_tfds_mock_data(tmp_path, name, tfds_name, classes):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=9):
        for split in ("train", "test"):
            ds = data.load_dataset(name, split, source="tfds", num_examples=9)
            assert ds.images.shape == (9, 32, 32, 3) and ds.images.dtype == np.uint8
            assert ds.labels.dtype == np.int32 and ds.labels.max() < classes
            assert ds.num_classes == classes and ds.name == name
            assert ds.source.startswith(f"{name} {split}: the first 9 examples through tfds")
            assert repr(tfds_name) in ds.source
        # auto: no files (data_dir is empty), so tfds.
        ds = data.load_dataset(name, "test", data_dir=str(tmp_path))
        assert "through tfds" in ds.source and ds.num_examples == 9


def test_auto_prefers_files_over_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    arrays = _write_cifar10(tmp_path)
    with tfds.testing.mock_data(num_examples=2):  # tfds would give 2 random examples.
        ds = data.load_dataset("cifar10", "test", data_dir=str(tmp_path))
    np.testing.assert_array_equal(ds.labels, arrays["test"][1])
    assert "binary version" in ds.source


def _fake_download(monkeypatch, tfds, files):
    """Serves local files in place of tfds' downloads (URL basename -> local path)."""

    def resolve(url):
        return files[url.rsplit("/", 1)[-1]]

    def download(self, urls):
        return {k: resolve(u) for k, u in urls.items()} if isinstance(urls, dict) else resolve(urls)

    monkeypatch.setattr(tfds.download.DownloadManager, "download", download)
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download)


def _as_set(ds):
    return sorted(zip(ds.labels.tolist(), (img.tobytes() for img in ds.images), strict=True))


def test_tfds_prepares_from_official_files(tmp_path, monkeypatch):
    """tfds' own builders, run on official-format files, give what the native readers give.

    This runs tfds' download-and-prepare path (all but the HTTP transfer), so a
    module it needs that the `tfds` extra does not install fails here.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    src = tmp_path / "src"
    _write_cifar10(src / "c10", n=2)
    _write_cifar100(src / "c100", n=3)
    for split, seed in (("train", 1), ("test", 2), ("extra", 3)):
        _write_svhn(src / "svhn", split, n=3, seed=seed)
    # The CIFAR builders extract their archive: serve the extracted folder's parent.
    served = {"cifar-10-binary.tar.gz": src / "c10", "cifar-100-binary.tar.gz": src / "c100"}
    for split in ("train", "test", "extra"):
        served[f"{split}_32x32.mat"] = src / "svhn" / f"{split}_32x32.mat"
    _fake_download(monkeypatch, tfds, {url: str(path) for url, path in served.items()})
    tfds_dir = tmp_path / "tfds"
    tfds_dir.mkdir()
    local = {"cifar10": src / "c10", "cifar100": src / "c100", "svhn": src / "svhn"}
    for name, folder in local.items():
        for split in ("train", "test"):
            prepared = data.load_dataset(name, split, data_dir=str(tfds_dir), source="tfds")
            native = data.load_dataset(name, split, data_dir=str(folder), source="files")
            assert prepared.num_examples == native.num_examples > 0
            # The same examples; tfds stores them in another (hashed-key) order.
            assert _as_set(prepared) == _as_set(native)
            assert str(tfds_dir) in prepared.source
