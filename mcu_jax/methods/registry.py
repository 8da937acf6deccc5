"""Methods by name: ``register``, ``get``, ``available`` and ``produce`` (run once, then reuse).

``produce`` is how pipelines obtain theta_p: with an ``out_dir`` it saves the result as an
ordinary model checkpoint (variables plus JSON metadata: method, config, key, history,
minutes) and returns it from disk on later calls instead of recomputing it. While the method
runs, its training loop checkpoints every epoch under ``out_dir/progress``, so an interrupted
run resumes. A checkpoint made with another method, config, key or split is never silently
reused or resumed: ``produce`` raises and names the directory.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mcu_jax import checkpoint, checks, loop, runs
from mcu_jax.data.batching import check_indices
from mcu_jax.methods.base import MethodConfig, MethodData, MethodResult
from mcu_jax.models import check_variables

Method = Callable[..., MethodResult]
_CLAIM = "method.json"  # what a (possibly unfinished) run in out_dir was asked to make
_REGISTRY: dict[str, Method] = {}


def register(name: str, fn: Method | None = None, *, overwrite: bool = False):
    """Register ``fn(model, theta_o, data, config, key, *, checkpoint_dir=None)`` as ``name``.

    Use as ``@register("name")`` or ``register("name", fn)``. Re-registering an existing name
    raises ValueError unless ``overwrite=True``. Returns ``fn`` unchanged.
    """

    def add(f: Method) -> Method:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: got {name!r}, expected a non-empty string")
        if not callable(f):
            raise ValueError(f"register({name!r}): {f!r} is not callable")
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not f:
            raise ValueError(f"name: method {name!r} is already registered (pass overwrite=True)")
        _REGISTRY[name] = f
        return f

    return add if fn is None else add(fn)


def available() -> tuple[str, ...]:
    """Names of the registered methods, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Method:
    """The method registered as ``name``; ValueError listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown unlearning method {name!r}; known methods: {', '.join(_REGISTRY)}"
        )
    return _REGISTRY[name]


def __getattr__(attr: str) -> Any:
    # METHODS is computed on access so that it includes methods registered later.
    if attr == "METHODS":
        return available()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _accepts_checkpoint_dir(fn: Method) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "checkpoint_dir" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


def check_inputs(name: str, model, theta_o: dict, data: MethodData, config: MethodConfig,
                 key: jax.Array) -> None:
    """ValueError naming the first bad input of method ``name``, before any work: an unknown
    method, a config that is no MethodConfig, a key that is no JAX key (an int seed fails deep
    inside jax), and, given a model and a :class:`MethodData` (a user's method may need
    neither), a theta_o that is not the model's or holds a NaN/inf (which would look like a
    diverging method), or split indices outside the training images."""
    get(name)
    if not isinstance(config, MethodConfig):
        raise ValueError(f"config: expected a MethodConfig, got {type(config).__name__}")
    checks.key("key", key)
    if model is None or not isinstance(data, MethodData):
        return
    check_variables(model, theta_o, data.input_shape, "theta_o (the input model)")
    for part in ("forget", "retain"):
        check_indices(f"split.{part}", getattr(data.split, part), data.train.num_examples)


def run(name: str, model, theta_o: dict, data: MethodData, config: MethodConfig,
        key: jax.Array, *, checkpoint_dir: str | os.PathLike | None = None) -> MethodResult:
    """Runs method ``name`` (no saving or reuse; see :func:`produce`) after
    :func:`check_inputs`."""
    check_inputs(name, model, theta_o, data, config, key)
    return _run(name, model, theta_o, data, config, key, checkpoint_dir)


def _run(name: str, model, theta_o: dict, data: MethodData, config: MethodConfig,
         key: jax.Array, checkpoint_dir: str | os.PathLike | None = None) -> MethodResult:
    fn = get(name)
    kwargs, earlier = {}, 0.0
    if checkpoint_dir is not None and _accepts_checkpoint_dir(fn):
        kwargs["checkpoint_dir"] = checkpoint_dir
        earlier = loop.earlier_seconds(checkpoint_dir)
    result = fn(model, theta_o, data, config, key, **kwargs)
    if not isinstance(result, MethodResult):
        raise ValueError(
            f"method {name!r} returned {type(result).__name__}; expected a MethodResult"
        )
    if earlier:  # a resumed run: its minutes include the sessions before this one
        result = dataclasses.replace(result, minutes=result.minutes + earlier / 60.0)
    return result


def _identity(name: str, config: MethodConfig, key: jax.Array, data: MethodData, model,
              theta_o: dict) -> dict:
    split = data.split
    return {
        "method": name,
        "config": config.result_fields(),
        "key": runs.key_list(key),
        "model": runs.model_identity(model),
        "theta_o": runs.tree_digest(theta_o),
        "scenario": getattr(split, "scenario", None),
        "forget_class": getattr(split, "forget_class", None),
        "split_seed": getattr(split, "seed", None),
        "num_forget": int(np.asarray(split.forget).size),
        "num_retain": int(np.asarray(split.retain).size),
    }


@runs.holds_folder("out_dir")
def produce(name: str, model, theta_o: dict, data: MethodData, config: MethodConfig,
            key: jax.Array, out_dir: str | os.PathLike | None = None) -> MethodResult:
    """theta_p from method ``name``: loaded from ``out_dir`` when it is already there,
    otherwise computed (resuming from ``out_dir/progress``) and saved to ``out_dir``.

    Without ``out_dir`` this is :func:`run`. A saved model (or an unfinished run, recorded
    in ``out_dir/method.json``) whose method, config (up to ``progress``, ``steps_per_call``
    and, unless ``saliency_augment``, ``grad_batch_size``), key, split, model or theta_o (a
    digest of its variables) differ raises ValueError rather than being reused or resumed.
    The minutes of a resumed run include its earlier sessions (``loop.earlier_seconds``).
    """
    check_inputs(name, model, theta_o, data, config, key)
    if out_dir is None:
        return _run(name, model, theta_o, data, config, key)
    out_dir = Path(out_dir)
    identity = json.loads(json.dumps(_identity(name, config, key, data, model, theta_o)))
    if checkpoint.model_exists(out_dir):
        meta = json.loads((out_dir / "metadata.json").read_text())
        _check_identity(meta, identity, out_dir, "a finished theta_p")
        variables, meta = checkpoint.load_model(out_dir, template=theta_o)
        return MethodResult(
            variables=variables,
            minutes=float(meta.get("minutes", float("nan"))),
            history=list(meta.get("history", [])),
            info=dict(meta.get("info", {})),
            reused=True,
        )
    # Claim the directory, so an interrupted run is only ever resumed by the same request.
    claim = out_dir / _CLAIM
    if claim.is_file():
        _check_identity(json.loads(claim.read_text()), identity, out_dir,
                        "an unfinished run (its epoch checkpoints are in progress/)")
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(claim, identity)
    result = _run(name, model, theta_o, data, config, key, checkpoint_dir=out_dir / "progress")
    meta = dict(identity)
    meta.update(
        minutes=result.minutes,
        history=result.history,
        info={k: v for k, v in result.info.items() if _json_friendly(v)},
    )
    checkpoint.save_model(out_dir, result.variables, meta)
    return result


def _check_identity(stored: dict, identity: dict, out_dir: Path, what: str) -> None:
    diffs = [runs.first_difference(stored.get(k), identity[k], path=k) for k in identity]
    diffs = [d for d in diffs if d is not None]
    if diffs:
        details = "; ".join(f"{field} is {old!r} there but {new!r} now"
                            for field, old, new in diffs)
        raise runs.RequestMismatch(
            f"{out_dir} holds {what} made differently ({details}); use another out_dir or "
            "delete it"
        )


def _json_friendly(value: Any) -> bool:
    """Scalars, strings and small containers of them (big pytrees such as masks are not
    stored in the metadata)."""
    if value is None or isinstance(value, bool | int | float | str | np.generic):
        return True
    if isinstance(value, list | tuple):
        return len(value) <= 64 and all(_json_friendly(v) for v in value)
    if isinstance(value, dict):
        return len(value) <= 64 and all(_json_friendly(v) for v in value.values())
    return False
