"""Several devices, and several hosts, with ``jax.sharding``: one explicit mesh argument.

Nothing here is global state: a :class:`~jax.sharding.Mesh` is made once with
:func:`make_mesh` and handed to the functions that can use it,

- ``train.fit(..., mesh=mesh)`` and every pre-unlearning method (``MethodData(mesh=mesh)``)
  and ``mcu.train_curve(..., mesh=mesh)``: **data parallel**. The loop state (parameters,
  optimiser state, beta) and the constants (image sets, curve end points) are replicated on
  every device, and each step's index batch is sharded along its batch axis. XLA's SPMD
  partitioner then splits the batch (gather, forward, backward) across the devices and
  all-reduces what needs the whole batch: the gradients, the loss, and BatchNorm's
  train-mode batch statistics, which are therefore the *global* statistics of the batch,
  exactly as on one device. The result equals the single-device run within float tolerance
  (summation order differs). The batch size must be divisible by the number of devices.
- ``evaluation.mean_gradient(..., mesh=mesh)`` (hence ``masks.mask_gradients``,
  ``pipeline.compute_mask`` and SalUn's saliency) and ``evaluation.outputs`` /
  ``accuracy`` / ``evaluate_sets`` / ``set_outputs`` (hence ``experiment.evaluate_model`` and
  ``train.reference_accuracies``), and ``bn.recompute(..., mesh=mesh)`` (NegTV's BatchNorm
  pass through ``MethodData.mesh``): **data parallel** in the same way. The
  gradient's batch size must be divisible by the number of devices; an evaluation batch
  size is rounded up to a multiple of it (outputs are per sample). Results come back
  replicated.

  These data-parallel programs are :class:`data_parallel` programs: compiled with their
  outputs replicated and traced under the mesh (``jax.set_mesh``), where code that XLA's
  partitioner cannot split does its own: PreResNet's fused 1x1 kernels run in a
  ``shard_map`` on each device's rows (``models/pointwise.py``).
- ``sweep.sweep(..., mesh=mesh)``: **t parallel**. Each compiled chunk of t values is sharded
  over the devices (``shard_map``); every device evaluates its own t with the replicated data,
  with no communication until the results are gathered.

``mesh=None`` (the default everywhere) leaves the single-device code unchanged, and a mesh of
one device runs the same code as a mesh of many.

Multi-host: call :func:`initialize_distributed` in every process before anything else touches
JAX, then ``make_mesh()`` spans the devices of all processes. Every process runs the same
program on the same data (same seeds); placements go through :func:`place`, which also
builds arrays whose devices belong to several processes, and all results come back
replicated, so every process can read them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "batch_sharding",
    "check_batch_size",
    "data_parallel",
    "initialize_distributed",
    "make_mesh",
    "num_shards",
    "place",
    "replicate",
    "replicated",
    "t_sharding",
    "t_spec",
]


def make_mesh(num_devices: int | None = None, axis: str = "data",
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``axis`` over the first ``num_devices`` of ``devices``
    (default ``jax.devices()``: after :func:`initialize_distributed`, the devices of all
    processes). ``num_devices=None`` takes them all (the only sensible choice on several
    hosts, where every process must own part of the mesh)."""
    devices = list(jax.devices() if devices is None else devices)
    available = len(devices)
    if num_devices is None:
        num_devices = available
    if (isinstance(num_devices, bool) or not isinstance(num_devices, int | np.integer)
            or num_devices < 1):
        raise ValueError(f"make_mesh: num_devices={num_devices!r}; expected None or an int >= 1")
    if num_devices > available:
        platform = devices[0].platform if devices else "none"
        hint = (" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before "
                "jax is imported to get N host devices)" if platform == "cpu" else "")
        raise ValueError(
            f"make_mesh: num_devices={num_devices} but only {available} {platform} device(s) "
            f"are present{hint}"
        )
    if not isinstance(axis, str) or not axis:
        raise ValueError(f"make_mesh: axis={axis!r}; expected a non-empty string")
    chosen = devices[: int(num_devices)]
    missing = sorted({d.process_index for d in devices} - {d.process_index for d in chosen})
    if missing:
        raise ValueError(
            f"make_mesh: num_devices={num_devices} leaves process(es) {missing} without a "
            f"device in the mesh; on several hosts every process must own part of it "
            f"(use num_devices=None for all {available} devices)"
        )
    return Mesh(np.array(chosen), (axis,))


def _check_mesh(mesh: Mesh) -> None:
    if not isinstance(mesh, Mesh):
        raise ValueError(
            f"mesh={mesh!r}; expected a jax.sharding.Mesh (mcu_jax.sharding.make_mesh) or None"
        )


def _axes(mesh: Mesh):
    """The mesh axes a batch or t axis is split over: all of them (one name for a 1-D mesh)."""
    _check_mesh(mesh)
    names = tuple(mesh.axis_names)
    return names[0] if len(names) == 1 else names


def num_shards(mesh: Mesh) -> int:
    """How many pieces a batch (or a chunk of t) is split into: the mesh's device count."""
    _check_mesh(mesh)
    return int(mesh.size)


def replicated(mesh: Mesh) -> NamedSharding:
    """The whole array on every device of ``mesh``."""
    _check_mesh(mesh)
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Index batches split along their last (batch) axis: ``(steps, B)`` for ``ndim=2``
    (a loop call's batches), ``(B,)`` for ``ndim=1`` (one step's batch)."""
    if ndim < 1:
        raise ValueError(f"batch_sharding: ndim={ndim}; expected >= 1")
    return NamedSharding(mesh, PartitionSpec(*([None] * (ndim - 1)), _axes(mesh)))


def t_sharding(mesh: Mesh) -> NamedSharding:
    """A vector of curve positions t split over the devices (t-parallel sweeps)."""
    return NamedSharding(mesh, PartitionSpec(_axes(mesh)))


def t_spec(mesh: Mesh) -> PartitionSpec:
    """The ``PartitionSpec`` of :func:`t_sharding` (for ``shard_map``'s in/out specs)."""
    return PartitionSpec(_axes(mesh))


def place(tree: Any, sharding: NamedSharding) -> Any:
    """Every leaf of ``tree`` laid out with ``sharding``; arrays already laid out so are
    returned as they are (no copy).

    ``jax.device_put`` where the sharding's devices all belong to this process. Otherwise
    (several hosts) each leaf is built with ``jax.make_array_from_callback`` from this
    process's host copy, which is correct because every process holds the same values
    (same program, same seeds).
    """
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` with every leaf replicated on all devices of ``mesh``."""
    return place(tree, replicated(mesh))


def check_batch_size(batch_size: int, mesh: Mesh | None, what: str = "batch_size") -> None:
    """ValueError unless ``batch_size`` splits evenly over the devices of ``mesh``."""
    if mesh is None:
        return
    n = num_shards(mesh)
    if batch_size % n:
        lower = (batch_size // n) * n
        raise ValueError(
            f"{what}={batch_size} is not divisible by the {n} devices of the mesh; "
            f"data parallelism splits every batch evenly, so use a multiple of {n} "
            f"(e.g. {max(lower, n)} or {lower + n})"
        )


class data_parallel:  # noqa: N801 - used like jax.jit, which it wraps
    """``jax.jit(fn, **jit_options)`` as a data-parallel program on ``mesh``: its outputs
    replicated on the mesh, and every call (and :meth:`lower`) made with ``mesh`` as JAX's
    context mesh (``jax.set_mesh``), so that code traced inside can split its own work over
    the mesh: the fused 1x1 kernels of ``models/pointwise.py``, which XLA's SPMD partitioner
    cannot split, run on each device's own rows there. Used by the training loop,
    ``evaluation`` and ``bn.recompute``. Call it from Python, not from inside a traced
    function (``jax.set_mesh`` refuses to run under ``jit``, ``grad`` or ``vmap``)."""

    def __init__(self, fn: Callable, mesh: Mesh, **jit_options: Any):
        self.mesh = mesh
        self._jit = jax.jit(fn, out_shardings=replicated(mesh), **jit_options)
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self._jit(*args, **kwargs)

    def lower(self, *args, **kwargs):
        """The program lowered for ``args`` under the mesh (``jax.jit(...).lower``)."""
        with jax.set_mesh(self.mesh):
            return self._jit.lower(*args, **kwargs)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    **kwargs: Any,
) -> None:
    """Joins this process to a multi-host JAX run (``jax.distributed.initialize``).

    Call it once per process, first thing, before any other JAX call; afterwards
    ``jax.devices()`` lists the devices of all processes and :func:`make_mesh` spans them.
    Each argument left out is read from the environment:

    - ``coordinator_address``: ``JAX_COORDINATOR_ADDRESS``, ``host:port`` of process 0
      (any free port, the same in every process; not ``localhost`` across machines);
    - ``num_processes``: ``JAX_NUM_PROCESSES``;
    - ``process_id``: ``JAX_PROCESS_ID``, 0 .. num_processes - 1, a different one per process;
    - ``local_device_ids``: ``JAX_LOCAL_DEVICE_IDS`` (comma-separated), the accelerators this
      process uses (default: all it sees).

    Under Slurm, Open MPI and on Cloud TPU, JAX detects all of them itself, so no argument and
    no variable is needed. ``kwargs`` go to ``jax.distributed.initialize`` unchanged (e.g.
    ``initialization_timeout``, ``cluster_detection_method``).
    """

    def from_env(name: str, value):
        if value is not None or os.environ.get(name) in (None, ""):
            return value
        text = os.environ[name]
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"initialize_distributed: {name}={text!r}; expected an int") from None

    num_processes = from_env("JAX_NUM_PROCESSES", num_processes)
    process_id = from_env("JAX_PROCESS_ID", process_id)
    if num_processes is not None and (not isinstance(num_processes, int) or num_processes < 1):
        raise ValueError(f"initialize_distributed: num_processes={num_processes!r}; "
                         "expected an int >= 1")
    if process_id is not None and num_processes is not None and not (
        isinstance(process_id, int) and 0 <= process_id < num_processes
    ):
        raise ValueError(f"initialize_distributed: process_id={process_id!r}; expected an "
                         f"int in [0, {num_processes})")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        **kwargs,
    )
