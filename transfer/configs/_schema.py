"""The allowed values of every config key that has a range or a fixed set of choices.

One table, beside `default.py`, read by `transfer.configs.validate` when a config is loaded, so a
bad value fails before any data is read or anything is compiled, with one line that names the
key, the value and what is allowed. The name lists must match the code that consumes them
(optim.py, models, parallel.py, data/pipeline.py); tests/test_configs.py checks that they do.
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
}

# Keys with a fixed set of names. `labels_from` is checked only where a config has it.
CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adam", "adamw", "sgd", "rmsprop"),           # optim._base_optimizer
    "schedule": ("constant", "cosine", "warmup_cosine", "one_cycle"),  # optim.SCHEDULES
    "head": ("imagenet", "flatten_dense", "gap", "none"),       # models.heads.HEADS
    "dtype": ("auto", "float32", "bfloat16", "float16"),        # models.as_dtype
    "conv": ("auto", "xla", "winograd"),                        # models.CONVS
    "parallel": ("shard_map", "pmap"),                          # parallel.MODES
    "augment": ("none", "flip", "crop_flip", "inception_crop", "randaugment"),  # data.pipeline.AUGMENTS
    "cache_images": ("", "memory", "disk"),                     # data.pipeline.CACHES
    "data_worker_kind": ("thread", "process"),                  # data.workers.KINDS
    "labels_from": ("folders", "filename"),
    "variant": ("auto", "keras", "torchvision"),                # resnet, inception .VARIANTS
}


def check_stages(config, check) -> None:
  """Checks `config.stages`: each a dict of known stage keys whose whole config passes `check`.

  Raises:
    UserError: one line naming the stage (`stages[1]`, 0-based as in the config) and the problem.
  """
  from transfer import stages
  from transfer.errors import UserError
  if not config.get("stages"):
    return
  try:
    stage_configs = stages.stage_configs(config)
  except ValueError as e:
    raise UserError(str(e)) from None
  for i, stage_config in enumerate(stage_configs):
    try:
      check(stage_config)
    except UserError as e:
      raise UserError(f"stages[{i}]: {e}") from None


def check_one_cycle(config) -> None:
  """`one_cycle` warms up over `pct_start` of the steps; a `warmup_steps` would be ignored."""
  from transfer.errors import UserError
  if config.get("schedule") == "one_cycle" and config.get("warmup_steps", 0) > 0:
    raise UserError(f"warmup_steps={config.warmup_steps} does not apply to schedule=one_cycle, "
                    f"whose warm-up is pct_start={config.get('pct_start')} of the steps; set "
                    f"warmup_steps=0")
