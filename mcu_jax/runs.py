"""Run folders: one folder per experiment run, bound to one config, finished phase by phase.

    run = RunDir("runs/cifar10_resnet20_seed0")
    run.open(config)                      # writes run.json, or checks it matches
    if not run.phase_done("theta_o"):
        ...                               # train, writing under run.path("theta_o")
        run.mark_done("theta_o", {"refs": refs})
    refs = run.load_phase("theta_o")["refs"]

``run.json`` records the config with the mcu_jax and JAX versions, the backend and the
device kind. Reopening a folder with a different config (up to keys named in ``ignore``,
at any depth) is refused, so results of two configs never mix in one folder (the experiment
runner, ``train.train_model`` and ``pipeline.run_mcu`` bind their folders this way). A phase is
done once ``phases/<name>.json`` exists; it is written to a temporary file and renamed, so
a killed run never leaves a half-written marker.

A folder that makes a model (``train.train_model``, ``methods.produce``,
``pipeline.run_mcu``) is held by one process (or thread) at a time (:func:`exclusive`): a
second one asking for the same model, e.g. two runs sharing a models folder
(``models_from``), waits for the first and then finds the model made.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np

import mcu_jax
from mcu_jax import checks
from mcu_jax.checkpoint import write_json

try:
    import fcntl
except ImportError:  # not POSIX: folders go unlocked
    fcntl = None

_RUN_FILE = "run.json"
_LOCK = ".lock"
_PHASES = "phases"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_MISSING = "<missing>"


class _Held(threading.local):
    """The folders this thread holds (a nested call for one of them passes through)."""

    def __init__(self):
        self.folders: set[Path] = set()


_HELD = _Held()

#: Settings that change how fast or how visibly a run goes, not its result: a folder bound to
#: a request may be reopened with other values of these.
SPEED_FIELDS = ("progress", "steps_per_call", "checkpoint_every")

#: What :meth:`RunDir.open` ignores by default: the speed settings, the data folder, an
#: experiment's rerun command and the folder it reuses models from (none changes a result).
IGNORED_FIELDS = (*SPEED_FIELDS, "data_dir", "command", "models_from")


def key_list(key: Any) -> list[int]:
    """A JAX PRNG key (typed or raw uint32) as a JSON-friendly list of ints; ValueError for
    anything else (``checks.key``), before a run folder records it."""
    checks.key("key", key)
    if jax.dtypes.issubdtype(jax.numpy.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key).ravel().tolist()


def digest(indices: Any) -> str:
    """A short fingerprint (SHA-256) of an index array, to record which examples a run used
    without storing them."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(indices), np.int64)).hexdigest()


def tree_digest(tree: Any) -> str:
    """A fingerprint (SHA-256) of a pytree of arrays: every leaf's path, dtype, shape and
    bytes, so two variables dicts get the same digest only if they are bitwise equal."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        leaf = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape};".encode())
        h.update(leaf.tobytes())
    return h.hexdigest()


#: Model fields added after run folders may have been made -> the value that behaves as
#: before; at that value the field is left out of :func:`model_identity`, as in older records.
ADDED_MODEL_FIELDS = {"fused_bn": False, "pointwise": "conv", "conv3x3": "conv"}


def model_identity(model: Any) -> str:
    """A Flax model's class and attributes as text (its repr), with ``fold_bn`` (the same
    function, evaluated faster) and added fields at their old behaviour left out, to bind
    run folders to the model they trained."""
    if getattr(model, "fold_bn", False):
        model = model.clone(fold_bn=False)
    old = {f"{name} = {value!r}" for name, value in ADDED_MODEL_FIELDS.items()
           if getattr(model, name, None) == value}
    return "\n".join(line for line in repr(model).split("\n") if line.strip() not in old)


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj, default=_default))


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy / jax arrays and scalars
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable: {obj!r}")


#: Config fields added after run folders may have been made: the field's dotted path (its
#: ending: "mask.seed" is the field ``seed`` of a ``mask`` group at any depth, never another
#: ``seed``) -> the value, in JSON form, that behaves as before the field existed. A record
#: without the field equals a request with that value, so adding a field to the library does
#: not invalidate existing run folders.
ADDED_FIELDS = {
    "mcu.curve": "bezier",  # MCUConfig
    # MCUConfig's speed setting: XLA's sums before it, which "auto" still runs off NVIDIA
    # GPUs; on them its kernel's sums equal XLA's up to rounding. (An experiment folder made
    # on a GPU before it keeps "auto": it refuses "xla", which it ran then; MCU and curve
    # folders take either, mcu.FREE_FIELDS.)
    "mcu.combine": "auto",
    "mask.kind": "parameter", "mask.seed": 0,  # MaskConfig (the random mask)
    "mask.augment": False,  # MaskConfig (augmented mask gradients)
    "saliency_augment": False,  # MethodConfig (SalUn's augmented saliency)
    "problem.train_size": None, "problem.test_size": None,  # ProblemConfig (subsets)
    "problem.fused_bn": False, "problem.pointwise": "conv",  # ProblemConfig
    "problem.conv3x3": "conv",
    "fixed_betas": [],  # ExperimentConfig (MCU's beta search)
    "selection.interpolation": "cubic",  # SelectionConfig
    # SelectionConfig's speed settings (the same results up to float rounding)
    "selection.fold_bn": False, "selection.bn_group": 1, "selection.pointwise": "conv",
    "selection.conv3x3": "conv",
}


def _old_behaviour(path: str, value: Any) -> bool:
    """Whether ``value`` at dotted ``path`` is an added field at its old behaviour."""
    return any((path == field or path.endswith("." + field)) and value == old
               for field, old in ADDED_FIELDS.items())


def first_difference(old: Any, new: Any, ignore: tuple[str, ...] = (), path: str = ""):
    """(dotted field, old value, new value) of the first difference between two JSON-like
    values (keys in ``ignore`` skipped at every level; an old record's missing key in
    :data:`ADDED_FIELDS` equals its value there), or None when they are equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            if k in ignore:
                continue
            sub = f"{path}.{k}" if path else str(k)
            if k not in old and _old_behaviour(sub, new[k]):
                continue
            diff = first_difference(old.get(k, _MISSING), new.get(k, _MISSING), ignore, sub)
            if diff is not None:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            diff = first_difference(a, b, ignore, f"{path}[{i}]")
            if diff is not None:
                return diff
        return None
    if old == new and isinstance(old, bool) == isinstance(new, bool):  # 1 == 1.0, not True
        return None
    return path or "<config>", old, new


class RequestMismatch(ValueError):
    """A folder holds the work of another request (so it can be neither reused nor resumed)."""


class RunDir:
    """A run folder: ``run.json`` (config + environment), ``phases/<name>.json`` markers."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)

    def path(self, *parts: str) -> Path:
        """A path inside the run folder (not created)."""
        return self.root.joinpath(*parts)

    def bound(self) -> bool:
        """Whether the folder is already bound to a request (its ``run.json`` exists)."""
        return self.path(_RUN_FILE).is_file()

    def open(self, config: dict, ignore: tuple[str, ...] = IGNORED_FIELDS) -> None:
        """Binds the folder to ``config``: writes ``run.json`` the first time; afterwards
        raises :class:`RequestMismatch` (a ValueError) if the stored config differs outside
        the ``ignore``d keys (by default the speed settings, the data folder, an experiment's
        rerun command and the folder it reuses models from, none of which changes a
        result)."""
        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict, got {type(config).__name__}")
        config = _jsonable(config)
        run_file = self.path(_RUN_FILE)
        if run_file.is_file():
            try:
                stored = json.loads(run_file.read_text())["config"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{run_file} is not a run record ({err}); use a new folder"
                ) from None
            diff = first_difference(stored, config, tuple(ignore))
            if diff is not None:
                field, old, new = diff
                raise RequestMismatch(
                    f"run folder {self.root} was made with a different config: {field} is "
                    f"{old!r} there but {new!r} now; use a new folder for a new config"
                )
            return
        device = jax.devices()[0]
        write_json(run_file, {
            "config": config,
            "mcu_jax_version": mcu_jax.__version__,
            "jax_version": jax.__version__,
            "backend": jax.default_backend(),
            "device_kind": device.device_kind,
        })

    def _phase_file(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"phase name must be letters, digits, '_', '-' or '.', got {name!r}"
            )
        return self.path(_PHASES, f"{name}.json")

    def phase_done(self, name: str) -> bool:
        return self._phase_file(name).is_file()

    def mark_done(self, name: str, payload: dict) -> None:
        """Records phase ``name`` as finished with a JSON ``payload`` (atomic)."""
        if not isinstance(payload, dict):
            raise ValueError(f"payload must be a dict, got {type(payload).__name__}")
        write_json(self._phase_file(name), payload)

    def load_phase(self, name: str) -> dict:
        file = self._phase_file(name)
        if not file.is_file():
            raise FileNotFoundError(f"phase {name!r} of run {self.root} is not done ({file})")
        return json.loads(file.read_text())

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"


def _lock_file(folder: Path):
    """``folder``'s lock file, open; None where there is nothing to lock: no ``fcntl`` (not
    POSIX), several JAX processes (they make one model together), a folder this thread
    holds already, or a read-only folder."""
    if fcntl is None or jax.process_count() > 1 or folder in _HELD.folders:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return open(folder / _LOCK, "a")  # noqa: SIM115 (the caller closes it)
    except OSError as err:
        if isinstance(err, PermissionError) or err.errno == errno.EROFS:
            return None  # read-only: nothing can be made there, only loaded
        raise


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike):
    """Holds ``folder`` (created if missing) for this thread: another process or thread
    entering it waits, with a message, until this one leaves. The lock is advisory
    (``fcntl.flock`` on ``folder/.lock``) and ends with the process, so a killed run leaves no
    stale lock. The processes of one multi-process JAX run (``jax.process_count() > 1``) make
    each model together and take no lock; nor do platforms without ``fcntl`` or read-only
    folders (whose models can only be loaded)."""
    folder = Path(folder).resolve()
    handle = _lock_file(folder)
    if handle is None:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{folder}: another process is making this model; waiting for it to finish",
                  file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        _HELD.folders.add(folder)
        try:
            yield
        finally:
            _HELD.folders.discard(folder)
            fcntl.flock(handle, fcntl.LOCK_UN)


def holds_folder(argument: str):
    """Decorator: each call holds (:func:`exclusive`) the folder passed as ``argument``
    (nothing when it is None)."""
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            folder = signature.bind(*args, **kwargs).arguments.get(argument)
            if folder is None:
                return fn(*args, **kwargs)
            with exclusive(folder):
                return fn(*args, **kwargs)
        return call
    return decorate
