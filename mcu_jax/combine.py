"""Weighted sums of packed tensors: all of a packed vector's tensors in one GPU kernel.

Curve training forms the curve point ``sum_k w_k(t) points[k]`` in every step. XLA gives
each weight tensor's sum a kernel of its own: cuDNN, cuBLAS and the 1x1 kernels read a
weight as a buffer of its own, so the sum cannot be fused into its consumer, and slices of
one packed sum would be copies, a kernel each again. For PreResNet-110 that was a kernel for
each of its 113 weight tensors in every step (docs/benchmarks.md, "Fewer kernels: the curve
point's tensors in one kernel").

:func:`weighted_sum` takes the points packed (``packing.pack``: one vector per dtype, the
same layout for every point) and returns the sum tensor by tensor, each in the dtype its
consumer computes in (so that no cast runs after it). ``impl`` (``kernel_impl``) picks how:
``"auto"`` one Pallas kernel (Triton backend) per packed vector and :data:`MAX_OUTPUTS`
tensors, with an output per tensor, where the program is compiled for an NVIDIA GPU, and XLA
ops elsewhere; ``"pallas"`` the kernel; ``"interpret"`` the kernel interpreted by Pallas
(tests); ``"xla"`` XLA ops: the sums of ``curves``, tensor by tensor. Every impl returns the
same values up to float rounding (the kernel may contract a product and a sum into one fused
multiply-add).

The kernel is not differentiated: curve training differentiates the loss in the curve
point's tensors, which it returns, and scales the gradient by ``w_c(t)`` itself (``mcu``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mcu_jax import curves, kernel_impl, packing

IMPLS = kernel_impl.IMPLS

#: Elements each program of the kernel sums (a power of two, as Triton's blocks are): a
#: tensor takes ``ceil(size / BLOCK)`` programs, the last one masked.
BLOCK = 1024

#: Outputs of one kernel at most (a pointer each among its parameters, which CUDA limited
#: to 4 KB before CUDA 12.1); a model with more tensors takes a kernel per so many.
MAX_OUTPUTS = 256


def weighted_sum(layout: packing.Layout, points: Sequence[Mapping[str, jax.Array]],
                 weights: Sequence[jax.Array], dtypes: Mapping[str, np.dtype] | None = None,
                 impl: str = "auto") -> dict[str, jax.Array]:
    """``{path: sum_k weights[k] * points[k][path]}`` in ``layout``'s order and shapes.

    ``points``: the points packed with ``layout`` (``packing.pack``), all with its vectors.
    ``weights``: one scalar per point, cast to each vector's dtype. ``dtypes``: path -> the
    dtype of that tensor's sum (default: the layout's; the sum is formed in the points' dtype
    and then cast). ValueError for points that do not fit the layout, a number of weights
    that is not the number of points, a weight that is not a scalar, or an unknown ``impl``
    or path.
    """
    kernel_impl.check("weighted_sum", impl)
    if len(weights) != len(points) or not points:
        raise ValueError(f"weighted_sum: needs one weight per point and a point; got "
                         f"{len(weights)} weights for {len(points)} points")
    if any(np.ndim(w) for w in weights):
        raise ValueError(f"weighted_sum: the weights must be scalars, got shapes "
                         f"{[np.shape(w) for w in weights]}")
    dtypes = dict(dtypes or {})
    unknown = sorted(set(dtypes) - set(layout.paths))
    if unknown:
        raise ValueError(f"weighted_sum: dtypes for tensors not in the layout: {unknown[:3]}")
    for point in points:
        packing.check(layout, point, "weighted_sum")
    groups = layout.groups()
    out_dtypes = {path: np.dtype(dtypes.get(path, dtype))
                  for path, dtype in zip(layout.paths, layout.dtypes, strict=True)}
    # the weights in each packed vector's dtype
    ws = {key: [jnp.asarray(w).astype(points[0][key].dtype) for w in weights]
          for key in groups}

    def plain(ws, *points):  # the curves' sums, tensor by tensor
        tensors = [packing.unpack(layout, point) for point in points]
        return {layout.paths[i]: curves.combination(ws[key], [t[layout.paths[i]] for t in tensors])
                .astype(out_dtypes[layout.paths[i]])
                for key, indices in groups.items() for i in indices}

    def kernel(ws, *points):  # one kernel per packed vector and MAX_OUTPUTS tensors
        sums = {}
        for key, indices in groups.items():
            # one (n,) buffer (as n (1,) buffers, XLA formed them in two more kernels)
            stacked = jnp.stack(ws[key])
            sizes = packing.sizes(layout, indices)
            filled = [(i, offset, size)  # (empty tensors need no kernel)
                      for i, offset, size in zip(indices, packing.starts(sizes), sizes, strict=True)
                      if size]
            for first in range(0, len(filled), MAX_OUTPUTS):
                chunk = filled[first:first + MAX_OUTPUTS]
                results = _pallas(stacked, [point[key] for point in points],
                                  [offset for _, offset, _ in chunk],
                                  [size for _, _, size in chunk],
                                  [out_dtypes[layout.paths[i]] for i, _, _ in chunk],
                                  interpret=impl == "interpret")
                sums.update({layout.paths[i]: r.reshape(layout.shapes[i])
                             for (i, _, _), r in zip(chunk, results, strict=True)})
        return {path: sums[path] if path in sums else jnp.zeros(shape, out_dtypes[path])
                for path, shape in zip(layout.paths, layout.shapes, strict=True)}

    out = kernel_impl.dispatch(impl, kernel, plain, ws, *points)
    return {path: out[path] for path in layout.paths}


def _pallas(ws, vectors, offsets: list[int], sizes: list[int], out_dtypes: list[np.dtype],
            interpret: bool):
    """The kernel: program ``i`` sums one block of one tensor (the tensors' blocks in order;
    tensor ``j`` at ``offsets[j]`` of every vector, ``sizes[j]`` > 0 elements) from every
    vector, weighted by ``ws`` (one per vector, stacked), and writes it to that tensor's
    output, a (size,) vector. Where a program's block starts in the vectors and how many of
    its elements are its tensor's come from two tables, so that only the store depends on
    which output is the program's: a branch per tensor with the loads and the sum in it
    took several times as long to trace and lower (docs/benchmarks.md, "Building the
    kernels' programs faster")."""
    from jax.experimental import pallas as pl  # imported when used: tests and GPUs only
    from jax.experimental.pallas import triton as pltriton

    blocks = [pl.cdiv(size, BLOCK) for size in sizes]
    firsts = packing.starts(blocks)
    n = len(vectors)
    # per program: its block's first element in the vectors, and its tensor's elements in it
    at = np.concatenate([offset + BLOCK * np.arange(count)
                         for offset, count in zip(offsets, blocks, strict=True)])
    valid = np.concatenate([np.minimum(BLOCK, size - BLOCK * np.arange(count))
                            for size, count in zip(sizes, blocks, strict=True)])

    def kernel(w_ref, at_ref, valid_ref, *refs):
        sources, outs = refs[:n], refs[n:]
        i = pl.program_id(0)
        inside = jnp.arange(BLOCK) < valid_ref[i]
        start = at_ref[i]
        loaded = [pltriton.load(s.at[pl.ds(start, BLOCK)], mask=inside, other=0.0)
                  for s in sources]
        total = curves.combination([w_ref[k] for k in range(n)], loaded)
        # in a fixed order (a set's would vary with the hash seed, and so the program)
        cast = {dt: total.astype(dt) for dt in dict.fromkeys(map(np.dtype, out_dtypes))}
        for out, first, count in zip(outs, firsts, blocks, strict=True):
            @pl.when((i >= first) & (i < first + count))
            def _(out=out, first=first):
                pltriton.store(out.at[pl.ds((i - first) * BLOCK, BLOCK)],
                               cast[np.dtype(out.dtype)], mask=inside)

    out_shape = [jax.ShapeDtypeStruct((size,), dt)
                 for size, dt in zip(sizes, out_dtypes, strict=True)]
    return kernel_impl.pallas_call(kernel, ws, jnp.asarray(at, jnp.int32),
                                   jnp.asarray(valid, jnp.int32), *vectors,
                                   interpret=interpret, num_warps=4, num_stages=1,
                                   out_shape=out_shape, grid=(sum(blocks),),
                                   name="curve_point")
