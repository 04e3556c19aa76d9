"""Input pipeline: TFDS datasets, image folders and synthetic data, preprocessed for the weights.

    ds = transfer.data.create(config, preprocess_source="keras:vgg16_notop")
    for batch in transfer.data.prefetch_to_device(ds.train_batches(start_step), sharding):
      ...  # batch["image"]: float32 NHWC, batch["label"]: int32, global jax.Arrays

`config.dataset` picks the source: `tfds:NAME`, `folder:PATH` or `synthetic`. Only `tfds:` imports
TensorFlow (lazily; an ArrayRecord dataset is read by index, never whole); folders and synthetic
data use PIL and numpy. Decoding runs on `data_workers` threads or processes (`data.workers`).
Batches are a pure function of (seed, step), so resuming at a step reproduces an uninterrupted run exactly, and each
process reads only its rows of every global batch. `Dataset.identity()` records which data a run
saw; `check_same_data` refuses to resume or evaluate a run on other data.
"""

from transfer.data.augmentation import AUGMENTS
from transfer.data.dataset import Dataset, check_batch_size
from transfer.data.device import input_rates, input_throughput, prefetch_to_device
from transfer.data.identity import check_same_data
from transfer.data.pipeline import CACHES, create
from transfer.data.sources import LABELS_FROM

__all__ = ["AUGMENTS", "CACHES", "LABELS_FROM", "Dataset", "check_batch_size", "check_same_data",
           "create", "input_rates", "input_throughput", "prefetch_to_device"]
