"""Raw image data sets as uint8 NHWC arrays: `Dataset` and `load_dataset(name, data_dir)`.

Every loader returns the whole training and test set in host memory as ``uint8`` images of shape
``(N, H, W, C)`` and ``int32`` labels of shape ``(N,)``; normalisation and augmentation happen
later, on the device (see `mcu_jax.data.transforms`). Nothing is ever downloaded or written to
disk: files are looked up in ``data_dir`` (or, when that is None, in the folder(s) named by the
environment variable ``MCU_JAX_DATA_DIR``) and, for CIFAR, in a prepared tensorflow-datasets
directory. Decoded sets are cached in-process, keyed by the resolved file path, its size and
modification time, so a second `load_dataset` call is free. Cached arrays are read-only.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DATASETS", "ENV_DATA_DIR", "Dataset", "clear_cache", "load_dataset"]

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "tiny_imagenet", "imagenet100")
"""Names accepted by `load_dataset`; "digits" is the default (embedded in scikit-learn)."""

ENV_DATA_DIR = "MCU_JAX_DATA_DIR"
"""Environment variable searched when `load_dataset` gets ``data_dir=None`` (``os.pathsep``
separates several folders)."""

AUGMENTS = ("none", "crop_flip")
"""Training augmentations a `Dataset` may name (implemented in `transforms.augment`)."""

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# Per-channel statistics of the CIFAR training sets on the [0, 1] scale (the exact standard
# deviation over all training pixels, not the often-copied 0.2023/0.1994/0.2010).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image set held in host memory.

    Images are uint8 ``(N, H, W, C)``; labels int32 ``(N,)`` in ``[0, num_classes)``. ``mean``
    and ``std`` are per-channel statistics on the [0, 1] pixel scale used by
    `transforms.normalize`; ``augment`` names the training augmentation ("none" or "crop_flip").
    Equality is identity (the arrays are large); ``repr`` shows shapes only.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for field in ("x_train", "x_test"):
            x = getattr(self, field)
            if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype != np.uint8:
                raise ValueError(
                    f"Dataset {self.name!r}: {field} must be a uint8 numpy array of shape "
                    f"(N, H, W, C); got {_describe_array(x)}"
                )
        for field in ("y_train", "y_test"):
            y = getattr(self, field)
            if not isinstance(y, np.ndarray) or y.ndim != 1 or y.dtype != np.int32:
                raise ValueError(
                    f"Dataset {self.name!r}: {field} must be an int32 numpy array of shape (N,); "
                    f"got {_describe_array(y)}"
                )
        for xs, ys in (("x_train", "y_train"), ("x_test", "y_test")):
            nx, ny = len(getattr(self, xs)), len(getattr(self, ys))
            if nx != ny:
                raise ValueError(
                    f"Dataset {self.name!r}: {xs} has {nx} images but {ys} has {ny} labels; "
                    "expected equal lengths"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"Dataset {self.name!r}: x_train images have shape {self.x_train.shape[1:]} but "
                f"x_test images have shape {self.x_test.shape[1:]}; expected the same (H, W, C)"
            )
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int | np.integer):
            raise ValueError(
                f"Dataset {self.name!r}: num_classes must be an int; got {self.num_classes!r}"
            )
        if self.num_classes < 1:
            raise ValueError(
                f"Dataset {self.name!r}: num_classes must be >= 1; got {self.num_classes}"
            )
        object.__setattr__(self, "num_classes", int(self.num_classes))
        for field in ("y_train", "y_test"):
            y = getattr(self, field)
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(
                    f"Dataset {self.name!r}: {field} holds labels in [{y.min()}, {y.max()}]; "
                    f"expected labels in [0, {self.num_classes})"
                )
        channels = self.x_train.shape[-1]
        for field in ("mean", "std"):
            value = getattr(self, field)
            try:
                value = tuple(float(v) for v in value)
            except TypeError:
                raise ValueError(
                    f"Dataset {self.name!r}: {field} must be a sequence of {channels} floats; "
                    f"got {value!r}"
                ) from None
            if len(value) != channels:
                raise ValueError(
                    f"Dataset {self.name!r}: {field}={value} has {len(value)} entries; expected "
                    f"one per channel ({channels})"
                )
            object.__setattr__(self, field, value)
        if any(not s > 0 for s in self.std):
            raise ValueError(f"Dataset {self.name!r}: std={self.std} must be positive")
        if self.augment not in AUGMENTS:
            raise ValueError(
                f"Dataset {self.name!r}: augment={self.augment!r}; expected one of {AUGMENTS}"
            )
        if self.class_names is not None:
            names = tuple(str(n) for n in self.class_names)
            if len(names) != self.num_classes:
                raise ValueError(
                    f"Dataset {self.name!r}: class_names has {len(names)} entries; expected "
                    f"num_classes={self.num_classes}"
                )
            object.__setattr__(self, "class_names", names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"num_classes={self.num_classes}, augment={self.augment!r})"
        )


def _describe_array(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def _channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images on the [0, 1] scale, in chunks."""
    c = x.shape[-1]
    s = np.zeros(c, np.float64)
    s2 = np.zeros(c, np.float64)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].reshape(-1, c).astype(np.float64)
        s += part.sum(0)
        s2 += np.square(part).sum(0)
    n = max(x.size // c, 1)
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    return tuple(float(v) for v in mean / 255.0), tuple(float(v) for v in std / 255.0)


def _readonly(ds: Dataset) -> Dataset:
    for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        a.flags.writeable = False
    return ds


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def load_dataset(name: str = "digits", data_dir: str | os.PathLike | None = None,
                 **options: Any) -> Dataset:
    """Load the data set ``name`` (one of `DATASETS`) as a `Dataset`.

    ``data_dir`` is the folder holding the files (see each loader for the layouts); when None,
    the folder(s) in the environment variable ``MCU_JAX_DATA_DIR`` are searched instead. Options:
    "imagenet100" takes ``image_size`` (default 224) and ``num_classes`` (default 100, None to
    accept any number of class folders); the other sets take none. Raises ValueError for an
    unknown name/option or a malformed file, FileNotFoundError (naming every place looked and how
    to get the data) when nothing is found.
    """
    if name not in _LOADERS:
        raise ValueError(f"load_dataset: unknown name={name!r}; known data sets: {DATASETS}")
    loader, accepted = _LOADERS[name]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"load_dataset({name!r}): unknown option(s) {unknown}; accepted options: "
            f"{sorted(accepted) if accepted else 'none'}"
        )
    return loader(_roots(data_dir), **options)


def clear_cache() -> None:
    """Drop every decoded data set held by the in-process cache."""
    for fn in _CACHED:
        fn.cache_clear()


def _roots(data_dir: str | os.PathLike | None) -> list[Path]:
    """The folders to search: ``data_dir`` if given, else those in ``MCU_JAX_DATA_DIR``."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    env = os.environ.get(ENV_DATA_DIR, "")
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]


def _file_key(path: Path) -> tuple[str, int, int]:
    """Cache key of a file or folder: resolved path, size and modification time."""
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _not_found(name: str, roots: list[Path], places: list[str], tfds_note: str | None,
               hint: str) -> FileNotFoundError:
    lines = [f"load_dataset({name!r}): no data found. Looked for:"]
    if not roots:
        lines.append(f"  (no data_dir given and ${ENV_DATA_DIR} is not set: no folder searched)")
    for root in roots:
        if root.is_file():
            lines.append(f"  ({root} is a file: data_dir names the folder that holds the data)")
        elif not root.is_dir():
            lines.append(f"  (folder {root} does not exist)")
    lines += [f"  {p}" for p in places]
    if tfds_note is not None:
        lines.append(f"  {tfds_note}")
    lines.append(f"To get the data: {hint}")
    lines.append(f"Pass its folder as data_dir= or set ${ENV_DATA_DIR}.")
    return FileNotFoundError("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Image decoding helpers
# --------------------------------------------------------------------------------------------


def _open_image(src: bytes | Path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes | bytearray) else src)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode image {what}: {e}") from e
    return img


def _decode_fixed(src: bytes | Path, what: str, size: tuple[int, int]) -> np.ndarray:
    """Decode one image to RGB uint8 and check it is ``size`` = (H, W)."""
    img = _open_image(src, what)
    if img.mode != "RGB":
        img = img.convert("RGB")
    hw = (img.height, img.width)
    if hw != size:
        raise ValueError(f"image {what} has size {hw}; expected {size}")
    return np.frombuffer(img.tobytes(), np.uint8).reshape(*size, 3)  # faster than asarray


def _decode_resized(path: Path, image_size: int) -> np.ndarray:
    """Decode, resize the shorter side to ``image_size`` and center-crop a square."""
    from PIL import Image

    img = _open_image(path, str(path))
    if img.format == "JPEG":
        img.draft("RGB", (image_size, image_size))  # DCT-domain downscale, never below target
    img = img.convert("RGB")
    w, h = img.size
    scale = image_size / min(w, h)
    nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    return np.asarray(img, dtype=np.uint8)


def _decode_many(decode: Callable[[Any], np.ndarray], items: Sequence[Any],
                 shape: tuple[int, int, int]) -> np.ndarray:
    """Decode ``items`` into one preallocated uint8 array with a thread pool (Pillow frees the
    GIL while decoding, and the files are read from disk)."""
    out = np.empty((len(items), *shape), np.uint8)

    def work(start: int) -> None:
        for i in range(start, min(start + 512, len(items))):
            out[i] = decode(items[i])

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(0, len(items), 512)))
    return out


# --------------------------------------------------------------------------------------------
# digits (scikit-learn, embedded)
# --------------------------------------------------------------------------------------------


@functools.cache
def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # 0..16 -> 0..255
    y = d.target.astype(np.int32)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.2, random_state=0, stratify=y
    )
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    mean, std = _channel_stats(x[idx_train])
    return _readonly(Dataset(
        name="digits", x_train=x[idx_train], y_train=y[idx_train], x_test=x[idx_test],
        y_test=y[idx_test], num_classes=10, mean=mean, std=std, augment="none",
        class_names=tuple(str(i) for i in range(10)),
    ))


def _load_digits(roots: list[Path]) -> Dataset:
    """UCI optical digits from scikit-learn: 1797 8x8 grey images, a fixed stratified 80/20
    split (random_state=0), pixels 0..16 mapped to round(v * 255 / 16). No augmentation."""
    del roots
    return _digits()


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR "python version" files that only rebuilds numpy arrays, so a
    tampered pickle cannot run arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes written by Python 3 with protocol <= 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def _unpickle(fileobj: Any, what: str) -> dict:
    try:
        d = _ArrayUnpickler(fileobj, encoding="bytes").load()
    except Exception as e:  # any corruption: EOFError, UnpicklingError, ValueError...
        raise ValueError(f"cannot read CIFAR pickle {what}: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"CIFAR pickle {what} holds a {type(d).__name__}; expected a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_batch(d: dict, label_key: str, what: str,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images NHWC uint8, labels int32) of one unpickled CIFAR batch (rows are CHW 3x32x32)."""
    if "data" not in d or label_key not in d:
        raise ValueError(f"CIFAR pickle {what} lacks 'data' or {label_key!r}; has {sorted(d)}")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"CIFAR pickle {what}: 'data' is {_describe_array(data)}; expected uint8 (N, 3072)"
        )
    if labels.shape != (len(data),):
        raise ValueError(
            f"CIFAR pickle {what}: {label_key!r} has shape {labels.shape}; expected "
            f"({len(data)},)"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"CIFAR pickle {what}: {label_key!r} span [{labels.min()}, {labels.max()}]; "
            f"expected [0, {num_classes})"
        )
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), labels.astype(np.int32)


def _names(values: Any) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)


def _cifar_from_members(read: Callable[[str], dict], source: str, train: list[str],
                        test: list[str], label_key: str, meta: str, names_key: str, name: str,
                        num_classes: int, mean: tuple, std: tuple,
                        default_names: tuple[str, ...] | None) -> Dataset:
    """Assemble a CIFAR `Dataset` from the pickled members that ``read`` returns by name;
    ``source`` (folder or archive path) prefixes member names in error messages."""
    parts = [_cifar_batch(read(m), label_key, f"{source}/{m}", num_classes) for m in train]
    x_test, y_test = _cifar_batch(read(test[0]), label_key, f"{source}/{test[0]}", num_classes)
    names = default_names
    try:
        names = _names(read(meta)[names_key])
    except (KeyError, ValueError, FileNotFoundError):
        pass
    if names is not None and len(names) != num_classes:
        names = default_names
    return _readonly(Dataset(
        name=name, x_train=np.concatenate([p[0] for p in parts]),
        y_train=np.concatenate([p[1] for p in parts]), x_test=x_test, y_test=y_test,
        num_classes=num_classes, mean=mean, std=std, augment="crop_flip", class_names=names,
    ))


def _read_folder(folder: Path) -> Callable[[str], dict]:
    def read(member: str) -> dict:
        path = folder / member
        if not path.is_file():
            raise FileNotFoundError(path)
        with open(path, "rb") as f:
            return _unpickle(f, str(path))
    return read


def _checked_folder_reader(folder: Path, needed: list[str]) -> Callable[[str], dict]:
    missing = [m for m in needed if not (folder / m).is_file()]
    if missing:
        raise ValueError(f"CIFAR folder {folder} is incomplete: missing {missing}")
    return _read_folder(folder)


_CIFAR_SPECS = {
    "cifar10": dict(
        folder="cifar-10-batches-py", tarball="cifar-10-python.tar.gz",
        train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], label_key="labels",
        meta="batches.meta", names_key="label_names", num_classes=10,
        mean=CIFAR10_MEAN, std=CIFAR10_STD, default_names=CIFAR10_CLASSES,
    ),
    "cifar100": dict(
        folder="cifar-100-python", tarball="cifar-100-python.tar.gz",
        train=["train"], test=["test"], label_key="fine_labels",
        meta="meta", names_key="fine_label_names", num_classes=100,
        mean=CIFAR100_MEAN, std=CIFAR100_STD, default_names=None,
    ),
}


def _cifar_kwargs(name: str) -> dict:
    s = _CIFAR_SPECS[name]
    return {k: s[k] for k in ("train", "test", "label_key", "meta", "names_key", "num_classes",
                              "mean", "std", "default_names")} | {"name": name}


@functools.lru_cache(maxsize=8)
def _cifar_folder(name: str, key: tuple) -> Dataset:
    spec = _CIFAR_SPECS[name]
    folder = Path(key[0])
    read = _checked_folder_reader(folder, spec["train"] + spec["test"])
    return _cifar_from_members(read, str(folder), **_cifar_kwargs(name))


@functools.lru_cache(maxsize=8)
def _cifar_tarball(name: str, key: tuple) -> Dataset:
    spec = _CIFAR_SPECS[name]
    path = Path(key[0])
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"cannot open CIFAR archive {path}: {e}") from e
    with tar:
        try:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"CIFAR archive {path} is truncated or corrupt: {e}") from e
        prefix = spec["folder"] + "/"
        missing = [m for m in spec["train"] + spec["test"] if prefix + m not in members]
        if missing:
            raise ValueError(
                f"CIFAR archive {path} lacks {[prefix + m for m in missing]}; expected the "
                f"official {spec['tarball']}"
            )

        def read(member: str) -> dict:
            if prefix + member not in members:
                raise FileNotFoundError(member)
            what = f"{path}:{prefix + member}"
            try:
                f = tar.extractfile(members[prefix + member])
                data = f.read()
            except (tarfile.TarError, OSError, EOFError) as e:
                raise ValueError(f"cannot read {what}: {e}") from e
            return _unpickle(io.BytesIO(data), what)

        return _cifar_from_members(read, f"{path}:{spec['folder']}", **_cifar_kwargs(name))


@functools.lru_cache(maxsize=4)
def _cifar10_npz(key: tuple) -> Dataset:
    """Decode ``cifar10_jpeg.npz`` (JPEG bytes + offsets + labels + is_test), keeping file
    order within each split."""
    path = Path(key[0])
    wanted = ("jpeg", "offsets", "labels", "is_test")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError(f"holds a single {type(z).__name__}, not an npz archive")
        with z:
            files = list(z.files)
            missing = [k for k in wanted if k not in files]
            if not missing:
                buf, off, labels, is_test = (z[k] for k in wanted)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(
            f"cannot read {path} (truncated or corrupt npz?): {e}. Copy it again from the "
            "project's shared/data folder (sha256 in its README), or download "
            "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"
        ) from e
    if missing:
        raise ValueError(f"{path} lacks the array(s) {missing}; has {files}")
    n = len(labels)
    problems = []
    if buf.dtype != np.uint8 or buf.ndim != 1:
        problems.append(f"'jpeg' is {_describe_array(buf)}, expected 1-D uint8")
    if labels.ndim != 1:
        problems.append(f"'labels' has shape {labels.shape}, expected (N,)")
    if off.shape != (n + 1,) or not np.issubdtype(off.dtype, np.integer):
        problems.append(f"'offsets' is {_describe_array(off)}, expected integer ({n + 1},)")
    elif off[0] != 0 or off[-1] != buf.size or np.any(np.diff(off) <= 0):
        problems.append(
            f"'offsets' must increase strictly from 0 to len(jpeg)={buf.size}; "
            f"got {off[0]}..{off[-1]}"
        )
    if is_test.shape != (n,) or is_test.dtype != np.bool_:
        problems.append(f"'is_test' is {_describe_array(is_test)}, expected bool ({n},)")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        problems.append(f"'labels' span [{labels.min()}, {labels.max()}], expected [0, 9]")
    if problems:
        raise ValueError(f"{path} is malformed: " + "; ".join(problems))
    view = memoryview(buf)
    x = _decode_many(
        lambda i: _decode_fixed(bytes(view[off[i] : off[i + 1]]), f"{i} of {path}", (32, 32)),
        range(n), (32, 32, 3),
    )
    y = labels.astype(np.int32)
    return _readonly(Dataset(
        name="cifar10", x_train=x[~is_test], y_train=y[~is_test], x_test=x[is_test],
        y_test=y[is_test], num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD,
        augment="crop_flip", class_names=CIFAR10_CLASSES,
    ))


def _from_tfds(name: str, roots: list[Path], num_classes: int, mean: tuple, std: tuple,
               class_names: tuple[str, ...] | None) -> tuple[Dataset | None, str]:
    """:func:`_probe_tfds` with tensorflow-datasets' warnings about the folders it probes
    silenced: the error raised when nothing is found names every place looked."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        return _probe_tfds(name, roots, num_classes, mean, std, class_names)
    finally:
        absl.setLevel(level)


def _probe_tfds(name: str, roots: list[Path], num_classes: int, mean: tuple, std: tuple,
                class_names: tuple[str, ...] | None) -> tuple[Dataset | None, str]:
    """Try tensorflow-datasets (never downloading). Returns (dataset or None, note for errors).

    ``tfds.data_source`` (array_record / parquet preparations) needs no TensorFlow; a TFRecord
    preparation is read with ``tfds.load`` when TensorFlow is importable. The tfds data_dir is
    each searched folder, or tfds' own default (``TFDS_DATA_DIR`` / ~/tensorflow_datasets) when
    no folder is given.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return None, (f"tensorflow-datasets {name!r}: not installed "
                      "(pip install tensorflow-datasets)")
    errors = []
    for tfds_dir in [str(r) for r in roots] or [None]:
        where = tfds_dir or "its default data_dir"
        try:
            splits = tfds.data_source(name, split=["train", "test"], data_dir=tfds_dir,
                                      download=False)
            (x_tr, y_tr), (x_te, y_te) = (
                (np.stack([s[i]["image"] for i in range(len(s))]).astype(np.uint8),
                 np.asarray([s[i]["label"] for i in range(len(s))], np.int32))
                for s in splits
            )
        except Exception as e:  # not prepared, wrong format, ...: report and try the next way
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            prepared, builder_dir = _tfds_prepared(tfds, name, tfds_dir)
            if not prepared:
                errors.append(f"not prepared in {builder_dir or where}")
                continue
            try:
                import tensorflow  # noqa: F401
            except ImportError:
                errors.append(
                    f"{builder_dir} is prepared but unreadable without TensorFlow ({msg[:150]}); "
                    f"install tensorflow or run `tfds build {name} --file_format=array_record`"
                )
                continue
            try:
                tr, te = tfds.as_numpy(tfds.load(name, split=["train", "test"], data_dir=tfds_dir,
                                                 batch_size=-1, download=False))
                x_tr, y_tr = np.asarray(tr["image"], np.uint8), np.asarray(tr["label"], np.int32)
                x_te, y_te = np.asarray(te["image"], np.uint8), np.asarray(te["label"], np.int32)
            except Exception as e2:
                errors.append(f"{where}: {str(e2).strip()[:200]}")
                continue
        ds = Dataset(name=name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                     num_classes=num_classes, mean=mean, std=std, augment="crop_flip",
                     class_names=class_names)
        return _readonly(ds), ""
    return None, f"tensorflow-datasets {name!r} (download=False): " + "; ".join(errors)


def _tfds_prepared(tfds: Any, name: str, tfds_dir: str | None) -> tuple[bool, str | None]:
    """Whether tfds has ``name`` prepared in ``tfds_dir`` and the version folder it checked."""
    try:
        builder = tfds.builder(name, data_dir=tfds_dir)
        return bool(builder.is_prepared()), str(builder.data_dir)
    except Exception:
        return False, None


def _load_cifar(name: str, roots: list[Path]) -> Dataset:
    spec = _CIFAR_SPECS[name]
    places = []
    for root in roots:
        if name == "cifar10":
            npz = root / "cifar10_jpeg.npz"
            places.append(f"{npz} (the project's JPEG npz)")
            if npz.is_file():
                return _cifar10_npz(_file_key(npz))
        folder = root / spec["folder"]
        places.append(f"{folder}/ (official python version: {', '.join(spec['train'])}, "
                      f"{spec['test'][0]})")
        if folder.is_dir():
            return _cifar_folder(name, _file_key(folder))
        tarball = root / spec["tarball"]
        places.append(f"{tarball} (official archive, read without extracting)")
        if tarball.is_file():
            return _cifar_tarball(name, _file_key(tarball))
    ds, note = _from_tfds(name, roots, spec["num_classes"], spec["mean"], spec["std"],
                          spec["default_names"])
    if ds is not None:
        return ds
    url = "https://www.cs.toronto.edu/~kriz/cifar.html"
    if name == "cifar10":
        hint = (f"download cifar-10-python.tar.gz from {url} (extracting it is optional), "
                "or prepare the tensorflow-datasets 'cifar10' set, or copy a "
                "cifar10_jpeg.npz you have (the project's shared/data folder)")
    else:
        hint = (f"download cifar-100-python.tar.gz from {url} (extracting it is optional), or "
                "prepare the tensorflow-datasets 'cifar100' set")
    raise _not_found(name, roots, places, note, hint)


def _load_cifar10(roots: list[Path]) -> Dataset:
    """CIFAR-10, 32x32x3, 10 classes, 50000/10000 images. Looked for in each folder, in order:
    ``cifar10_jpeg.npz``, ``cifar-10-batches-py/``, ``cifar-10-python.tar.gz``; then
    tensorflow-datasets. Augmentation "crop_flip"."""
    return _load_cifar("cifar10", roots)


def _load_cifar100(roots: list[Path]) -> Dataset:
    """CIFAR-100 (fine labels), 32x32x3, 100 classes. Looked for as ``cifar-100-python/`` or
    ``cifar-100-python.tar.gz``, then tensorflow-datasets. Augmentation "crop_flip"."""
    return _load_cifar("cifar100", roots)


# --------------------------------------------------------------------------------------------
# Tiny ImageNet
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _tiny_imagenet(key: tuple) -> Dataset:
    root = Path(key[0])
    wnids_file, ann_file = root / "wnids.txt", root / "val" / "val_annotations.txt"
    for f in (wnids_file, ann_file):
        if not f.is_file():
            raise ValueError(f"Tiny ImageNet folder {root} is incomplete: missing {f}")
    listed = [w.strip() for w in wnids_file.read_text().splitlines() if w.strip()]
    if len(set(listed)) != len(listed) or not listed:
        raise ValueError(f"{wnids_file} must list distinct class ids; got {len(listed)} lines "
                         f"with {len(set(listed))} distinct")
    wnids = sorted(listed)
    index = {w: i for i, w in enumerate(wnids)}
    train_files, train_labels = [], []
    for w in wnids:
        folder = root / "train" / w / "images"
        if not folder.is_dir():
            raise ValueError(f"Tiny ImageNet folder {root} is incomplete: missing {folder}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        train_files += files
        train_labels += [index[w]] * len(files)
    test_files, test_labels = [], []
    for n, line in enumerate(ann_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 2 or cols[1] not in index:
            raise ValueError(f"{ann_file} line {n}: expected 'filename<TAB>wnid...' with a wnid "
                             f"from wnids.txt; got {line!r}")
        test_files.append(root / "val" / "images" / cols[0])
        test_labels.append(index[cols[1]])
    if not train_files or not test_files:
        raise ValueError(f"Tiny ImageNet folder {root}: found {len(train_files)} training and "
                         f"{len(test_files)} validation images; expected some of each")
    decode = lambda p: _decode_fixed(p, str(p), (64, 64))
    x_train = _decode_many(decode, train_files, (64, 64, 3))
    x_test = _decode_many(decode, test_files, (64, 64, 3))
    mean, std = _channel_stats(x_train)
    return _readonly(Dataset(
        name="tiny_imagenet", x_train=x_train, y_train=np.asarray(train_labels, np.int32),
        x_test=x_test, y_test=np.asarray(test_labels, np.int32), num_classes=len(wnids),
        mean=mean, std=std, augment="crop_flip", class_names=tuple(wnids),
    ))


def _load_tiny_imagenet(roots: list[Path]) -> Dataset:
    """Tiny ImageNet (64x64x3, 200 classes, 100000/10000 images, about 1.3 GB as uint8) from the
    standard ``tiny-imagenet-200/`` layout. Class index = position of the wnid in the SORTED
    ``wnids.txt`` (= sorted ``train/`` folder names, as torchvision's ImageFolder does); the
    labelled ``val/`` split is the test set. mean/std are computed from the training images.
    Augmentation "crop_flip" (4-pixel padding)."""
    places = []
    for root in roots:
        folder = root / "tiny-imagenet-200"
        places.append(f"{folder}/ (wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
                      "val/val_annotations.txt)")
        if folder.is_dir():
            return _tiny_imagenet(_file_key(folder))
    hint = ("download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into "
            "data_dir")
    raise _not_found("tiny_imagenet", roots, places, None, hint)


# --------------------------------------------------------------------------------------------
# ImageNet-100
# --------------------------------------------------------------------------------------------


def _class_folder_files(split_dir: Path) -> dict[str, list[Path]]:
    classes = sorted(p.name for p in split_dir.iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    return {c: sorted(p for p in (split_dir / c).iterdir()
                      if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
                      and not p.name.startswith("."))
            for c in classes}


@functools.lru_cache(maxsize=2)
def _imagenet100(key: tuple, image_size: int, num_classes: int | None) -> Dataset:
    root = Path(key[0])
    split_files = {}
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise ValueError(f"ImageNet-100 folder {root} is incomplete: missing {d}/")
        split_files[split] = _class_folder_files(d)
    classes = list(split_files["train"])
    if list(split_files["val"]) != classes:
        raise ValueError(
            f"ImageNet-100 folder {root}: train/ and val/ hold different class folders "
            f"({len(classes)} vs {len(split_files['val'])}); expected the same names"
        )
    if num_classes is not None and len(classes) != num_classes:
        raise ValueError(
            f"ImageNet-100 folder {root}/train holds {len(classes)} class folders; expected "
            f"num_classes={num_classes} (pass num_classes=None to accept any number)"
        )
    arrays = {}
    for split, per_class in split_files.items():
        files = [f for c in classes for f in per_class[c]]
        labels = [i for i, c in enumerate(classes) for _ in per_class[c]]
        if not files:
            raise ValueError(f"ImageNet-100 folder {root}/{split} holds no images")
        x = _decode_many(lambda p: _decode_resized(p, image_size), files,
                         (image_size, image_size, 3))
        arrays[split] = (x, np.asarray(labels, np.int32))
    return _readonly(Dataset(
        name="imagenet100", x_train=arrays["train"][0], y_train=arrays["train"][1],
        x_test=arrays["val"][0], y_test=arrays["val"][1], num_classes=len(classes),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, augment="crop_flip", class_names=tuple(classes),
    ))


def _load_imagenet100(roots: list[Path], image_size: int = 224,
                      num_classes: int | None = 100) -> Dataset:
    """ImageNet-100 from a class-folder layout ``imagenet100/{train,val}/<class>/<image>``
    (``imagenet-100/`` also accepted). Class index = position in the sorted folder names; val is
    the test set. Every image is resized (shorter side to ``image_size``, bilinear) and
    center-cropped to ``image_size`` x ``image_size``, and the WHOLE set is held in memory as
    uint8: about 126,700 + 5,000 images x image_size^2 x 3 bytes, i.e. ~19.9 GB at 224,
    ~5 GB at 112, ~1.6 GB at 64. ``num_classes`` (default 100) is checked against the number of
    class folders; None accepts any number (e.g. a small subset). mean/std are the ImageNet
    constants. Augmentation "crop_flip"."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"load_dataset('imagenet100'): image_size={image_size!r}; expected an "
                         "int >= 1")
    if num_classes is not None and (isinstance(num_classes, bool)
                                    or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"load_dataset('imagenet100'): num_classes={num_classes!r}; expected "
                         "an int >= 1 or None")
    places = []
    for root in roots:
        for sub in ("imagenet100", "imagenet-100"):
            folder = root / sub
            places.append(f"{folder}/ (train/<class>/*, val/<class>/*)")
            if folder.is_dir():
                return _imagenet100(_file_key(folder), image_size, num_classes)
    hint = ("build it from ImageNet-1k (https://image-net.org) with the 100-class list of "
            "Tian et al. (CMC, 2019): copy train/<wnid>/ and val/<wnid>/ of those classes into "
            "data_dir/imagenet100/ (val sorted into class folders)")
    raise _not_found("imagenet100", roots, places, None, hint)


_LOADERS: dict[str, tuple[Callable[..., Dataset], tuple[str, ...]]] = {
    "digits": (_load_digits, ()),
    "cifar10": (_load_cifar10, ()),
    "cifar100": (_load_cifar100, ()),
    "tiny_imagenet": (_load_tiny_imagenet, ()),
    "imagenet100": (_load_imagenet100, ("image_size", "num_classes")),
}
assert tuple(_LOADERS) == DATASETS

_CACHED = (_digits, _cifar_folder, _cifar_tarball, _cifar10_npz, _tiny_imagenet, _imagenet100)
