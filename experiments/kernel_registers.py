"""Registers and spills of the fused 1x1 kernels (mcu_jax/models/pointwise.py), the fused
3x3 kernel (mcu_jax/models/conv3x3.py), the kernels of a BatchNorm given as its input's
sums (mcu_jax/models/bn_input.py) and the chain kernel of folded evaluation
(mcu_jax/models/chain.py) on a GPU that is not here: each kernel, forward and
backward, is compiled for a GPU target config without the card (as ``cost_analysis.py
--gpu-target`` does), XLA writes the PTX, and ``ptxas -v`` reports the registers each thread
uses and the bytes it spills to local memory. A spilling
kernel reads and writes memory the byte counts do not show, so the block-size rules
(``pointwise.blocks``, ``pointwise.backward_blocks``, ``conv3x3.block_rows``,
``conv3x3.backward_blocks``, ``chain.chain_blocks``) are chosen to spill nothing (but a
word: 8 bytes, the 3x3 backward kernel in bfloat16 at K = 32; docs/benchmarks.md).

usage: python experiments/kernel_registers.py [--gpu-target experiments/gpu_targets/h100.pbtxt]
                                              [--dtype float32] [--rows 8192] [--arch sm_90a]

Needs JAX's CUDA plugin (``pip install -e ".[cuda13]"``) and its ``ptxas`` (the
nvidia-cuda-nvcc wheel the plugin installs, or ``PTXAS=path``); no GPU. Prints a Markdown
table: one row per PreResNet-110 1x1 convolution's shape in its use (:data:`VARIANTS`:
conv1, with the next BatchNorm + ReLU after it and its input returned for the shortcut, or
conv3, which adds the residual; each compiles kernels of its own) and kernel, for the
gradient of a loss of its outputs (so both kernels are compiled); then one row per stride-1
3x3 convolution's shape and kernel (conv2: the gradient of a loss of the kernel's output
and statistics, on ``--rows`` pixels of its image side); then one row per pair of 1x1
shapes the chain kernel takes (its forward kernel).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling check_pointwise.py and cost_analysis.py
    sys.path.insert(0, str(HERE))


def find_ptxas() -> str:
    """``$PTXAS``, the CUDA wheel's ptxas beside the installed ``nvidia`` package, or the
    one on PATH; SystemExit naming what to install when there is none."""
    if os.environ.get("PTXAS"):
        return os.environ["PTXAS"]
    try:
        import nvidia  # the CUDA wheels' namespace package

        for root in nvidia.__path__:
            for found in sorted(Path(root).glob("*/bin/ptxas")):
                return str(found)
    except ImportError:
        pass
    found = shutil.which("ptxas")
    if found is None:
        raise SystemExit("no ptxas: install JAX's CUDA plugin (pip install -e '.[cuda13]'), "
                         "which brings one, or set PTXAS=/path/to/ptxas")
    return found


def ptxas_report(ptxas: str, ptx: Path, arch: str) -> tuple[int, int]:
    """``(registers, spill bytes)`` of the one kernel in ``ptx`` (stores and loads)."""
    out = subprocess.run([ptxas, f"-arch={arch}", "-v", str(ptx), "-o", os.devnull],
                         capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return registers, spills


def kernel_ptx(dump: Path) -> dict[str, Path]:
    """The PTX file of each Pallas kernel XLA wrote into ``dump``, by kernel name."""
    found = {}
    for path in sorted(dump.glob("*.ptx")):
        entry = re.search(r"\.entry (bn_relu_(?:matmul|conv3x3)\w*|bn_finish|bn_coefficients"
                          r"|matmul_chain)\(", path.read_text())
        if entry:
            found[entry.group(1)] = path
    return found


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu-target", default=str(HERE / "gpu_targets" / "h100.pbtxt"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--rows", type=int, default=8192, help="rows of each kernel's input")
    p.add_argument("--arch", default="sm_90a", help="ptxas -arch (the H100's: sm_90a)")
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error(f"--rows must be >= 1, got {args.rows}")
    ptxas = find_ptxas()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from check_pointwise import CHAIN, CONV1, CONV2, CONV3

        conv2 = tuple((c, c) for _, c in CONV2)  # K = N; the image side follows from K
        for variant, shapes in zip(VARIANTS, (CONV1, CONV3, conv2, CHAIN), strict=True):
            for k, n, *n_next in shapes:
                label = f"K={k} N={n}" + "".join(f" N2={v}" for v in n_next)
                dump = Path(tmp) / f"{label.replace(' ', '-')}-{variant}"
                # XLA reads its flags once per process: one child process per shape and use
                subprocess.run([sys.executable, __file__, "--compile", args.gpu_target,
                                args.dtype, str(args.rows), str(k), str(n), variant,
                                *map(str, n_next)],
                               check=True, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                                "XLA_FLAGS": f"--xla_dump_to={dump} "
                                                             "--xla_dump_hlo_pass_re=NONE"})
                for name, ptx in sorted(kernel_ptx(dump).items()):
                    registers, spills = ptxas_report(ptxas, ptx, args.arch)
                    rows.append(f"| {label} | {variant} | {name} | {registers} | {spills} |")
    text = "\n".join([f"# Fused 1x1 and 3x3 kernels, bn_input's and the chain kernel: "
                      f"registers and spills "
                      f"({args.dtype}, "
                      f"{args.rows} rows, ptxas -arch={args.arch})", "",
                      "| shape | as | kernel | registers | spill bytes |",
                      "|---|---|---|---|---|", *rows])
    print(text)
    return text


#: How a PreResNet block's training uses the kernels, each compiled on its own for its
#: shapes (``check_pointwise.CONV1``, ``CONV3``): "conv1" (``bn_relu_matmul_bn``: the next
#: BatchNorm + ReLU after it, whose derivative the backward kernel applies, and its input
#: returned for the shortcut, whose cotangent the backward kernel adds) and "conv3" (adds the
#: residual, whose cotangent the backward kernel writes; ``bn_relu_matmul_from_sums``, so
#: ``bn_input``'s kernels for bn3's coefficients and derivative too), then "conv2" (the 3x3
#: kernels of ``conv3x3``, forward with its statistics and backward, with ``bn_input``'s
#: for bn2), and "chain" (``chain.matmul_chain``, folded evaluation: a block's conv3 and
#: the next block's conv1, forward only, ``check_pointwise.CHAIN``'s (K, N, N2)).
VARIANTS = ("conv1", "conv3", "conv2", "chain")

#: Rows of the input's shares that "conv3" and "conv2" form their BatchNorm from (the 1x1
#: kernel's programs over 131,072 rows, stage 1 at batch 128).
SHARES = 1024


def _compile(target: str, dtype: str, rows: int, k: int, n: int, variant: str,
             n_next: int = 0) -> None:
    """Compiles the gradient of a loss of the kernel's output and statistics (both kernels),
    used as ``variant`` (:data:`VARIANTS`; "chain": its forward kernel, to ``n_next``
    channels), for ``target`` without the GPU; XLA_FLAGS (set by :func:`main`) dumps the
    PTX."""
    import jax
    import jax.numpy as jnp
    from cost_analysis import target_device

    from mcu_jax.models import bn_input
    from mcu_jax.models import pointwise as pw

    place = jax.sharding.SingleDeviceSharding(target_device(target))

    def shape(*dims, dt=jnp.float32):
        return jax.ShapeDtypeStruct(dims, dt, sharding=place)

    def with_statistics(out, sums):  # a loss of a kernel's output and both its sums
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(sums[0]) + jnp.sum(sums[1])


    if variant == "chain":
        from mcu_jax.models import chain

        dt = jnp.dtype(dtype)
        jax.jit(functools.partial(chain.matmul_chain, impl="pallas")).lower(
            shape(rows, k, dt=dt), shape(k, n), shape(rows, n, dt=dt), shape(n), shape(n),
            shape(n), shape(n, n_next), shape(n_next)).compile()
        return
    if variant == "conv2":  # (rows // side**2) images of the side whose planes are k
        from check_pointwise import CONV2

        from mcu_jax.models import conv3x3

        side = dict((c, s) for s, c in CONV2)[k]
        z = shape(max(1, rows // side ** 2), side, side, k, dt=jnp.dtype(dtype))

        def loss3x3(z, shares, *a):
            out, _, sums = conv3x3.bn_relu_conv3x3_from_sums(
                z, bn_input.shares_of(shares), *a, epsilon=1e-5, stats=True, impl="pallas")
            return with_statistics(out, sums)

        jax.jit(jax.grad(loss3x3, argnums=(0, 2, 3, 4))).lower(
            z, shape(SHARES, 2, k), shape(k), shape(k), shape(3, 3, k, n)).compile()
        return
    conv1 = variant == "conv1"

    def loss(*a):
        if conv1:
            out, _, same = pw.bn_relu_matmul_bn(*a, 1e-5, return_input=True, impl="pallas")
            return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(same.astype(jnp.float32) ** 2)
        z, shares, scale, bias, w, residual = a
        out, _, sums = pw.bn_relu_matmul_from_sums(z, bn_input.shares_of(shares), scale, bias, w,
                                                   residual, epsilon=1e-5, stats=True,
                                                   impl="pallas")
        return with_statistics(out, sums)

    z = shape(rows, k, dt=jnp.dtype(dtype))
    if conv1:
        args = [z, shape(k), shape(k), shape(k), shape(k, n), shape(n), shape(n)]
    else:
        args = [z, shape(SHARES, 2, k), shape(k), shape(k), shape(k, n),
                shape(rows, n, dt=jnp.dtype(dtype))]
    argnums = (0, 4, 5, 6) if conv1 else (0, 2, 3, 4, 5)
    jax.jit(jax.grad(loss, argnums=argnums)).lower(*args).compile()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--compile":
        _compile(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7]), sys.argv[7],
                 *map(int, sys.argv[8:]))
    else:
        main()
