"""Optimizers with freezing as structure: parameter paths -> labels -> `optax.partition`.

Frozen parameters get `optax.set_to_zero()`, which keeps no state, so a frozen VGG16 conv base
costs no optimizer memory. Trainable parameters are grouped by learning-rate multiplier
(`config.lr_mults`, and a ViT's layer-wise decay `config.layer_decay`), one optimizer per
group, so discriminative learning rates are also just labels. Every parameter gets exactly one
label; a pattern that matches nothing is an error, since a typo in a freeze pattern would
otherwise silently train (or freeze) the wrong layers.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import optax

from transfer import models
from transfer.errors import UserError

FROZEN = "frozen"
TRAINABLE = "trainable"


def path_str(path) -> str:
  """'block5_conv1/kernel' for a `jax.tree_util` key path."""
  parts = []
  for key in path:
    parts.append(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))))
  return "/".join(parts)


def param_paths(params) -> list[str]:
  """All parameter paths of a params tree, in tree order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _group_label(mult: float) -> str:
  """`trainable_x<mult>`, exact: `:g` where that reads back as the same float (0.1, and the
  labels of runs written before layer decay), else the float's full repr (0.75 ** 13)."""
  if mult == 1.0:
    return TRAINABLE
  short = f"{mult:g}"
  return f"{TRAINABLE}_x{short if float(short) == mult else repr(mult)}"


def multiplier(label: str) -> float:
  """The learning-rate multiple of a label: 0 for `frozen`, 1 for `trainable`, else `<mult>`."""
  if label == FROZEN:
    return 0.0
  return 1.0 if label == TRAINABLE else float(label[len(TRAINABLE) + 2:])


def layer_decay_scales(layers: Sequence[str], layer_depth, decay: float) -> dict[str, float]:
  """Each layer's learning-rate scale under layer-wise decay, as BEiT, MAE and timm
  (`param_groups_layer_decay`) compute it: `decay ** (max_depth - depth(layer))`.

  `layer_depth` is the model's (`ModelSpec.layer_depth`): 0 for the embeddings, i + 1 for block
  i, the last block's for the final norm (timm's grouping), depth + 1 (the largest) for the
  ImageNet top and the new `head`, so the head trains at the full rate, the final norm with the
  last block at `decay` and the patch embedding at `decay ** (depth + 1)`. Norms and biases
  inside a block share its scale (timm groups by block, not by kind), and weight decay is
  untouched (`weight_decay` as without layer decay).

  Args:
    layers: top-level layer names (`patch_embed`, `block3_attn_qkv`, `head`, ...).
    layer_depth: layer name -> its depth.
    decay: in (0, 1]; 1 scales nothing.

  Returns:
    `{layer: scale}`.
  """
  depths = {layer: layer_depth(layer) for layer in layers}
  top = max(max(depths.values(), default=0), layer_depth("head"))
  return {layer: decay ** (top - d) for layer, d in depths.items()}


def param_labels(params, trainable: Sequence[str], lr_mults: Mapping[str, float] | None = None,
                 layer_scales: Mapping[str, float] | None = None):
  """Labels every parameter `frozen`, `trainable` or `trainable_x<mult>`.

  Args:
    params: the params tree.
    trainable: regexes (`re.search`) over paths like `block5_conv1/kernel`; a parameter matching
      any of them is trained, every other one is frozen.
    lr_mults: `{regex: multiplier}` for trainable parameters; at most one may match a parameter.
    layer_scales: `{top-level layer: scale}` (`layer_decay_scales`), multiplied into each
      trainable parameter's `lr_mults` multiple; a frozen parameter stays frozen.

  Returns:
    A tree of label strings with the structure of `params`.

  Raises:
    UserError: a pattern matches no parameter, a multiplier pattern matches only frozen
      parameters, or two multiplier patterns match the same parameter.
  """
  paths = param_paths(params)
  lr_mults = dict(lr_mults or {})
  _check_patterns_match("trainable", trainable, paths)
  _check_patterns_match("lr_mults", lr_mults, paths)

  labels = []
  for path in paths:
    if not any(re.search(p, path) for p in trainable):
      labels.append(FROZEN)
      continue
    mults = [(p, float(m)) for p, m in lr_mults.items() if re.search(p, path)]
    if len(mults) > 1:
      raise UserError(f"parameter {path} matches several lr_mults patterns "
                      f"{[p for p, _ in mults]}; make them exclusive")
    mult = mults[0][1] if mults else 1.0
    if layer_scales:
      mult *= layer_scales[path.split("/", 1)[0]]
    labels.append(_group_label(mult))
  for pattern in lr_mults:
    if all(label == FROZEN for path, label in zip(paths, labels) if re.search(pattern, path)):
      raise UserError(f"lr_mults pattern {pattern!r} matches only frozen parameters; "
                      f"add them to `trainable` or drop the multiplier")
  treedef = jax.tree_util.tree_structure(params)
  return jax.tree_util.tree_unflatten(treedef, labels)


def _check_patterns_match(what: str, patterns, paths: list[str]) -> None:
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise UserError(f"{what} pattern {pattern!r} is not a valid regex: {e}") from None
    if not any(regex.search(p) for p in paths):
      layers = sorted({p.rsplit("/", 1)[0] for p in paths})
      raise UserError(f"{what} pattern {pattern!r} matches no parameter; layers are: "
                      f"{', '.join(layers)}")


SCHEDULES = ("constant", "cosine", "warmup_cosine", "one_cycle")


def make_schedule(config, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule named by `config.schedule`.

  `one_cycle` is fastai's `fit_one_cycle` (Smith's 1cycle) as optax builds it: cosine warm-up from
  `learning_rate / div_factor` to `learning_rate` over the first `pct_start` of the steps, then
  cosine annealing to `learning_rate / (div_factor * final_div_factor)` (PyTorch's and optax's
  meaning of the two factors; fastai's `div_final` is their product).
  """
  lr, warmup = config.learning_rate, max(0, config.warmup_steps)
  if config.schedule == "one_cycle":
    return optax.cosine_onecycle_schedule(max(total_steps, 1), lr, pct_start=config.pct_start,
                                          div_factor=config.div_factor,
                                          final_div_factor=config.final_div_factor)
  if config.schedule == "constant":
    if warmup:
      return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                   optax.constant_schedule(lr)], [warmup])
    return optax.constant_schedule(lr)
  if config.schedule in ("cosine", "warmup_cosine"):
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup,
                                              max(total_steps, warmup + 1))
  raise UserError(f"unknown schedule {config.schedule!r}; valid: {', '.join(SCHEDULES)}")


def make_momentum_schedule(config, total_steps: int) -> optax.Schedule | None:
  """fastai's momentum cycle for `one_cycle`, or None when the momentum stays fixed.

  Momentum falls from `max_momentum` to `base_momentum` while the rate warms up and rises back
  while it anneals (cosine both ways; fastai's moms=(0.95, 0.85, 0.95)). It applies to Adam's and
  AdamW's b1, and to SGD's and RMSprop's momentum when `momentum > 0` (an optimizer without
  momentum is not given one).
  """
  if config.schedule != "one_cycle" or not config.cycle_momentum:
    return None
  if config.optimizer in ("sgd", "rmsprop") and not config.momentum:
    return None
  steps = max(total_steps, 1)
  hi, lo = float(config.max_momentum), float(config.base_momentum)
  return optax.piecewise_interpolate_schedule(
      "cosine", hi, {int(config.pct_start * steps): lo / hi, steps: hi / lo})


def _base_optimizer(config, learning_rate, momentum=None) -> optax.GradientTransformation:
  """The optimizer named by `config.optimizer`; `momentum`: a schedule for its momentum (b1)."""
  name = config.optimizer
  # inject_hyperparams evaluates the momentum schedule at the optimizer's own step count.
  cycled = momentum is not None
  inject = optax.inject_hyperparams if cycled else (lambda f: f)
  b1 = {"b1": momentum} if cycled else {}
  if name == "adam":
    tx = inject(optax.adam)(learning_rate, **b1)
  elif name == "adamw":
    tx = inject(optax.adamw)(learning_rate, weight_decay=config.weight_decay, **b1)
  elif name == "sgd":
    tx = inject(optax.sgd)(learning_rate, momentum=momentum if cycled else config.momentum or None,
                           nesterov=False)
  elif name == "rmsprop":
    tx = inject(optax.rmsprop)(learning_rate, momentum=momentum if cycled else config.momentum)
  else:
    raise UserError(f"unknown optimizer {name!r}; valid: adam, adamw, sgd, rmsprop")
  if config.weight_decay and name != "adamw":
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


# The config keys the optimizer reads; each is also a keyword of `make_optimizer`, with the
# default config's value (`transfer/configs/default.py`) as its default.
OPTIONS = ("optimizer", "learning_rate", "schedule", "warmup_steps", "momentum", "weight_decay",
           "grad_clip_norm", "trainable", "lr_mults", "train_bn", "pct_start", "div_factor",
           "final_div_factor", "cycle_momentum", "max_momentum", "base_momentum", "layer_decay")


class Optimizer(NamedTuple):
  """What `make_optimizer` builds: unpacks as `tx, labels = make_optimizer(...)`.

  Attributes:
    tx: an `optax.partition` over the label groups: `frozen` params go through
      `optax.set_to_zero()` (no update, no optimizer state), each `trainable[_x<mult>]` group
      through the named optimizer at its learning rate.
    labels: the label tree, the params' structure with one label per parameter (`FROZEN`,
      `TRAINABLE` or `trainable_x<mult>`): which params train, at which rate multiple.
  """

  tx: optax.GradientTransformation
  labels: Any

  @property
  def multipliers(self) -> Any:
    """The params' structure with each one's learning-rate multiple (`lr_mults` times the
    layer decay's scale; 0 for frozen)."""
    return jax.tree_util.tree_map(multiplier, self.labels)

  @property
  def frozen_batch_norm(self) -> frozenset[str]:
    """The BatchNorm layers that stay in inference mode when training (`frozen_batch_norm`)."""
    return frozen_batch_norm(self.labels)

  def describe(self, params) -> str:
    """One line: trainable and frozen counts, and the trained layers."""
    return describe(params, self.labels)


def make_optimizer(params, config=None, total_steps: int | None = None, *,
                   schedule: str | optax.Schedule | None = None, **options) -> Optimizer:
  """Builds the optimizer and its freeze labels, from a run config or from keywords.

      tx, labels = make_optimizer(params, learning_rate=1e-3, optimizer="sgd",
                                  trainable=["^head/", "^conv5_"], train_bn=True)
      tx, labels = make_optimizer(params, config, total_steps)   # a run's config

  Args:
    params: the params tree to label (arrays or `jax.ShapeDtypeStruct`s).
    config: a run config (`transfer.configs`); None: the default config's values.
    total_steps: the steps decaying schedules (`cosine`, `warmup_cosine`, `one_cycle`) decay
      over; not needed for a `constant` one.
    schedule: a schedule's name (the config key: constant, cosine, warmup_cosine, one_cycle),
      or an optax schedule to use instead of the configured one (the LR finder's exponential
      sweep); `lr_mults` still scale it.
    **options: any of `OPTIONS`, overriding the config's value: `optimizer` (adam, adamw, sgd,
      rmsprop), `learning_rate`, `warmup_steps`, `momentum`, `weight_decay`,
      `grad_clip_norm`, `trainable` (regexes over paths like `block5_conv1/kernel`; the rest is
      frozen), `lr_mults` (`{regex: multiplier}`), `train_bn` (BatchNorm layers train inside
      frozen blocks, fastai's `train_bn`), the one-cycle keys (`pct_start`, `div_factor`,
      `final_div_factor`, `cycle_momentum`, `max_momentum`, `base_momentum`) and
      `layer_decay` (a ViT's layer-wise rate decay, `layer_decay_scales`; it multiplies any
      `lr_mults` multiple of the same parameter, as timm's `lr_scale` multiplies a group's
      rate; without `config` the architecture is the registered one whose layers `params`
      holds). Defaults and allowed values are the config's (`transfer/configs/default.py`,
      checked as a config is).

  Returns:
    An `Optimizer`: `(tx, labels)`.

  Raises:
    UserError: an unknown option or a bad value (one line naming it), a decaying schedule
      without `total_steps`, or a freeze pattern that matches nothing.
  """
  if isinstance(schedule, str):  # the config key, not a schedule function
    options, schedule = {**options, "schedule": schedule}, None
  model = models.spec(config.model) if config is not None else _registered_model(params)
  kinds = model.layer_kinds if model is not None else None
  if config is None and model is None and options.get("layer_decay", 1.0) != 1.0:
    raise UserError(f"layer_decay={options['layer_decay']} scales each transformer block's "
                    f"rate, but these params are no registered model's; pass the run's config")
  config = _optimizer_config(config, options, model.name if model is not None else None)
  if total_steps is None:
    if schedule is None and config.schedule != "constant":
      raise UserError(f"schedule {config.schedule!r} decays over the run: pass total_steps= "
                      f"to make_optimizer (or schedule='constant')")
    total_steps = 1
  lr_mults = {k: float(v) for k, v in dict(config.lr_mults).items()}
  trainable = list(config.trainable)
  if config.train_bn:  # fastai's train_bn: BatchNorm keeps training in frozen blocks
    trainable += [f"^{name}/" for name in batch_norm_layers(params, kinds)]
  scales = None
  if config.layer_decay != 1.0:
    depth = _layer_depth(model, config.layer_decay)
    scales = layer_decay_scales(list(params), depth, config.layer_decay)
  labels = param_labels(params, trainable, lr_mults, scales)
  schedule = make_schedule(config, total_steps) if schedule is None else schedule
  momentum = make_momentum_schedule(config, total_steps)
  transforms: dict[str, Any] = {FROZEN: optax.set_to_zero()}
  for label in sorted(set(jax.tree_util.tree_leaves(labels)) - {FROZEN}):
    mult = multiplier(label)
    scaled = schedule if mult == 1.0 else (lambda s, m=mult: m * schedule(s))
    transforms[label] = _base_optimizer(config, scaled, momentum)
  return Optimizer(optax.partition(transforms, labels), labels)


def _layer_depth(model, decay: float):
  """The layer depths `layer_decay` needs: the model's (`ModelSpec.layer_depth`)."""
  if model.layer_depth is None:
    raise UserError(f"layer_decay={decay} scales each transformer block's rate; {model.name} "
                    f"has no blocks of that kind: drop it (1.0), or give blocks their own rates "
                    f"with lr_mults")
  return model.layer_depth


def _registered_model(params):
  """The registered architecture whose backbone layers are exactly those of `params` (besides
  the new `head`), for `make_optimizer` called without a config; None when there is none."""
  layers = set(params) - {"head"}
  for spec in map(models.spec, models.names()):
    if layers - set(spec.top_layers) == set(spec.conv_layers):
      return spec
  return None


def _optimizer_config(config, options: dict[str, Any], model: str | None = None):
  """`config` with `options` set (validated as a config is), or the default config with them
  (and `model`, the architecture the params are, when known)."""
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise UserError(f"make_optimizer got unknown option(s) {', '.join(unknown)}; valid: "
                    f"{', '.join(OPTIONS)}")
  if config is not None and not options:
    return config
  from transfer import configs
  import ml_collections
  base = ml_collections.ConfigDict() if config is None else ml_collections.ConfigDict(
      config.to_dict())
  with base.unlocked():
    if config is None and model is not None:
      base.model = model
    for key, value in options.items():
      base[key] = list(value) if key == "trainable" and not isinstance(value, str) else value
  return configs.validate(base)


def batch_norm_layers(params, kinds: Mapping[str, str] | None = None) -> tuple[str, ...]:
  """Names of the BatchNorm layers of a params (or label) tree, as the architecture declares
  them (`ModelSpec.layer_kinds`), never guessed from the arrays: a LayerNorm has a `scale` and
  a `bias` too, and must neither train under `train_bn` nor run in the BatchNorm mode.

  Args:
    params: a params or label tree.
    kinds: layer -> kind (`models.spec(name).layer_kinds`); default: the declaration of the
      registered architecture whose layers the tree holds (`models.layer_kinds_of`).
  """
  kinds = models.layer_kinds_of(params) if kinds is None else kinds
  return tuple(sorted(k for k in params if kinds.get(k) == models.BATCH_NORM))


def frozen_batch_norm(labels) -> frozenset[str]:
  """The BatchNorm layers a train step keeps in inference mode: those whose bias is frozen.

  A frozen BatchNorm layer normalises with its running statistics and never updates them
  (Keras' behaviour since TF 2, timm's FrozenBatchNorm), so a frozen backbone trains as VGG's
  does; a layer that trains (`trainable` or `train_bn`) uses batch statistics. This is what a
  model's `frozen_batch_norm` attribute takes (`transfer.models.backbone.Classifier`).
  """
  return frozenset(name for name in batch_norm_layers(labels)
                   if labels[name]["bias"] == FROZEN)


def trainable_mask(labels) -> Any:
  """Bool tree: True where the label is not `frozen`."""
  return jax.tree_util.tree_map(lambda l: l != FROZEN, labels)


def count_params(params, labels) -> tuple[int, int]:
  """(trainable, frozen) parameter counts."""
  sizes = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda p: int(p.size), params))
  flags = jax.tree_util.tree_leaves(trainable_mask(labels))
  trainable = sum(s for s, f in zip(sizes, flags) if f)
  return trainable, sum(sizes) - trainable


def describe(params, labels) -> str:
  """One line for the log: trainable and frozen counts, and the trained layers."""
  trainable, frozen = count_params(params, labels)
  paths = param_paths(params)
  layers = sorted({p.rsplit("/", 1)[0] for p, l in zip(paths, jax.tree_util.tree_leaves(labels))
                   if l != FROZEN})
  return (f"params: {trainable:,} trainable, {frozen:,} frozen; "
          f"training {', '.join(layers) or 'nothing'}")

