"""JAX's persistent compilation cache, switched on by the command-line entry points.

A compiled XLA program is keyed by its HLO, so a program compiled once is loaded from disk
the next time the same computation is compiled: in a later process, and also in the same
process when a step function is rebuilt as a new closure (every MCU run, method and seed
builds its own, which ``jax.jit``'s in-memory cache cannot match). On a GPU one compiled
PreResNet-110 training step costs 20-60 s, and an experiment compiles the same steps for
every seed, method and beta mode.

``experiments/run.py``, ``experiments/paper.py`` and ``mcu-jax`` call :func:`enable` with
``--compile-cache DIR`` (default: ``$MCU_JAX_COMPILE_CACHE`` or ``~/.cache/mcu_jax/xla``;
``off`` disables it). The
library itself never turns the cache on: importing ``mcu_jax`` changes no JAX setting.
Results do not depend on it: a cache hit runs the very program a fresh compile would build.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "MCU_JAX_COMPILE_CACHE"
OFF = ("off", "none", "")


def default_dir() -> str:
    """``$MCU_JAX_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/mcu_jax/xla`` (``~/.cache/...``)."""
    if ENV in os.environ:
        return os.environ[ENV]
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    if not os.path.isabs(base):  # unset or relative: the XDG spec says to use ~/.cache
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mcu_jax", "xla")


def enable(directory: str | os.PathLike | None, min_compile_secs: float = 1.0) -> Path | None:
    """Caches every program whose compilation took at least ``min_compile_secs`` in
    ``directory`` (created). ``None`` or "off"/"none" leaves the cache off; returns the folder
    in use, or None."""
    if directory is None or str(directory).strip().lower() in OFF:
        return None
    if min_compile_secs < 0:
        raise ValueError(f"min_compile_secs must be >= 0, got {min_compile_secs}")
    path = Path(str(directory).strip()).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"cannot create the compilation cache folder {path}: {err}; pass "
            "--compile-cache DIR with a writable folder, or --compile-cache off"
        ) from err
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    return path


def add_argument(parser) -> None:
    """``--compile-cache DIR`` on an argparse parser (default :func:`default_dir`)."""
    parser.add_argument(
        "--compile-cache", metavar="DIR", default=None,
        help="persistent XLA compilation cache (default: $MCU_JAX_COMPILE_CACHE or "
        "~/.cache/mcu_jax/xla; 'off' disables it)",
    )


def enable_from_args(value: str | None) -> Path | None:
    """:func:`enable` for the value of ``--compile-cache`` (None: the default folder)."""
    return enable(default_dir() if value is None else value)
