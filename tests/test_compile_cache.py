"""The persistent compilation cache of the entry points (mcu_jax.compile_cache): a program
compiled in one process is loaded, not compiled, by the next, also when it is rebuilt as a
new closure; 'off' leaves JAX's settings alone. Subprocesses keep this test's process clean."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mcu_jax import compile_cache

ROOT = Path(__file__).resolve().parents[1]

SNIPPET = """
import json, sys
import jax, jax.numpy as jnp
from mcu_jax import compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
used = compile_cache.enable(sys.argv[1], min_compile_secs=0.0)

def make(scale):  # a new closure per call, as every MCU run builds its own step
    def f(x):
        for _ in range(50):
            x = jnp.sin(x) * scale + x
        return x
    return jax.jit(f)

out = [float(make(1.5)(jnp.ones(4))[0]) for _ in range(2)]
print(json.dumps({"used": str(used), "hits": len(hits), "out": out,
                  "dir": jax.config.jax_compilation_cache_dir}))
"""


def _clean_env(**extra: str) -> dict:
    """This process's environment without conftest's test-run cache (JAX reads it from
    JAX_COMPILATION_CACHE_DIR at import), so a subprocess starts with JAX's defaults."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    return {**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **extra}


def _run(directory) -> dict:
    env = _clean_env()
    proc = subprocess.run([sys.executable, "-c", SNIPPET, str(directory)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_and_new_closures_load_from_the_cache(tmp_path):
    first = _run(tmp_path / "xla")
    assert first["used"] == str(tmp_path / "xla") and any((tmp_path / "xla").iterdir())
    assert first["hits"] >= 1  # the second closure of the same computation, same process
    second = _run(tmp_path / "xla")
    assert second["hits"] >= first["hits"] + 1  # the first closure too, now from disk
    assert second["out"] == first["out"]


def test_off_changes_nothing(tmp_path):
    out = _run("off")
    assert out["used"] == "None" and out["dir"] is None and out["hits"] == 0


def test_default_dir_and_bad_input(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
    assert compile_cache.default_dir() == str(tmp_path / "c")
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == str(tmp_path / "home" / "mcu_jax" / "xla")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as XDG says
    assert compile_cache.default_dir().startswith(os.path.expanduser("~"))
    assert compile_cache.enable("off") is None and compile_cache.enable(None) is None
    with pytest.raises(ValueError, match="min_compile_secs"):
        compile_cache.enable(tmp_path / "x", min_compile_secs=-1)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot create the compilation cache folder"):
        compile_cache.enable(blocker / "sub")


def test_no_option_means_the_default_folder(tmp_path):
    """No --compile-cache: the entry points use default_dir() (here from the environment)."""
    code = ("import jax; from mcu_jax import compile_cache; "
            "print(compile_cache.enable_from_args(None), jax.config.jax_compilation_cache_dir)")
    env = _clean_env(**{compile_cache.ENV: str(tmp_path / "c")})
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "c")] * 2
