"""Orbax checkpoints: resumable training states and exported models.

Two uses:
* :class:`Checkpointer` keeps the last few states of a running loop (one per epoch), written
  atomically by orbax (a half-written step is never listed), so a killed run resumes from the
  newest complete one.
* :func:`save_model` / :func:`load_model` store a finished model's variables plus JSON
  metadata (reference accuracies, config, split seed, ...) so later phases reuse it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_STATE = "state"
_META = "meta"
_DELETING = ".deleting-"  # a step folder being removed (not a step name orbax lists)


def _jsonable(obj: Any) -> Any:
    """Converts numpy scalars/arrays and tuples in ``obj`` into plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray | jax.Array):
        return np.asarray(obj).tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _not_json(obj: Any) -> Any:
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable: {obj!r}")


def read_json(path: str | os.PathLike, remedy: str) -> dict:
    """``path``'s JSON object; ValueError naming the file and what to do (``remedy``) when it
    is not valid JSON or not an object (a file damaged or edited by hand, where JSON's own
    message would not say which file)."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"{path} is not valid JSON ({err}); {remedy}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} holds a JSON {type(saved).__name__}, not an object; {remedy}")
    return saved


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomic JSON write: a temporary file in the same folder, fsync, then a rename, so a
    reader (or a resumed run) never sees a half-written file."""
    path = Path(path)
    text = json.dumps(_jsonable(data), indent=2, sort_keys=True, default=_not_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _barrier(tag: str) -> None:
    """Waits for every process of a multi-process run (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)


class Checkpointer:
    """Saves ``(state pytree, metadata dict)`` per step under ``directory``."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = Path(directory).resolve()
        for leftover in self.directory.glob(f"{_DELETING}*"):  # a delete cut short by a kill
            shutil.rmtree(leftover, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _META)
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, metadata: dict | None = None) -> None:
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _META: ocp.args.JsonSave(_jsonable(metadata or {})),
            }
        )
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def delete(self, step: int) -> None:
        """Removes a saved step (orbax never overwrites one).

        The step's folder is first renamed out of orbax's sight (one atomic rename), then
        removed: a kill during the removal leaves an ignored ``.deleting-*`` folder (cleared
        the next time the folder is opened), never a half-deleted step listed as the latest.
        In a multi-process run (one shared folder) every process calls this; process 0
        renames and removes it between barriers, so no process lists or finds it afterwards.
        """
        if step not in self._manager.all_steps():
            return
        folder = self.directory / str(step)
        if not folder.is_dir():  # another step naming than orbax's default: orbax deletes
            self._manager.delete(step)
            return
        doomed = self.directory / f"{_DELETING}{step}.{os.getpid()}"
        primary = jax.process_index() == 0
        _barrier(f"mcu_jax checkpoint delete {step}")
        if primary:
            folder.rename(doomed)
        _barrier(f"mcu_jax checkpoint deleted {step}")
        self._manager.reload()
        if primary:
            shutil.rmtree(doomed, ignore_errors=True)
        _barrier(f"mcu_jax checkpoint removed {step}")  # gone for every process on return

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores into the structure of ``template`` (arrays or ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore()}
            ),
        )
        return out[_STATE], dict(out[_META] or {})

    def metadata(self, step: int | None = None) -> dict:
        """The metadata saved with ``step`` (default: the latest; {} when there is none),
        without reading the state."""
        step = self.latest_step() if step is None else step
        if step is None:
            return {}
        out = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )
        return dict(out[_META] or {})

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_model(directory: str | os.PathLike, variables: Any, metadata: dict | None = None) -> None:
    """Writes a finished model: variables with orbax, then ``metadata.json`` last.

    The metadata file doubles as the completion marker: :func:`model_exists` is true only
    once both parts are on disk. The variables are saved as host arrays, so a model made on
    a mesh of several devices loads on any other machine.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "variables"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(target, jax.device_get(variables), force=True)
    ckptr.wait_until_finished()
    ckptr.close()
    write_json(directory / "metadata.json", metadata or {})


def model_exists(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return (directory / "metadata.json").is_file() and (directory / "variables").is_dir()


def load_model(directory: str | os.PathLike, template: Any = None) -> tuple[Any, dict]:
    """Loads ``(variables, metadata)`` written by :func:`save_model`.

    Without a template the arrays come back as numpy/jax arrays in nested dicts, which is
    what ``model.apply`` expects.
    """
    directory = Path(directory).resolve()
    if not model_exists(directory):
        raise FileNotFoundError(
            f"no finished model in {directory} (expected variables/ and metadata.json)"
        )
    ckptr = ocp.StandardCheckpointer()
    if template is None:
        variables = ckptr.restore(directory / "variables")
    else:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        variables = ckptr.restore(directory / "variables", abstract)
    ckptr.close()
    metadata = json.loads((directory / "metadata.json").read_text())
    return variables, metadata
