"""Staged fine-tuning: a run as a list of stages, each a fresh optimizer over its own trainable set.

`config.stages` lists the stages, e.g. the blog recipe in one run:

    c.stages = [dict(name="head", epochs=30, trainable=["^head/"]),
                dict(name="block5", epochs=10, trainable=["^head/", "^block5_"],
                     learning_rate=1e-5, lr_mults={"^block5_": 0.1}, augment="flip")]

A stage's keys (`STAGE_KEYS`) override the top-level config; the others are inherited, so a stage
is a whole config (`stage_configs`). Each stage starts exactly as a new run started from the
previous stage's params with `init_from` would: a fresh optimizer built for its trainable set
(frozen params hold no optimizer state), step count, data order and dropout keys from its own
step 0, its schedule over its own length. The loop's steps (checkpoints, metrics) count on
across stages; `plan` maps them to stages. An empty `stages` is one stage: the config itself.
Nothing here imports JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Keys a stage may set; every other key is the run's. `epochs`/`steps` give its length
# (default: the top-level num_epochs / num_steps).
STAGE_KEYS = ("name", "epochs", "steps", "trainable", "lr_mults", "learning_rate", "optimizer",
              "schedule", "warmup_steps", "momentum", "weight_decay", "grad_clip_norm",
              "train_bn", "augment", "pct_start", "div_factor", "final_div_factor",
              "cycle_momentum", "max_momentum", "base_momentum", "layer_decay")
_LENGTH = {"epochs": "num_epochs", "steps": "num_steps"}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a run.

  Attributes:
    index: 0-based position in the run.
    name: the stage's `name`, else `stage<index+1>`.
    config: the whole config of the stage (the run's, with the stage's keys applied).
    start: the run's step at which the stage begins (its step 0).
    steps: the stage's length in steps.
  """

  index: int
  name: str
  config: Any
  start: int
  steps: int

  @property
  def end(self) -> int:
    return self.start + self.steps


def is_staged(config) -> bool:
  return bool(config.stages)


def stage_configs(config) -> list:
  """The config of each stage (one, the config itself, when `stages` is empty).

  Raises:
    ValueError: a stage that is not a dict, an unknown stage key, or both `epochs` and `steps`
      (`configs.validate` turns these into one-line errors).
  """
  import ml_collections
  stages = list(config.stages)
  if not stages:
    return [config]
  out = []
  for i, stage in enumerate(stages):
    if not isinstance(stage, dict) and not hasattr(stage, "items"):
      raise ValueError(f"stages[{i}] is {stage!r}, not a dict of stage keys")
    stage = dict(stage)
    unknown = sorted(set(stage) - set(STAGE_KEYS))
    if unknown:
      raise ValueError(f"stages[{i}] has unknown key {unknown[0]!r}; a stage may set: "
                       f"{', '.join(STAGE_KEYS)}")
    if "epochs" in stage and "steps" in stage:
      raise ValueError(f"stages[{i}] sets both epochs and steps; give one")
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.stages = []
      for key, value in stage.items():
        if key == "name":
          continue
        if key in _LENGTH:
          c.num_steps = int(value) if key == "steps" else -1
          if key == "epochs":
            c.num_epochs = value
          continue
        if key == "lr_mults":
          value = ml_collections.ConfigDict(dict(value))
        elif key == "trainable" and isinstance(value, str):
          value = [value]
        elif isinstance(c[key], list) and isinstance(value, tuple):
          value = list(value)
        try:
          c[key] = value
        except TypeError:
          raise ValueError(f"stages[{i}].{key}={value!r} has the wrong type: expected "
                           f"{type(c[key]).__name__} like {c[key]!r}") from None
    out.append(c)
  return out


def stage_name(config, index: int) -> str:
  stages = list(config.stages)
  if stages and stages[index].get("name"):
    return str(stages[index]["name"])
  return f"stage{index + 1}"


def stage_length(config, steps_per_epoch: int) -> int:
  """A (stage) config's length in steps."""
  if config.num_steps > 0:
    return int(config.num_steps)
  return int(config.num_epochs) * steps_per_epoch


def plan(config, steps_per_epoch: int) -> list[Stage]:
  """The run's stages with their lengths and first steps."""
  stages, start = [], 0
  for i, c in enumerate(stage_configs(config)):
    n = stage_length(c, steps_per_epoch)
    stages.append(Stage(i, stage_name(config, i), c, start, n))
    start += n
  return stages


def stage_of(stages: list[Stage], step: int) -> Stage:
  """The stage whose state a checkpoint at run step `step` holds.

  Step 0 is the first stage's; a step on a boundary holds the stage that ended there (its last
  step's state, before the next stage's optimizer exists).
  """
  for stage in stages:
    if step <= stage.end:
      return stage
  return stages[-1]


def total_steps(stages: list[Stage]) -> int:
  return stages[-1].end if stages else 0


def describe(stage: Stage, count: int) -> str:
  """One log line introducing a stage."""
  c = stage.config
  return (f"stage {stage.index + 1}/{count} ({stage.name}): steps {stage.start + 1}-{stage.end}, "
          f"trainable {list(c.trainable)}, learning_rate {c.learning_rate:g} ({c.schedule})"
          + (f", lr_mults {dict(c.lr_mults)}" if c.lr_mults else ""))


def how_to_train_further(config, workdir: str, longer_is_same_run: bool) -> str:
  """What to change to train a finished run further, in words a rerun will accept.

  Where the length is bookkeeping (`longer_is_same_run`: one stage, constant schedule), more
  epochs or steps continue the run. A staged run's length is its stages, and a schedule other
  than constant is shaped by the length, so both are the run's identity: more training is a new
  run from its params (`init_from`), which for a staged run takes the stages to run next.
  """
  if longer_is_same_run:
    return "raise num_epochs or num_steps to train further"
  new_run = f"start a new run from its params: --config.init_from={workdir} --workdir NEW_DIR"
  if is_staged(config):
    return (f"a staged run's length is its stages, part of the run; to train further, {new_run}"
            f" with the stages to train next as --config.stages (or --config.stages=[] for one "
            f"stage of num_epochs)")
  return (f"num_epochs/num_steps shape its {config.schedule} schedule, part of the run; to "
          f"train further, {new_run}")
