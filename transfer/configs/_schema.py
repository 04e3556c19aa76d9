"""What each config key may hold and what it is to a run: the one table beside `default.py`.

`default.py` gives every key its default (the only place one lives); this module gives the
allowed values of every key with a range or a fixed set of choices, the checks across keys, and
each key's role (`ROLES`): part of the run's identity, or bookkeeping. `transfer.configs.validate`
reads it when a config is loaded, so a bad value fails before any data is read or anything is
compiled, with one line that names the key, the value and what is allowed; the rerun checks
(`transfer.workdir.check_rerun`, `transfer.runs.check_same_run`) read the roles. The name lists
must match the code that consumes them (optim.py, models, parallel.py, data); and every key of
the default config must have a role: tests/test_configs.py checks both.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Range:
  """Numbers from `low` to `high`; `off` is one extra value meaning "not set" (like -1).

  Attributes:
    low: lower bound, or None.
    high: upper bound, or None.
    low_open: the bound itself is excluded (`> low` rather than `>= low`).
    high_open: likewise for `high`.
    off: a value outside the range that is also allowed (e.g. -1 = "at the end of every epoch").
    waived_by: another key; when that key is > 0 this one is not checked (num_epochs is unused
      once num_steps is set).
  """

  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  off: int | None = None
  waived_by: str | None = None

  def allows(self, value) -> bool:
    """Whether `value` is a real number inside the range (or equal to `off`)."""
    if self.off is not None and value == self.off:
      return True
    if isinstance(value, float) and math.isnan(value):
      return False
    if self.low is not None and (value <= self.low if self.low_open else value < self.low):
      return False
    if self.high is not None and (value >= self.high if self.high_open else value > self.high):
      return False
    return True

  def describe(self) -> str:
    """The rule in words: `> 0`, `in [0, 1)`, `-1 or >= 1`."""
    if self.low is not None and self.high is not None:
      text = (f"in {'(' if self.low_open else '['}{_num(self.low)}, "
              f"{_num(self.high)}{')' if self.high_open else ']'}")
    elif self.low is not None:
      text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
    else:
      text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
    if self.off is not None:
      text = f"{self.off} or {text}"
    if self.waived_by:
      text += f" (or set {self.waived_by} > 0)"
    return text


def _num(x) -> str:
  return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE = Range(low=0, low_open=True)
AT_LEAST_ONE = Range(low=1)
NON_NEGATIVE = Range(low=0)
FRACTION = Range(low=0, high=1, high_open=True)          # [0, 1)
CROP = Range(low=0, high=1, low_open=True)               # (0, 1]
EVERY = Range(low=0, low_open=True, off=-1)              # -1 (per epoch / off) or > 0

RANGES: dict[str, Range] = {
    "learning_rate": POSITIVE,
    "batch_size": AT_LEAST_ONE,
    "num_epochs": Range(low=1, waived_by="num_steps"),
    "num_steps": EVERY,
    "val_fraction": FRACTION,
    "head_dropout": FRACTION,
    "eval_crop": CROP,
    "train_crop": CROP,
    "momentum": FRACTION,
    "weight_decay": NON_NEGATIVE,
    "grad_clip_norm": NON_NEGATIVE,    # 0 = no clipping
    "warmup_steps": NON_NEGATIVE,
    "pct_start": Range(low=0, high=1, low_open=True, high_open=True),
    "div_factor": Range(low=1),
    "final_div_factor": Range(low=1),
    "max_momentum": FRACTION,
    "base_momentum": FRACTION,
    "image_size": AT_LEAST_ONE,        # the model's own minimum: models.check_image_size
    "keep_checkpoints": AT_LEAST_ONE,
    "keep_best_checkpoints": NON_NEGATIVE,
    "prefetch": AT_LEAST_ONE,
    "data_workers": NON_NEGATIVE,      # 0 = min(16, cpus)
    "seed": NON_NEGATIVE,
    "head_hidden": AT_LEAST_ONE,
    "log_every_steps": EVERY,
    "eval_every_steps": EVERY,
    "checkpoint_every_steps": EVERY,
    "label_smoothing": FRACTION,
    "mixup_alpha": NON_NEGATIVE,       # 0 = off
    "cutmix_alpha": NON_NEGATIVE,      # 0 = off
    "ema_decay": FRACTION,             # 0 = no EMA
    "randaugment_n": AT_LEAST_ONE,
    "randaugment_m": Range(low=0, high=10),  # timm's magnitude scale (_LEVEL_DENOM = 10)
    "drop_path_rate": FRACTION,
    "layer_decay": CROP,               # 1.0 = off (timm's layer_decay=None)
}

# Keys with a fixed set of names.
CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adam", "adamw", "sgd", "rmsprop"),           # optim._base_optimizer
    "schedule": ("constant", "cosine", "warmup_cosine", "one_cycle"),  # optim.SCHEDULES
    "head": ("imagenet", "flatten_dense", "gap", "none"),       # models.heads.HEADS
    "dtype": ("auto", "float32", "bfloat16", "float16"),        # models.as_dtype
    "conv": ("auto", "xla", "winograd"),                        # models.CONVS
    "parallel": ("shard_map", "pmap"),                          # parallel.MODES
    "augment": ("none", "flip", "crop_flip", "inception_crop", "randaugment"),  # data.augmentation.AUGMENTS
    "cache_images": ("", "memory", "disk"),                     # data.pipeline.CACHES
    "data_worker_kind": ("thread", "process"),                  # data.workers.KINDS
    "labels_from": ("folders", "filename"),
    "variant": ("auto", "keras", "torchvision"),                # resnet, inception .VARIANTS
    "token_pool": ("auto", "tok", "gap", "tok_gap", "none"),    # auto + models.vit.TOKEN_POOLS
    "attention": ("auto", "xla", "cudnn"),                      # auto + models.vit.ATTENTIONS
}

# A family's own build options (`ModelSpec.options`: a ViT's), each a config key of that name.
# Set to anything but its default on a model without it, it is refused (`check_model_options`),
# never silently ignored.
MODEL_OPTIONS = ("token_pool", "drop_path_rate", "attention")


def check_model_options(config) -> None:
  """Refuses a model option (`MODEL_OPTIONS`) or `layer_decay` the chosen model does not have:
  `token_pool` on a ResNet, `layer_decay` on a network without transformer blocks. Left at
  their defaults they are nothing to refuse, and `transfer.models` is not imported."""
  from transfer.configs import default
  from transfer.errors import UserError
  defaults = default.get_config()
  changed = [k for k in MODEL_OPTIONS if config[k] != defaults[k]]
  decay = config.layer_decay != defaults.layer_decay
  if not changed and not decay:
    return
  from transfer import models
  spec = models.spec(config.model)
  for key in changed:
    if key not in spec.options:
      raise UserError(f"{key}={config[key]!r} is an option of the transformer models; "
                      f"{config.model} has no {key}: drop it (leave it at "
                      f"{defaults[key]!r})")
  if decay and spec.layer_depth is None:
    raise UserError(f"layer_decay={config.layer_decay!r} scales each transformer block's rate; "
                    f"{config.model} has no blocks of that kind: drop it (1.0), or give blocks "
                    f"their own rates with lr_mults")


def check_stages(config, check) -> None:
  """Checks `config.stages`: each a dict of known stage keys whose whole config passes `check`.

  Raises:
    UserError: one line naming the stage (`stages[1]`, 0-based as in the config) and the problem.
  """
  from transfer import stages
  from transfer.errors import UserError
  if not config.stages:
    return
  try:
    stage_configs = stages.stage_configs(config)
  except ValueError as e:
    raise UserError(str(e)) from None
  for i, (stage, stage_config) in enumerate(zip(config.stages, stage_configs)):
    try:
      check(stage_config)
    except UserError as e:
      raise UserError(stage_error(i, stage, str(e))) from None


def stage_error(index: int, stage, message: str) -> str:
  """A stage's error: `stages[1].learning_rate=-1.0 ...` when it is about a key the stage sets,
  else `stages[1]: ...` (a check across keys, one of them inherited)."""
  key = message.split("=", 1)[0]
  if "=" in message and key in dict(stage):
    return f"stages[{index}].{message}"
  return f"stages[{index}]: {message}"


def check_lengths(config, plan) -> None:
  """The checks that need each stage's length in steps, known once the data is (`num_epochs`):
  `plan` is `[(stage config, steps), ...]`, one per stage (`stages.plan`)."""
  from transfer.errors import UserError
  for i, (stage_config, steps) in enumerate(plan):
    try:
      check_warmup(stage_config, steps)
    except UserError as e:
      if not config.stages:
        raise
      raise UserError(stage_error(i, config.stages[i], str(e))) from None


def check_warmup(config, steps: int | None = None) -> None:
  """A warm-up must end before the steps it warms up do, or the rate never reaches
  `learning_rate`. `steps`: the (stage) config's length, when known only from the data (epochs);
  by default `num_steps` when set. A staged config is checked stage by stage."""
  from transfer.errors import UserError
  if steps is None:
    steps = config.num_steps if config.num_steps > 0 else None
  if (config.stages or steps is None or config.warmup_steps <= 0
      or config.schedule == "one_cycle"):
    return
  if config.warmup_steps >= steps:
    raise UserError(f"warmup_steps={config.warmup_steps} is not shorter than the {steps} steps it "
                    f"warms up, so the rate would never reach learning_rate="
                    f"{config.learning_rate}; lower warmup_steps below {steps} or train longer")


def check_one_cycle(config) -> None:
  """`one_cycle` warms up over `pct_start` of the steps; a `warmup_steps` would be ignored."""
  from transfer.errors import UserError
  if config.schedule == "one_cycle" and config.warmup_steps > 0:
    raise UserError(f"warmup_steps={config.warmup_steps} does not apply to schedule=one_cycle, "
                    f"whose warm-up is pct_start={config.pct_start} of the steps; set "
                    f"warmup_steps=0")


def check_labels_from(config) -> None:
  """`labels_from` chooses how a folder dataset names its classes; elsewhere it would be ignored."""
  from transfer.errors import UserError
  if config.labels_from != "folders" and not str(config.dataset).startswith("folder:"):
    raise UserError(f"labels_from={config.labels_from!r} applies to folder:PATH datasets only, "
                    f"not {config.dataset!r}; leave it at 'folders'")


# What a key is to a run. A rerun of a workdir may change bookkeeping (logged in the run's
# config_history.jsonl) but no part of its identity (refused, naming the keys: workdir.check_rerun).
IDENTITY = "identity"        # changes the math of a step, the data or the state's structure
STATE = "state"              # identity, and recorded with every checkpoint (runs.run_metadata):
                             # resume checks it against the checkpoint's own record too
                             # (runs.check_same_run), which holds without config.json
LENGTH = "length"            # how long the run is: bookkeeping, unless the schedule depends on
                             # the total length (a schedule other than constant, or stages)
BOOKKEEPING = "bookkeeping"  # how often, how many, where and how fast: not the run's math

# Every key of `default.get_config()`, by its flat name (`synthetic.base_size`; `lr_mults` and
# `stages` whole). A key added to default.py without a role here fails tests/test_configs.py.
ROLES: dict[str, str] = {
    # Model.
    "model": STATE, "variant": STATE, "weights": IDENTITY, "head": STATE, "head_hidden": STATE,
    "head_dropout": IDENTITY, "num_classes": IDENTITY, "binary_sigmoid": IDENTITY,
    # token_pool sets the head's input (its shape with tok_gap); drop_path_rate only the math of
    # a training step; attention, like conv, the kernel (speed and rounding, not the math).
    "token_pool": STATE, "drop_path_rate": IDENTITY, "attention": BOOKKEEPING,
    # Only read when a run starts from step 0; a resumed run's params come from its checkpoint.
    "init_from": BOOKKEEPING,
    # Data.
    "dataset": IDENTITY, "data_dir": BOOKKEEPING, "train_split": IDENTITY,
    "val_split": IDENTITY, "val_fraction": IDENTITY, "labels_from": IDENTITY,
    "image_size": STATE, "augment": IDENTITY, "randaugment_n": IDENTITY,
    "randaugment_m": IDENTITY, "eval_crop": IDENTITY, "train_crop": IDENTITY,
    "cache_images": BOOKKEEPING, "cache_dir": BOOKKEEPING, "data_workers": BOOKKEEPING,
    "data_worker_kind": BOOKKEEPING, "strict_data": BOOKKEEPING,
    "synthetic.num_classes": IDENTITY, "synthetic.train_size": IDENTITY,
    "synthetic.val_size": IDENTITY, "synthetic.base_size": IDENTITY,
    # Optimisation.
    "batch_size": IDENTITY, "num_epochs": LENGTH, "num_steps": LENGTH, "optimizer": STATE,
    "learning_rate": IDENTITY, "momentum": IDENTITY, "weight_decay": IDENTITY,
    "schedule": IDENTITY, "warmup_steps": IDENTITY, "pct_start": IDENTITY,
    "div_factor": IDENTITY, "final_div_factor": IDENTITY, "cycle_momentum": IDENTITY,
    "max_momentum": IDENTITY, "base_momentum": IDENTITY, "grad_clip_norm": IDENTITY,
    # Regularisation and what trains.
    "label_smoothing": IDENTITY, "mixup_alpha": IDENTITY, "cutmix_alpha": IDENTITY,
    "ema_decay": IDENTITY, "train_bn": IDENTITY, "trainable": STATE, "lr_mults": STATE,
    "layer_decay": STATE,  # like lr_mults, it groups the params, so the optimizer state's shape
    "stages": IDENTITY,
    # Execution.
    "dtype": IDENTITY, "conv": BOOKKEEPING, "parallel": BOOKKEEPING,
    "cache_features": IDENTITY, "seed": IDENTITY, "log_every_steps": BOOKKEEPING,
    "eval_every_steps": BOOKKEEPING, "checkpoint_every_steps": BOOKKEEPING,
    "keep_checkpoints": BOOKKEEPING, "keep_best_checkpoints": BOOKKEEPING,
    "prefetch": BOOKKEEPING, "epoch_images": BOOKKEEPING,
}

# Run metadata that is no config key but follows from the identity, recorded with every
# checkpoint and checked on resume beside the STATE keys: the head's output count and the class
# names (num_classes and the data), the pixel normalisation (weights).
DERIVED_STATE = ("outputs", "class_names", "preprocessing")


def keys_with(*roles: str) -> frozenset[str]:
  """The config keys (flat names) whose role is one of `roles`."""
  unknown = set(roles) - {IDENTITY, STATE, LENGTH, BOOKKEEPING}
  if unknown:
    raise ValueError(f"unknown config key role(s) {sorted(unknown)}")
  return frozenset(k for k, role in ROLES.items() if role in roles)
