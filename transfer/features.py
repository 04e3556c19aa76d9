"""Cached backbone features: run a frozen backbone once, then train the head on its output.

With the conv base frozen and no augmentation, every epoch would push the same images through the
same backbone; computing the feature maps once and batching them in exactly the order the image
pipeline would (same per-epoch permutation) trains the head on the same batches, many times
faster. The loop and `bench` both use this module.
"""

from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from transfer import models, optim, parallel


def cache_features_reason(config, param_labels) -> str | None:
  """None if features can be cached, else why not (logged)."""
  if not config.cache_features:
    return "cache_features=False"
  if config.augment != "none":
    return f"augment={config.augment!r} changes the backbone's input every epoch"
  if config.mixup_alpha > 0 or config.cutmix_alpha > 0:
    return "mixup/cutmix mix the backbone's input images"
  if config.drop_path_rate > 0:  # frozen blocks drop branches in training too, as in timm
    return f"drop_path_rate={config.drop_path_rate} drops the backbone's branches at random"
  spec = models.spec(config.model)
  paths = optim.param_paths(param_labels)
  trained_backbone = [p for p, l in zip(paths, jax.tree_util.tree_leaves(param_labels))
                      if l != optim.FROZEN and not spec.is_head(p)]
  if trained_backbone:
    return f"backbone layers are trainable ({trained_backbone[0]}, ...)"
  if jax.process_count() > 1:
    return "multi-process runs stream images"
  return None


def cached_inputs(model, variables, ds, mesh, batch_size: int, seed: int, start_step: int):
  """Runs the frozen backbone once over both splits; batches of its feature maps.

  Returns:
    `(train_batches, val_batches, note)`: the training batches from `start_step` on, a function
    giving one ordered pass over validation, and one line saying what is held in host memory.
  """
  from transfer import steps
  feature_fn = steps.make_feature_step(model, mesh)
  train_x, train_y = compute_features(feature_fn, variables,
                                      ds.eval_batches("train", batch_size), mesh)
  if ds.num_val:
    val_x, val_y = compute_features(feature_fn, variables, ds.eval_batches("val", batch_size),
                                    mesh)
  else:
    val_x, val_y = train_x[:0], train_y[:0]
  note = (f"{len(train_x)} train / {len(val_x)} val feature maps {train_x.shape[1:]} in host "
          f"memory ({(train_x.nbytes + val_x.nbytes) / 2**20:.0f} MiB)")
  train_batches = feature_batches(train_x, train_y, batch_size, seed, start_step)
  return train_batches, lambda: feature_eval_batches(val_x, val_y, batch_size), note


def compute_features(feature_fn, variables, batches, mesh) -> tuple[np.ndarray, np.ndarray]:
  """Runs the frozen backbone once over `batches`; returns (features, labels) of real examples."""
  from transfer.data import prefetch_to_device
  feats, labels = [], []
  for batch in prefetch_to_device(batches, parallel.batch_sharding(mesh)):
    keep = np.asarray(batch["mask"]).astype(bool)
    feats.append(np.asarray(feature_fn(variables, batch["image"]))[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(feats), np.concatenate(labels)


def feature_batches(features, labels, batch_size: int, seed: int, start_step: int) -> Iterator:
  """Batches of cached features in exactly the order the image pipeline would give (same
  per-epoch permutation), so a cached run trains on the same batches as a streaming one."""
  from transfer.data.dataset import permutation
  n = len(features)
  steps_per_epoch = n // batch_size
  step = start_step
  while True:
    epoch, index = divmod(step, steps_per_epoch)
    rows = permutation(seed, epoch, n)[index * batch_size:(index + 1) * batch_size]
    yield {"image": features[rows], "label": labels[rows]}
    step += 1


def feature_eval_batches(features, labels, batch_size: int) -> Iterator:
  """Ordered, padded batches of cached features with a `mask`."""
  for start in range(0, len(features), batch_size):
    rows = np.arange(start, min(start + batch_size, len(features)))
    pad = batch_size - len(rows)
    idx = np.concatenate([rows, np.zeros(pad, np.int64)])
    yield {"image": features[idx], "label": labels[idx],
           "mask": np.arange(batch_size) < len(rows)}


def stage_inputs(config, param_labels, model, state, ds, mesh, start: int, log):
  """A stage's input: `(kind, train batches from its step `start`, val batches function)`.

  `kind` is `head` when the stage trains on backbone features computed once (`cache_features`
  with a frozen backbone and no augmentation), else `full` (images). `log` takes progress lines.
  """
  no_cache_reason = cache_features_reason(config, param_labels)
  if no_cache_reason is None:
    log("cache_features: running the frozen backbone once over train and val")
    train_iter, val_batches, note = cached_inputs(
        model, state.variables, ds, mesh, config.batch_size, config.seed, start)
    log(f"cache_features: {note}")
    return "head", train_iter, val_batches
  if config.cache_features:
    log(f"cache_features not used: {no_cache_reason}")
  return "full", ds.train_batches(start), lambda: ds.eval_batches("val", config.batch_size)


def data_position(ds, step: int, kind: str, steps_per_epoch: int) -> dict[str, int]:
  """Where a stage's input stands after `step` of its steps (stored with each checkpoint)."""
  if kind == "full" and hasattr(ds, "position"):
    return dict(ds.position(step))
  epoch, index = divmod(step, steps_per_epoch)
  return {"epoch": epoch, "index": index}
