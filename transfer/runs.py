"""What a run is: its model and initial variables built from a config, and the metadata stored
with every checkpoint that rebuilds the model without the config.

Train, eval, predict and bench build a run's model here (`build_model`, `initial_variables`,
`model_from_meta`), so the rules (two classes train one sigmoid logit, `weights=none` is random
init, `?` means use-if-cached, the ResNet variant follows the weights) are written once. The
workdir's own record of the run (config.json, its history, the rerun checks) is
`transfer.workdir`.
"""

from __future__ import annotations

import os
from typing import Any

from transfer import configs, ema, models
from transfer.errors import UserError
from transfer.workdir import format_changes

def weights_source(weights: str | None):
  """A run's `weights`, parsed once (`transfer.weights.sources.resolve`): a `ParsedSource` with
  its format, architecture, variant, preprocessing and eval geometry; `.source` is None for
  random init. Build it once per run and pass it to `data.create` (`preprocess_source`),
  `build_model`, `initial_variables` and `run_metadata`."""
  from transfer.weights import sources
  return sources.resolve(weights)


def run_source(config):
  """The parsed source a run's params, preprocessing, eval geometry and variant follow.

  Without `init_from`, the config's `weights` (`weights_source`). With `init_from`, the params
  come from that run, so its source does too, as recorded with its checkpoint (`source_record`):
  training them on another input normalisation than they learned would silently start from
  worse features. The config's own `weights` then loads nothing; when it would imply another
  preprocessing, `inherited_note` says which one is kept.
  """
  if not config.init_from:
    return weights_source(config.weights)
  recorded = _recorded_run(config.init_from)
  if not recorded:  # no checkpoint there: `variables_from_workdir` says so
    return weights_source(config.weights)
  return source_from_record(recorded)


def inherited_note(config, source) -> str:
  """For an `init_from` run: one line when its config's `weights` would have preprocessed
  otherwise than the run its params come from ('' when they agree)."""
  if not config.init_from:
    return ""
  own = weights_source(config.weights)
  if own.preprocess == source.preprocess:
    return ""
  return (f"preprocessing {source.preprocess} kept from {config.init_from} (its weights "
          f"{source.weights}); this config's weights={own.weights} would use {own.preprocess} "
          f"and load nothing with init_from")


def source_record(source) -> dict[str, Any]:
  """The JSON record of a parsed source, stored with a run's checkpoints (`run_metadata`)."""
  return {"weights": source.weights, "source": source.source, "format": source.format,
          "framework": source.framework, "arch": source.arch, "variant": source.variant,
          "preprocess": source.preprocess, "resize_size": source.resize_size,
          "input_size": source.input_size, "interpolation": source.interpolation,
          "include_top": source.include_top}


def source_from_record(recorded: dict[str, Any]):
  """The parsed source of a trained run, from its run metadata: nothing is re-read from the
  weights (their file may be gone). Runs recorded before `source` was stored give their
  `preprocessing` and `variant`, with the default geometry."""
  from transfer.weights import sources
  record = recorded.get("source") or {
      "weights": recorded.get("weights") or "none", "source": None,
      "preprocess": recorded["preprocessing"], "variant": recorded.get("variant")}
  record = dict(record, optional=False)
  entry = sources.get(record["source"]) if (record.get("source") and
                                            sources.is_id(record["source"])) else None
  return sources.ParsedSource(entry=entry, **record)


def output_count(config, num_classes: int) -> int:
  """Model outputs: one sigmoid logit for two classes (`binary_sigmoid`), else one per class."""
  if num_classes == 2 and config.binary_sigmoid and config.head != "imagenet":
    return 1
  return num_classes


def model_variant(config, source=None) -> str | None:
  """The architecture variant to build (ResNet: `keras` v1 or `torchvision` v1.5), else None.

  `variant=auto` builds what the run's params need: the variant of the `init_from` run, or the
  one the weight file was made for, or the model's default for random initialisation.
  `source` is the run's parsed weights (`weights_source`), parsed here when not given.
  """
  spec = models.spec(config.model)
  if not spec.variants:
    return None
  chosen = config.variant
  if config.init_from:
    recorded = _recorded_run(config.init_from).get("variant")
    if recorded and chosen not in ("auto", recorded):
      raise UserError(f"variant={chosen} but init_from={config.init_from} trained the "
                      f"{recorded} variant, whose params fit only that form; use "
                      f"--config.variant=auto")
    if recorded:
      return recorded
  if chosen != "auto":
    return chosen
  source = source or weights_source(config.weights)
  if source.source:
    from transfer import weights as weights_lib
    needed = weights_lib.variant_for(source, spec.name)
    if needed:
      return needed
  return spec.variants[0]


def _recorded_run(workdir: str) -> dict[str, Any]:
  """The run metadata of another run's latest checkpoint ({} when it has none)."""
  from transfer import checkpoint as ckpt_lib
  if not os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
    return {}
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    step = checkpointer.latest_step()
    return checkpointer.restore_meta(step).get("run", {}) if step is not None else {}
  finally:
    checkpointer.close()


def model_options(config) -> dict[str, Any]:
  """The family's own build options a config sets (`ModelSpec.options`: a ViT's `token_pool`,
  `drop_path_rate`, `attention`), as `models.get` keywords; `{}` for a model without them.
  `token_pool="auto"` is left to the model's own default. The config check
  (`configs._schema.check_model_options`) has already refused one set on a model without it."""
  options = models.spec(config.model).options
  chosen = {"token_pool": None if config.token_pool == "auto" else config.token_pool,
            "drop_path_rate": config.drop_path_rate, "attention": config.attention}
  return {k: v for k, v in chosen.items() if k in options}


def build_model(config, num_classes: int, dtype: str | None = None, source=None):
  """The run's model for a dataset of `num_classes` classes.

  Args:
    config: the run config (model, head, head_hidden, head_dropout, image_size, dtype, conv, and
      a ViT's token_pool, drop_path_rate, attention).
    num_classes: classes in the data.
    dtype: compute dtype override (default: `config.dtype`, resolved for this backend).
    source: the run's parsed weights (`weights_source`), which pick the variant.

  Returns:
    `(model, outputs)`: the unbound Flax module and its number of outputs.
  """
  outputs = output_count(config, num_classes)
  models.check_image_size(config.model, config.head, config.image_size)
  model = models.get(config.model, head=config.head, num_classes=outputs,
                     head_hidden=config.head_hidden, head_dropout=config.head_dropout,
                     dtype=dtype or models.resolve_dtype(config.dtype), conv=config.conv,
                     variant=model_variant(config, source), **model_options(config))
  return model, outputs


def initial_variables(config, model, shapes=None, data_identity=None, source=None):
  """Variables before training: another run's (`init_from`), pretrained weights, or random.

  Args:
    config: the run config (init_from, weights, image_size, seed).
    model: the module from `build_model`.
    shapes: its params tree of `jax.ShapeDtypeStruct`s (computed when not given).
    data_identity: this run's `Dataset.identity()`, checked against an `init_from` run's.
    source: the run's parsed source (`run_source`); parsed here when not given.

  Returns:
    `(variables, note)`: `{"params"}` (and `"batch_stats"` for BatchNorm networks) and one line
    saying where they came from.
  """
  import jax
  if config.init_from:
    if shapes is None:
      shapes = jax.eval_shape(lambda: models.init_params(model, config.image_size, config.seed))
    variables = variables_from_workdir(config.init_from, shapes, data_identity)
    note = inherited_note(config, source or run_source(config))
    return variables, f"params from run {config.init_from} (init_from)" + (f"; {note}" if note
                                                                             else "")
  source = source or weights_source(config.weights)
  if source.source is None:
    return (models.init_variables(model, config.image_size, config.seed),
            "random initialisation (weights=none)")
  from transfer import weights as weights_lib
  if models.spec(config.model).batch_norm:
    variables, report = weights_lib.load_variables(
        config.weights, model, image_size=config.image_size, rng=config.seed, return_report=True,
        variant_option="--config.variant")
    return dict(variables), report.summary()
  params, report = weights_lib.load(config.weights, model, image_size=config.image_size,
                                    rng=config.seed, return_report=True)
  return {"params": params}, report.summary()


def variables_from_workdir(other: str, shapes, data_identity=None):
  """The latest variables of another run, its params merged strictly into the tree described by
  `shapes` (its BatchNorm statistics come with their layers).

  When the other run trained on the same dataset, its split must be this run's split: a
  different hold-out would put its validation images into this run's training data.
  """
  import jax
  import jax.numpy as jnp
  from flax import traverse_util
  from transfer import checkpoint as ckpt_lib
  if not os.path.isdir(ckpt_lib.checkpoint_dir(other)):
    raise UserError(f"init_from={other}: no checkpoint there; train that run first")
  checkpointer = ckpt_lib.Checkpointer(other, read_only=True)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise UserError(f"init_from={other}: no checkpoint there; train that run first")
    meta = checkpointer.restore_meta(step)
    theirs_data = meta["run"].get("data") or {}
    if data_identity and theirs_data.get("dataset") == data_identity.get("dataset"):
      check_same_data(theirs_data, data_identity, f"init_from={other}")
    their_variables, _ = checkpointer.restore_variables(step)
  finally:
    checkpointer.close()
  theirs = their_variables["params"]
  fresh_flat, their_flat = traverse_util.flatten_dict(shapes), traverse_util.flatten_dict(theirs)
  problems = [("/".join(k), v.shape, their_flat[k].shape) for k, v in fresh_flat.items()
              if k in their_flat and tuple(their_flat[k].shape) != tuple(v.shape)]
  missing = ["/".join(k) for k in fresh_flat if k not in their_flat]
  extra = ["/".join(k) for k in their_flat if k not in fresh_flat]  # never dropped silently
  if problems or missing or extra:
    raise UserError(f"init_from={other} (model {meta['run']['model']}, head {meta['run']['head']}"
                    f", variant {meta['run'].get('variant')}) does not fit this model: missing "
                    f"{missing[:5]}, extra {extra[:5]}, mis-shaped {problems[:5]}")
  variables = {"params": traverse_util.unflatten_dict(
      {k: jnp.asarray(their_flat[k]) for k in fresh_flat})}
  if "batch_stats" in their_variables:
    variables["batch_stats"] = jax.tree_util.tree_map(jnp.asarray,
                                                      their_variables["batch_stats"])
  return variables


# Which params a trained run serves with is decided in `transfer.ema`; these names stay for
# callers of the public API.
serving_variables = ema.serving_variables
has_ema = ema.has_ema


# ----------------------------------------------------------------------------- checkpoint metadata


def run_metadata(config, class_names: list[str], outputs: int,
                 data: dict[str, Any] | None = None, *, conv: str,
                 variant: str | None = None, source=None, model=None) -> dict[str, Any]:
  """The JSON metadata, stored with every checkpoint, that rebuilds the model without the config.

  `data` is the dataset's identity (`Dataset.identity()`: absolute root and split fingerprint),
  which resume, `init_from` and eval compare against the data they are given. `conv` is the
  concrete conv choice the run's model compiled with (`build_model(...)[0].conv`), on record
  only: `model_from_meta` resolves `auto` again for the machine that evaluates.
  `preprocessing` is the parsed weights' (`source`, from `run_source`; parsed here when not
  given): eval, predict and export read it from here, never from `weights` again; `source` the
  whole parsed source (`source_record`), which an `init_from` run inherits. `platform` is what
  else the compiled programs depended on (`transfer.platform.facts`: the XLA flags in effect,
  huge pages), on record only. `model` (from `build_model`) gives the family options the module
  was built with (`recorded_options`), so `model_from_meta` builds the same one.
  """
  from transfer import platform
  source = source or run_source(config)
  return {"model": config.model, "head": config.head, "head_hidden": config.head_hidden,
          "head_dropout": config.head_dropout, "outputs": outputs,
          "class_names": list(class_names), "weights": config.weights,
          "preprocessing": source.preprocess, "source": source_record(source),
          "image_size": config.image_size, "eval_crop": config.eval_crop,
          "dtype": models.resolve_dtype(config.dtype), "conv": conv, "variant": variant,
          "dataset": config.dataset, "optimizer": config.optimizer,
          # The optimizer's state structure follows these, so resuming needs them unchanged.
          "trainable": list(config.trainable), "lr_mults": dict(config.lr_mults),
          "layer_decay": config.layer_decay, **recorded_options(config, model),
          "data": data, "platform": platform.facts()}


def recorded_options(config, model=None) -> dict[str, Any]:
  """The model options a run records (`run_metadata`): `token_pool` as built (the model's own
  default in place of `auto`, so a later default cannot change a trained run's features),
  `drop_path_rate`, and `attention` as resolved, on record only (like `conv`). None for a model
  without them."""
  options = models.spec(config.model).options
  record = {"token_pool": config.token_pool, "drop_path_rate": config.drop_path_rate,
            "attention": config.attention}
  if model is not None:
    record.update({k: getattr(model, k) for k in record if k in options})
  return {k: (v if k in options else None) for k, v in record.items()}


def model_from_meta(meta: dict[str, Any], dtype: str | None = None, conv: str = "auto",
                    attention: str = "auto"):
  """Rebuilds the trained model from checkpoint metadata (`run_metadata`).

  The conv and attention choices are resolved again (`auto`) for this machine unless `conv` /
  `attention` name one (export asks for `xla`: an artifact runs on machines we do not know):
  they change speed and float32 rounding, not the params. A ViT's recorded `token_pool` and
  `drop_path_rate` are rebuilt as trained; runs recorded before they were (and models without
  them) get the model's defaults.
  """
  options = models.spec(meta["model"]).options
  recorded = {k: meta.get(k) for k in ("token_pool", "drop_path_rate") if k in options}
  if "token_pool" in recorded and recorded["token_pool"] == "auto":
    recorded["token_pool"] = None
  if "attention" in options:
    recorded["attention"] = attention
  return models.get(meta["model"], head=meta["head"], num_classes=meta["outputs"],
                    head_hidden=meta["head_hidden"], head_dropout=meta["head_dropout"],
                    dtype=dtype or meta["dtype"], variant=meta.get("variant"), conv=conv,
                    **recorded)


def check_same_run(saved: dict[str, Any], current: dict[str, Any], workdir: str) -> None:
  """Refuses to resume a checkpoint whose model, head, classes or optimizer structure differ.

  The keys compared are the config keys whose role is `STATE` in `transfer/configs/_schema.py`
  and the metadata derived from the identity (`DERIVED_STATE`: outputs, class names,
  preprocessing).

  `check_rerun` compares configs first; this reads the checkpoint's own record, so it also holds
  for a workdir whose config.json was lost.
  """
  keys = sorted(configs.keys_with(configs.STATE)) + list(configs.DERIVED_STATE)
  changed = {k: (saved[k], current.get(k)) for k in keys
             if k in saved and saved[k] != current.get(k)}
  if changed:
    raise UserError(f"{workdir} holds a different run: {format_changes(changed)}; nothing "
                    f"was changed there. Use another --workdir, or --config.init_from={workdir} "
                    "to start a new run from its params")


def check_same_data(saved: dict[str, Any] | None, current: dict[str, Any] | None,
                    what: str) -> None:
  """Refuses data whose split differs from the one a checkpoint was trained on."""
  if not saved or not current:
    return
  from transfer import data as data_lib
  data_lib.check_same_data(saved, current, what)
