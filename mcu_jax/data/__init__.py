"""Data: raw uint8 data sets, unlearning splits, on-device transforms and index batching."""

from mcu_jax.data.batching import epoch_batches, eval_batches, to_device
from mcu_jax.data.datasets import DATASETS, Dataset, load_dataset
from mcu_jax.data.device import Images
from mcu_jax.data.splits import Split, make_split
from mcu_jax.data.subsets import subsample
from mcu_jax.data.transforms import augment, normalize, prepare_batch

__all__ = [
    "DATASETS",
    "Dataset",
    "Images",
    "Split",
    "augment",
    "epoch_batches",
    "eval_batches",
    "load_dataset",
    "make_split",
    "normalize",
    "prepare_batch",
    "subsample",
    "to_device",
]
