"""Tests of mcu_jax.data: loaders on small files in the real layouts, splits, transforms and
batching. CPU only and fast; the real CIFAR-10 file is used only when present."""

from __future__ import annotations

import io
import os
import pickle
import re
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mcu_jax.data import (
    DATASETS,
    Dataset,
    Split,
    augment,
    epoch_batches,
    eval_batches,
    load_dataset,
    make_split,
    normalize,
    prepare_batch,
    subsample,
    to_device,
)
from mcu_jax.data.datasets import CIFAR10_CLASSES, ENV_DATA_DIR


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    """Tests choose their own folders; an MCU_JAX_DATA_DIR of the caller must not leak in."""
    monkeypatch.delenv(ENV_DATA_DIR, raising=False)


# --------------------------------------------------------------------------------------------
# Helpers writing small files in the real layouts
# --------------------------------------------------------------------------------------------


def _color(i: int) -> tuple[int, int, int]:
    """A distinct, JPEG-stable colour per index (multiples of 40 survive compression)."""
    return (40 * (i % 6) + 20, 40 * ((i // 6) % 6) + 20, 40 * ((i // 36) % 6) + 20)


def _jpeg(color, size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_cifar10_npz(path: Path, labels, is_test) -> None:
    blobs = [_jpeg(_color(i)) for i in range(len(labels))]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(path, jpeg=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
             labels=np.asarray(labels, np.uint8), is_test=np.asarray(is_test, bool))


def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _pickle_bytes(d: dict) -> bytes:
    return pickle.dumps(d, protocol=2)


def _cifar10_members(per_batch: int = 3) -> tuple[dict[str, bytes], np.ndarray, np.ndarray]:
    """Pickles of cifar-10-batches-py (5 train batches + test) and the expected train arrays."""
    members, xs, ys = {}, [], []
    for b in range(1, 6):
        rows = _cifar_rows(per_batch, b)
        labels = [(b + j) % 10 for j in range(per_batch)]
        members[f"data_batch_{b}"] = _pickle_bytes(
            {b"batch_label": b"x", b"data": rows, b"labels": labels, b"filenames": []})
        xs.append(rows)
        ys += labels
    members["test_batch"] = _pickle_bytes(
        {b"data": _cifar_rows(4, 9), b"labels": [0, 1, 2, 3]})
    members["batches.meta"] = _pickle_bytes(
        {b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_vis": 3072})
    x = np.concatenate(xs).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return members, x, np.asarray(ys, np.int32)


def _cifar100_members() -> dict[str, bytes]:
    return {
        "train": _pickle_bytes({b"data": _cifar_rows(6, 1), b"fine_labels": [0, 5, 99, 3, 3, 7],
                                b"coarse_labels": [0] * 6}),
        "test": _pickle_bytes({b"data": _cifar_rows(2, 2), b"fine_labels": [1, 42],
                               b"coarse_labels": [0, 0]}),
        "meta": _pickle_bytes({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                               b"coarse_label_names": []}),
    }


def _write_folder(folder: Path, members: dict[str, bytes]) -> None:
    folder.mkdir(parents=True)
    for name, data in members.items():
        (folder / name).write_bytes(data)


def _write_tarball(path: Path, prefix: str, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------------------------
# digits (the default)
# --------------------------------------------------------------------------------------------


def test_digits_shapes_split_and_stability():
    ds = load_dataset()
    assert ds.name == "digits" and "digits" in DATASETS
    assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert ds.num_classes == 10 and ds.augment == "none"
    assert ds.x_train.max() == 255 and ds.x_train.min() == 0
    # stratified 80/20: every class keeps ~80% of its samples in train
    n_tr, n_te = np.bincount(ds.y_train, minlength=10), np.bincount(ds.y_test, minlength=10)
    assert np.all(np.abs(n_tr / (n_tr + n_te) - 0.8) < 0.01)
    assert len(ds.mean) == len(ds.std) == 1
    assert ds.mean[0] == pytest.approx(ds.x_train.mean() / 255)
    # identical every time, also after the cache is dropped
    from mcu_jax.data.datasets import clear_cache

    clear_cache()
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    np.testing.assert_array_equal(again.y_test, ds.y_test)


def test_dataset_validation():
    x = np.zeros((4, 2, 2, 3), np.uint8)
    y = np.zeros(4, np.int32)
    ok = dict(name="t", x_train=x, y_train=y, x_test=x, y_test=y, num_classes=2,
              mean=(0.5,) * 3, std=(0.2,) * 3, augment="none")
    assert Dataset(**ok).image_shape == (2, 2, 3)
    bad = [
        ("x_train", dict(x_train=x.astype(np.float32))),
        ("y_train", dict(y_train=y.astype(np.int64))),
        ("x_test", dict(x_test=x[..., 0])),
        ("y_train", dict(y_train=y[:3])),
        ("num_classes", dict(num_classes=0)),
        ("y_test", dict(y_test=np.full(4, 2, np.int32))),
        ("mean", dict(mean=(0.5, 0.5))),
        ("std", dict(std=(0.2, 0.0, 0.2))),
        ("augment", dict(augment="flip")),
        ("class_names", dict(class_names=("a",))),
    ]
    for word, change in bad:
        with pytest.raises(ValueError, match=word):
            Dataset(**(ok | change))


def test_unknown_name_and_option():
    with pytest.raises(ValueError, match="cifar10.*digits|digits.*cifar10"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("cifar10", image_size=32)


# --------------------------------------------------------------------------------------------
# CIFAR-10 in every supported layout
# --------------------------------------------------------------------------------------------


def test_cifar10_npz(tmp_path, monkeypatch):
    labels = [3, 1, 4, 1, 5, 9, 2, 6]
    is_test = [False, True, False, False, True, False, False, True]
    _write_cifar10_npz(tmp_path / "cifar10_jpeg.npz", labels, is_test)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.x_train.shape == (5, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(ds.y_train, [3, 4, 1, 9, 2])
    np.testing.assert_array_equal(ds.y_test, [1, 5, 6])
    # file order kept: image i has colour _color(i)
    train_ids = [i for i, t in enumerate(is_test) if not t]
    for row, i in enumerate(train_ids):
        assert np.abs(ds.x_train[row].astype(int) - _color(i)).max() <= 3
    assert ds.augment == "crop_flip" and ds.class_names == CIFAR10_CLASSES
    assert not ds.x_train.flags.writeable  # cached arrays are protected
    # found through the environment variable as well (and served from the cache)
    monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path))
    assert load_dataset("cifar10") is ds


def test_cifar10_batches_folder_and_tarball(tmp_path):
    members, x_expected, y_expected = _cifar10_members()
    _write_folder(tmp_path / "a" / "cifar-10-batches-py", members)
    (tmp_path / "b").mkdir()
    _write_tarball(tmp_path / "b" / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    from_folder = load_dataset("cifar10", data_dir=tmp_path / "a")
    from_tar = load_dataset("cifar10", data_dir=tmp_path / "b")
    for ds in (from_folder, from_tar):
        assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
        np.testing.assert_array_equal(ds.x_train, x_expected)
        np.testing.assert_array_equal(ds.y_train, y_expected)
        np.testing.assert_array_equal(ds.y_test, [0, 1, 2, 3])
        assert ds.class_names == CIFAR10_CLASSES
    assert not any((tmp_path / "b").glob("cifar-10-batches-py*"))  # nothing extracted


def test_cifar_incomplete_folder_and_malicious_pickle(tmp_path):
    members, _, _ = _cifar10_members()
    del members["data_batch_3"]
    _write_folder(tmp_path / "cifar-10-batches-py", members)
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    members, _, _ = _cifar10_members()
    members["data_batch_1"] = pickle.dumps({b"data": Evil(), b"labels": []})
    _write_folder(tmp_path / "x" / "cifar-10-batches-py", members)
    with pytest.raises(ValueError, match="data_batch_1.*refusing"):
        load_dataset("cifar10", data_dir=tmp_path / "x")


def test_cifar_malformed_batch_and_truncated_tarball(tmp_path):
    members, _, _ = _cifar10_members()
    members["data_batch_2"] = _pickle_bytes({b"data": np.zeros((2, 100), np.uint8),
                                             b"labels": [0, 1]})
    _write_folder(tmp_path / "a" / "cifar-10-batches-py", members)
    with pytest.raises(ValueError, match=r"a/cifar-10-batches-py/data_batch_2.*\(N, 3072\)"):
        load_dataset("cifar10", data_dir=tmp_path / "a")
    members, _, _ = _cifar10_members()
    members["test_batch"] = _pickle_bytes({b"data": _cifar_rows(2, 0), b"labels": [0, 10]})
    _write_folder(tmp_path / "b" / "cifar-10-batches-py", members)
    with pytest.raises(ValueError, match="test_batch.*labels"):
        load_dataset("cifar10", data_dir=tmp_path / "b")
    members, _, _ = _cifar10_members()
    (tmp_path / "c").mkdir()
    tarball = tmp_path / "c" / "cifar-10-python.tar.gz"
    _write_tarball(tarball, "cifar-10-batches-py", members)
    tarball.write_bytes(tarball.read_bytes()[:-200])
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=tmp_path / "c")


def test_cifar100_folder_and_tarball(tmp_path):
    members = _cifar100_members()
    _write_folder(tmp_path / "a" / "cifar-100-python", members)
    (tmp_path / "b").mkdir()
    _write_tarball(tmp_path / "b" / "cifar-100-python.tar.gz", "cifar-100-python", members)
    for sub in ("a", "b"):
        ds = load_dataset("cifar100", data_dir=tmp_path / sub)
        assert ds.num_classes == 100 and ds.x_train.shape == (6, 32, 32, 3)
        np.testing.assert_array_equal(ds.y_train, [0, 5, 99, 3, 3, 7])
        np.testing.assert_array_equal(ds.y_test, [1, 42])
        np.testing.assert_array_equal(
            ds.x_test, _cifar_rows(2, 2).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        assert ds.class_names[42] == "c42" and ds.augment == "crop_flip"


# --------------------------------------------------------------------------------------------
# Errors: nothing found, corrupt files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("cifar10", ["cifar10_jpeg.npz", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                 "tensorflow-datasets", "shared/data", "https://www.cs.toronto.edu/~kriz/"]),
    ("cifar100", ["cifar-100-python", "cifar-100-python.tar.gz", "tensorflow-datasets",
                  "https://www.cs.toronto.edu/~kriz/"]),
    ("tiny_imagenet", ["tiny-imagenet-200", "wnids.txt", "tiny-imagenet-200.zip"]),
    ("imagenet100", ["imagenet100", "imagenet-100", "image-net.org"]),
])
def test_not_found_names_every_place(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, data_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and ENV_DATA_DIR in msg
    for word in expected:
        assert word in msg, (word, msg)
    if name == "cifar10":
        for f in ("cifar10_jpeg.npz", "cifar-10-batches-py", "cifar-10-python.tar.gz"):
            assert str(tmp_path / f) in msg
    assert list(tmp_path.iterdir()) == []  # nothing written to data_dir


def test_not_found_without_any_folder(tmp_path_factory):
    with pytest.raises(FileNotFoundError, match=f"no data_dir given and \\${ENV_DATA_DIR}"):
        load_dataset("tiny_imagenet")
    a_file = tmp_path_factory.mktemp("d") / "cifar10_jpeg.npz"
    a_file.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file: data_dir names the folder"):
        load_dataset("tiny_imagenet", data_dir=a_file)


def test_corrupt_npz(tmp_path):
    path = tmp_path / "cifar10_jpeg.npz"
    _write_cifar10_npz(path, [0, 1, 2, 3], [False, False, True, True])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cifar10_jpeg.npz"):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("change, word", [
    (dict(offsets=np.array([0, 5], np.int64)), "offsets"),
    (dict(is_test=np.zeros(3, bool)), "is_test"),
    (dict(labels=np.array([0, 1, 12, 3], np.uint8)), "labels"),
    (dict(jpeg=np.zeros(10, np.uint8), offsets=np.array([0, 2, 4, 6, 10])), "cannot decode"),
])
def test_malformed_npz(tmp_path, change, word):
    arrays = dict(jpeg=np.frombuffer(b"".join(_jpeg(_color(i)) for i in range(4)), np.uint8),
                  labels=np.array([0, 1, 2, 3], np.uint8), is_test=np.array([0, 0, 1, 1], bool))
    arrays["offsets"] = np.array([0] + [len(_jpeg(_color(i))) for i in range(4)]).cumsum()
    np.savez(tmp_path / "cifar10_jpeg.npz", **(arrays | change))
    with pytest.raises(ValueError, match=word) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "cifar10_jpeg.npz" in str(info.value)


def test_npz_missing_array(tmp_path):
    np.savez(tmp_path / "cifar10_jpeg.npz", jpeg=np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="offsets"):
        load_dataset("cifar10", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# Tiny ImageNet and ImageNet-100 folder layouts
# --------------------------------------------------------------------------------------------


def _save(path: Path, color, size=(64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG", quality=95)


def test_tiny_imagenet(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n0300", "n0100", "n0200"]  # unsorted on purpose: index = sorted position
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for k, w in enumerate(wnids):
        for j in range(2):
            _save(root / "train" / w / "images" / f"{w}_{j}.JPEG", _color(10 * k + j))
    ann = [("val_0.JPEG", "n0200"), ("val_1.JPEG", "n0100"), ("val_2.JPEG", "n0300")]
    for i, (f, _) in enumerate(ann):
        _save(root / "val" / "images" / f, _color(50 + i))
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in ann))
    Image.new("L", (64, 64), 7).save(root / "train" / "n0100" / "images" / "n0100_2.JPEG")

    ds = load_dataset("tiny_imagenet", data_dir=tmp_path)
    assert ds.x_train.shape == (7, 64, 64, 3) and ds.x_test.shape == (3, 64, 64, 3)
    assert ds.num_classes == 3 and ds.class_names == ("n0100", "n0200", "n0300")
    np.testing.assert_array_equal(ds.y_train, [0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(ds.y_test, [1, 0, 2])
    assert np.abs(ds.x_test[0].astype(int) - _color(50)).max() <= 3
    assert np.abs(ds.x_train[2].astype(int) - 7).max() <= 1  # greyscale converted to RGB
    assert ds.augment == "crop_flip" and len(ds.mean) == 3


def test_tiny_imagenet_wrong_size(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    root.mkdir()
    (root / "wnids.txt").write_text("n1\n")
    _save(root / "train" / "n1" / "images" / "a.JPEG", (1, 2, 3), size=(32, 32))
    _save(root / "val" / "images" / "v.JPEG", (1, 2, 3))
    (root / "val" / "val_annotations.txt").write_text("v.JPEG\tn1\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="a.JPEG.*expected \\(64, 64\\)"):
        load_dataset("tiny_imagenet", data_dir=tmp_path)


def test_imagenet100_class_folders(tmp_path):
    root = tmp_path / "imagenet100"
    classes = ["n02", "n01", "n03"]
    sizes = [(40, 30), (20, 50), (16, 16)]
    for k, c in enumerate(classes):
        for split, count in (("train", 2), ("val", 1)):
            for j in range(count):
                _save(root / split / c / f"{j}.JPEG", _color(k), size=sizes[(k + j) % 3])
    (root / "train" / "n01" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="num_classes=100"):
        load_dataset("imagenet100", data_dir=tmp_path)
    ds = load_dataset("imagenet100", data_dir=tmp_path, image_size=12, num_classes=None)
    assert ds.x_train.shape == (6, 12, 12, 3) and ds.x_test.shape == (3, 12, 12, 3)
    assert ds.class_names == ("n01", "n02", "n03") and ds.num_classes == 3
    np.testing.assert_array_equal(ds.y_train, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(ds.y_test, [0, 1, 2])
    assert np.abs(ds.x_test[1].astype(int) - _color(0)).max() <= 4  # class n02 had colour 0
    assert load_dataset("imagenet100", data_dir=tmp_path, image_size=8,
                        num_classes=3).x_train.shape == (6, 8, 8, 3)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagenet100", data_dir=tmp_path, image_size=0, num_classes=None)


def test_imagenet100_center_crop(tmp_path):
    root = tmp_path / "imagenet100"
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    img.paste((255, 0, 0), (20, 0, 40, 20))  # red middle third: the center crop keeps it
    for split in ("train", "val"):
        (root / split / "c").mkdir(parents=True)
        img.save(root / split / "c" / "x.png")
    ds = load_dataset("imagenet100", data_dir=tmp_path, image_size=10, num_classes=None)
    assert ds.x_train.shape == (1, 10, 10, 3)
    assert ds.x_train[0, :, 2:8, 0].min() > 200 and ds.x_train[0, :, 2:8, 2].max() < 50


# --------------------------------------------------------------------------------------------
# tensorflow-datasets (mock data, no TensorFlow needed)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_tfds_mock(tmp_path, name, classes):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        ds = load_dataset(name, data_dir=tmp_path)
    assert ds.x_train.shape == (6, 32, 32, 3) and ds.x_test.shape == (6, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert ds.num_classes == classes and ds.y_train.max() < classes


# --------------------------------------------------------------------------------------------
# The real CIFAR-10 file (skipped when absent)
# --------------------------------------------------------------------------------------------


# read at import, before the autouse fixture clears it for the other tests
_ORIGINAL_ENV_DIR = os.environ.get(ENV_DATA_DIR, "")


def test_real_cifar10():
    dirs = [Path(p) for p in _ORIGINAL_ENV_DIR.split(os.pathsep) if p.strip()]
    dirs.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    found = [d for d in dirs if (d / "cifar10_jpeg.npz").is_file()]
    if not found:
        pytest.skip(
            f"cifar10_jpeg.npz not found in {[str(d) for d in dirs]}: copy it from the "
            f"project's shared/data folder (or set {ENV_DATA_DIR} to its folder)"
        )
    ds = load_dataset("cifar10", data_dir=found[0])
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(ds.y_train, minlength=10), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=10), [1000] * 10)
    mean = ds.x_train[::10].reshape(-1, 3).mean(0) / 255  # rows are sorted by class
    assert np.allclose(mean, ds.mean, atol=0.01)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _toy(num_classes=4, per_class_train=20, per_class_test=10, present=None) -> Dataset:
    present = list(range(num_classes)) if present is None else present
    y_tr = np.repeat(np.asarray(present, np.int32), per_class_train)
    y_te = np.repeat(np.arange(num_classes, dtype=np.int32), per_class_test)
    return Dataset(name="toy", x_train=np.zeros((len(y_tr), 2, 2, 1), np.uint8), y_train=y_tr,
                   x_test=np.zeros((len(y_te), 2, 2, 1), np.uint8), y_test=y_te,
                   num_classes=num_classes, mean=(0.5,), std=(0.25,), augment="none")


def _check_partition(split: Split, ds: Dataset) -> None:
    for f in ("forget", "retain", "retain_subset", "val", "test", "test_forget", "test_retain"):
        a = getattr(split, f)
        assert a.dtype == np.int64 and a.ndim == 1 and np.all(np.diff(a) > 0), f
    n, m = len(ds.y_train), len(ds.y_test)
    np.testing.assert_array_equal(np.union1d(split.forget, split.retain), np.arange(n))
    assert len(np.intersect1d(split.forget, split.retain)) == 0
    assert np.all(np.isin(split.retain_subset, split.retain))
    np.testing.assert_array_equal(np.union1d(split.val, split.test), np.arange(m))
    assert len(np.intersect1d(split.val, split.test)) == 0


def test_random_split_sizes_and_stratified_val():
    ds = load_dataset("digits")
    s = make_split(ds)
    _check_partition(s, ds)
    assert len(s.forget) == round(0.1 * 1437) == 144 and len(s.retain) == 1293
    assert len(s.retain_subset) == 647  # round-half-up of 646.5
    assert s.scenario == "random" and s.forget_class is None and s.seed == 0
    per_class = np.bincount(ds.y_test, minlength=10)
    np.testing.assert_array_equal(np.bincount(ds.y_test[s.val], minlength=10),
                                  np.floor(0.1 * per_class + 0.5).astype(int))
    assert len(s.test_forget) == len(s.test_retain) == 0
    assert "forget 144" in s.summary() and "val 40" in s.summary()  # ~36 per class -> 4 each


def test_split_reproducible_and_seed_dependent():
    ds = load_dataset("digits")
    a, b = make_split(ds, seed=3), make_split(ds, seed=3)
    c = make_split(ds, seed=4)
    for f in ("forget", "retain_subset", "val"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
        assert not np.array_equal(getattr(a, f), getattr(c, f))
    # the val/test split does not depend on the scenario
    np.testing.assert_array_equal(make_split(ds, "class", seed=3).val, a.val)


def test_class_split():
    ds = load_dataset("digits")
    s = make_split(ds, "class", forget_class=7, retain_ratio=1.0, seed=1)
    _check_partition(s, ds)
    np.testing.assert_array_equal(s.forget, np.flatnonzero(ds.y_train == 7))
    np.testing.assert_array_equal(s.retain_subset, s.retain)
    assert np.all(ds.y_test[s.test_forget] == 7) and np.all(ds.y_test[s.test_retain] != 7)
    np.testing.assert_array_equal(np.union1d(s.test_forget, s.test_retain), s.test)
    assert len(s.test_forget) > 0 and s.forget_class == 7 and "class 7" in s.summary()


def test_class_choice_from_seed():
    ds = _toy(num_classes=10, per_class_train=3, per_class_test=10)
    chosen = [make_split(ds, "class", seed=k).forget_class for k in range(20)]
    assert chosen == [make_split(ds, "class", seed=k).forget_class for k in range(20)]
    assert len(set(chosen)) > 2 and all(0 <= c < 10 for c in chosen)
    # only classes that have training samples are chosen
    sparse = _toy(num_classes=4, present=[1, 3])
    assert {make_split(sparse, "class", seed=k).forget_class for k in range(10)} == {1, 3}


@pytest.mark.parametrize("kwargs, word", [
    (dict(scenario="sometimes"), "scenario='sometimes'"),
    (dict(forget_ratio=0.0), "forget_ratio=0.0"),
    (dict(forget_ratio=1.0), "forget_ratio=1.0"),
    (dict(forget_ratio=float("nan")), "forget_ratio=nan"),
    (dict(forget_ratio="0.1"), "forget_ratio='0.1'"),
    (dict(val_ratio=0), "val_ratio=0"),
    (dict(val_ratio=1.5), "val_ratio=1.5"),
    (dict(retain_ratio=0), "retain_ratio=0"),
    (dict(retain_ratio=1.01), "retain_ratio=1.01"),
    (dict(scenario="class", forget_class=4), "forget_class=4"),
    (dict(scenario="class", forget_class=-1), "forget_class=-1"),
    (dict(scenario="class", forget_class=1.0), "forget_class=1.0"),
    (dict(forget_class=1), "forget_class=1.*random"),
    (dict(seed=-1), "seed=-1"),
    (dict(forget_ratio=0.001), "forget_ratio=0.001.*0 to forget"),
    (dict(forget_ratio=0.999), "forget_ratio=0.999"),
    (dict(val_ratio=0.01), "val_ratio=0.01"),
    (dict(retain_ratio=0.001), "retain_ratio=0.001"),
])
def test_split_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_split(_toy(), **kwargs)


def test_split_refuses_retain_overlapping_forget():
    """A Split whose D_r shares samples with D_f (made by hand or with dataclasses.replace) is
    refused when it is made, naming how many and one of them."""
    import dataclasses

    s = make_split(_toy())
    both = np.sort(np.concatenate([s.retain, s.forget[:2]]))
    with pytest.raises(ValueError, match=rf"retain and Split\.forget share 2 indices "
                                         rf"\(e\.g\. {s.forget[0]}\); D_r and D_f"):
        dataclasses.replace(s, retain=both)


def test_split_degenerate_forget_sets():
    with pytest.raises(ValueError, match="forget_class=2 has no training samples"):
        make_split(_toy(present=[0, 1, 3]), "class", forget_class=2)
    with pytest.raises(ValueError, match="forget_class=0 holds every training sample"):
        make_split(_toy(num_classes=2, present=[0]), "class", forget_class=0)


# --------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------


def _indexed(labels_train, labels_test) -> Dataset:
    """A data set whose every image stores its own index (two pixels: high and low byte)."""
    def images(n):
        i = np.arange(n)
        return np.stack([i // 256, i % 256], axis=1).astype(np.uint8).reshape(n, 1, 2, 1)
    y_tr, y_te = np.asarray(labels_train, np.int32), np.asarray(labels_test, np.int32)
    return Dataset(name="indexed", x_train=images(len(y_tr)), y_train=y_tr,
                   x_test=images(len(y_te)), y_test=y_te, num_classes=3, mean=(0.3,),
                   std=(0.2,), augment="crop_flip")


def _kept(x: np.ndarray) -> np.ndarray:
    return x[:, 0, 0, 0].astype(int) * 256 + x[:, 0, 1, 0]


def test_subsample_keeps_each_class_share_in_order():
    # 600 / 300 / 100 training images; a subset of 101 keeps 60.6 / 30.3 / 10.1 -> the one
    # image left after the floors goes to class 0, the largest remainder.
    ds = _indexed(np.repeat([0, 1, 2], [600, 300, 100]), np.tile([0, 1, 2], 100))
    sub = subsample(ds, train_size=101, test_size=30)
    np.testing.assert_array_equal(np.bincount(sub.y_train, minlength=3), [61, 30, 10])
    np.testing.assert_array_equal(np.bincount(sub.y_test, minlength=3), [10, 10, 10])
    for part in ("train", "test"):
        idx = _kept(getattr(sub, f"x_{part}"))
        assert np.all(np.diff(idx) > 0), part  # distinct images in their original order
        np.testing.assert_array_equal(getattr(sub, f"y_{part}"), getattr(ds, f"y_{part}")[idx])
    assert (sub.mean, sub.std, sub.augment, sub.num_classes) == (ds.mean, ds.std, ds.augment, 3)


def test_subsample_seeded_and_whole_sets_untouched():
    ds = _indexed(np.repeat([0, 1, 2], 50), np.repeat([0, 1, 2], 20))
    a, b = subsample(ds, 60, seed=1), subsample(ds, 60, seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, subsample(ds, 60, seed=2).x_train)
    assert a.x_test is ds.x_test  # test_size None keeps the test set
    assert subsample(ds) is ds and subsample(ds, 150, 60) is ds


@pytest.mark.parametrize("kwargs, word", [
    ({"train_size": 151}, "train_size=151 but 'indexed' has 150"),
    ({"test_size": 61}, "test_size=61 but 'indexed' has 60"),
    ({"train_size": 0}, "train_size must be an int >= 1, got 0"),
    ({"test_size": True}, "test_size must be an int >= 1, got True"),
    ({"train_size": 10, "seed": -1}, "seed must be an int >= 0"),
])
def test_subsample_bad_sizes(kwargs, word):
    ds = _indexed(np.repeat([0, 1, 2], 50), np.repeat([0, 1, 2], 20))
    with pytest.raises(ValueError, match=re.escape(word)):
        subsample(ds, **kwargs)


def test_problem_subset_is_the_same_for_every_seed_and_split_inside():
    from mcu_jax import config, problem

    a = problem.build(problem.ProblemConfig(train_size=500, test_size=100, seed=0))
    b = problem.build(problem.ProblemConfig(train_size=500, test_size=100, seed=1))
    assert a.dataset.num_train == 500 and a.dataset.num_test == 100
    np.testing.assert_array_equal(a.dataset.x_train, b.dataset.x_train)
    assert not np.array_equal(a.split.forget, b.split.forget)
    _check_partition(a.split, a.dataset)
    assert len(a.split.forget) == 50 and a.train.num_examples == 500
    # theta_o's metadata stores the problem as a dict; the CLI rebuilds the same subset from it.
    assert problem.ProblemConfig(**config.to_dict(a.config)) == a.config
    with pytest.raises(ValueError, match="train_size must be an int >= 1, got 0"):
        problem.ProblemConfig(train_size=0)


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def _images(b=16, h=8, w=8, c=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (b, h, w, c), dtype=np.uint8)


def test_normalize():
    x = _images()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    y = normalize(x, mean, std)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, (x / 255.0 - np.array(mean)) / np.array(std), rtol=1e-5,
                               atol=1e-5)
    assert normalize(x, mean, std, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="uint8"):
        normalize(x.astype(np.float32), mean, std)
    with pytest.raises(ValueError, match="mean"):
        normalize(x, (0.5,) * 2, std)


def test_augment_none_and_errors():
    x = jnp.asarray(_images())
    assert augment(jax.random.key(0), x, "none") is x
    with pytest.raises(ValueError, match="kind='rotate'"):
        augment(jax.random.key(0), x, "rotate")
    with pytest.raises(ValueError, match="shape"):
        augment(jax.random.key(0), x[0], "crop_flip")


def test_crop_flip_is_a_real_crop_of_the_padded_image():
    x = _images(b=32)
    aug = jax.jit(augment, static_argnames="kind")
    y = np.asarray(aug(jax.random.key(1), jnp.asarray(x), "crop_flip"))
    assert y.shape == x.shape and y.dtype == np.uint8
    np.testing.assert_array_equal(y, aug(jax.random.key(1), jnp.asarray(x), "crop_flip"))
    assert not np.array_equal(y, aug(jax.random.key(2), jnp.asarray(x), "crop_flip"))
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    found = []
    for i in range(len(x)):
        matches = [(dy, dx, flip)
                   for dy in range(9) for dx in range(9) for flip in (False, True)
                   if np.array_equal(y[i], (lambda c: c[:, ::-1] if flip else c)(
                       padded[i, dy:dy + 8, dx:dx + 8]))]
        assert matches, f"sample {i} is not a (flipped) crop of its padded image"
        found.append(matches[0])
    assert {f for _, _, f in found} == {False, True}  # both flips happen
    assert len({(dy, dx) for dy, dx, _ in found}) > 5  # offsets vary per sample
    # any batch size, including 1
    assert augment(jax.random.key(0), jnp.asarray(x[:1]), "crop_flip").shape == (1, 8, 8, 3)


def test_prepare_batch():
    x = jnp.asarray(_images())
    mean, std = (0.5,) * 3, (0.25,) * 3
    np.testing.assert_array_equal(prepare_batch(None, x, mean, std, "crop_flip", train=False),
                                  normalize(x, mean, std))
    key = jax.random.key(3)
    np.testing.assert_array_equal(prepare_batch(key, x, mean, std, "crop_flip", train=True),
                                  normalize(augment(key, x, "crop_flip"), mean, std))
    np.testing.assert_array_equal(prepare_batch(key, x, mean, std, "none", train=True),
                                  normalize(x, mean, std))
    jitted = jax.jit(prepare_batch, static_argnames=("kind", "train", "dtype"))
    np.testing.assert_allclose(jitted(key, x, mean, std, "crop_flip", True),
                               prepare_batch(key, x, mean, std, "crop_flip", train=True),
                               atol=1e-6)  # XLA may fuse the arithmetic differently
    with pytest.raises(ValueError, match="key=None"):
        prepare_batch(None, x, mean, std, "crop_flip", train=True)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def test_to_device():
    x, y = _images(b=5), np.arange(5, dtype=np.int64)
    dx, dy = to_device(x, y)
    assert isinstance(dx, jax.Array) and dx.dtype == jnp.uint8 and dy.dtype == jnp.int32
    np.testing.assert_array_equal(dy, y)
    with pytest.raises(ValueError, match="shape"):
        to_device(x, y[:4])
    with pytest.raises(ValueError, match="labels must be integers.*float32"):
        to_device(x, y.astype(np.float32))  # 2.7 would silently become class 2


def test_epoch_batches_is_a_permutation():
    idx = np.arange(100, 164)  # 64 indices
    b = epoch_batches(jax.random.key(0), idx, 16)
    assert b.shape == (4, 16) and b.dtype == jnp.int32
    np.testing.assert_array_equal(np.sort(np.asarray(b).ravel()), idx)
    assert not np.array_equal(np.asarray(b).ravel(), idx)
    np.testing.assert_array_equal(b, epoch_batches(jax.random.key(0), idx, 16))
    assert not np.array_equal(b, epoch_batches(jax.random.key(1), idx, 16))
    # drop_remainder: 70 // 16 = 4 batches of distinct indices
    d = np.asarray(epoch_batches(jax.random.key(0), np.arange(70), 16))
    assert d.shape == (4, 16) and len(np.unique(d)) == 64
    # keep the remainder: the last batch wraps around to the start of the permutation
    k = np.asarray(epoch_batches(jax.random.key(0), np.arange(70), 16, drop_remainder=False))
    assert k.shape == (5, 16)
    np.testing.assert_array_equal(np.sort(k.ravel()[:70]), np.arange(70))
    np.testing.assert_array_equal(k.ravel()[70:], k.ravel()[:10])
    j = jax.jit(epoch_batches, static_argnames=("batch_size", "drop_remainder"))
    np.testing.assert_array_equal(j(jax.random.key(0), jnp.arange(70), 16), d)
    with pytest.raises(ValueError, match="batch_size=0"):
        epoch_batches(jax.random.key(0), idx, 0)
    with pytest.raises(ValueError, match="batch_size=100"):
        epoch_batches(jax.random.key(0), idx, 100)
    with pytest.raises(ValueError, match="non-empty"):
        epoch_batches(jax.random.key(0), np.zeros(0, np.int64), 4)


def test_eval_batches_cover_every_index_once():
    idx = np.array([5, 3, 9, 1, 7, 2, 8])
    full, rest = eval_batches(idx, 3)
    assert full.shape == (2, 3) and rest.shape == (1,)
    np.testing.assert_array_equal(np.concatenate([np.asarray(full).ravel(), rest]), idx)
    full, rest = eval_batches(idx, 7)
    assert full.shape == (1, 7) and rest.shape == (0,)
    full, rest = eval_batches(idx, 10)
    assert full.shape == (0, 10) and np.array_equal(rest, idx)
    with pytest.raises(ValueError, match="batch_size=-1"):
        eval_batches(idx, -1)
    with pytest.raises(ValueError, match="non-empty"):
        eval_batches(np.zeros(0, np.int32), 4)


def test_crop_offsets_cover_all_2p_plus_1_positions():
    """With padding 4 the row offset takes all 9 values 0..8, about equally often. Images
    of ones make a crop's zero rows (the padding) give its offset dy: dy < 4 leaves 4 - dy
    zero rows at the top, dy > 4 leaves dy - 4 at the bottom."""
    from mcu_jax.data.transforms import augment

    x = jnp.ones((2000, 8, 8, 1), jnp.uint8)
    y = np.asarray(augment(jax.random.key(0), x, "crop_flip"))
    zero_rows = (y[..., 0] == 0).all(axis=2)  # (B, 8)
    top = np.argmax(~zero_rows, axis=1)
    bottom = np.argmax(~zero_rows[:, ::-1], axis=1)
    dy = np.where(top > 0, 4 - top, 4 + bottom)
    counts = np.bincount(dy, minlength=9)
    assert counts.size == 9 and counts.min() > 2000 / 9 * 0.6, counts


def test_channel_stats_are_per_channel_population_moments():
    """The normalisation statistics: per-channel mean and population std on the [0, 1]
    scale, computed in chunks, equal numpy's over all pixels of each channel."""
    from mcu_jax.data.datasets import _channel_stats

    x = np.random.default_rng(0).integers(0, 256, size=(37, 5, 4, 3), dtype=np.uint8)
    x[..., 1] //= 4  # channels with clearly different moments
    mean, std = _channel_stats(x, chunk=8)
    pixels = x.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-9)
