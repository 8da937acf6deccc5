"""Initial weights from local ``.npz`` files: ``save_npz`` and ``load_pretrained``.

A file maps '/'-joined variable paths to arrays, e.g.
``"params/Transformer/encoderblock_0/LayerNorm_0/scale"`` or ``"batch_stats/bn0/mean"``.
Keys without a collection prefix (as in google-research vit_jax checkpoints, e.g.
``"Transformer/encoder_norm/bias"``) are read as ``params``. No downloads happen here.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

COLLECTIONS = ("params", "batch_stats")


def _flatten(variables: Any) -> dict[str, Any]:
    """'/'-joined path -> leaf for the ``params`` and ``batch_stats`` collections."""
    flat: dict[str, Any] = {}
    for collection in COLLECTIONS:
        tree = variables.get(collection, {})
        for path, leaf in traverse_util.flatten_dict(dict(tree), sep="/").items():
            flat[f"{collection}/{path}"] = leaf
    return flat


def save_npz(variables: Any, path: str | os.PathLike) -> None:
    """Write ``variables`` (``params`` and ``batch_stats``) to ``path`` as an uncompressed npz.

    The file is written at exactly ``path`` (numpy would otherwise append ".npz").
    """
    arrays = {key: np.asarray(leaf) for key, leaf in _flatten(variables).items()}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_pretrained(variables: Any, path: str | os.PathLike, head: str = "head") -> dict:
    """Return ``variables`` with every array replaced by the one stored in ``path``.

    ``variables`` (e.g. from ``init_variables``) gives the target structure, shapes and
    dtypes. Every key must be in the file with the same shape, except the classification
    head (the top-level module named ``head``): it keeps its fresh initialisation when the
    file lacks it or its shape differs, so a 1000-class checkpoint initialises a 100-class
    model. Keys in the file that the model does not have (e.g. vit_jax's ``pre_logits``)
    are ignored.

    Raises FileNotFoundError when ``path`` does not exist and ValueError naming the first
    missing or mismatching key.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no pretrained weights file at {os.fspath(path)!r}")
    target = _flatten(variables)
    loaded: dict[str, Any] = {}
    with np.load(path, allow_pickle=False) as stored:
        for key, leaf in target.items():
            collection, _, rest = key.partition("/")
            is_head = collection == "params" and rest.split("/", 1)[0] == head
            if key in stored:
                found = key
            elif collection == "params" and rest in stored:
                found = rest
            elif is_head:
                loaded[key] = leaf
                continue
            else:
                raise ValueError(
                    f"{os.fspath(path)}: missing key {key!r} "
                    f"(the file has {len(stored.files)} keys, e.g. {stored.files[:3]})"
                )
            array = stored[found]
            if array.shape != tuple(leaf.shape):
                if is_head:
                    loaded[key] = leaf
                    continue
                raise ValueError(
                    f"{os.fspath(path)}: key {found!r} has shape {array.shape}, "
                    f"the model expects {tuple(leaf.shape)}"
                )
            loaded[key] = jnp.asarray(array, dtype=leaf.dtype)
    out = {c: {} for c in COLLECTIONS}
    for collection in COLLECTIONS:
        prefix = collection + "/"
        sub = {k[len(prefix) :]: v for k, v in loaded.items() if k.startswith(prefix)}
        if sub:
            out[collection] = traverse_util.unflatten_dict(sub, sep="/")
    return out
