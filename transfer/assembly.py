"""One assembled run: everything a config decides about a run, built once by `build`.

`train`, `lr_find` and `bench` all consume the `Run` this module builds, so they run the very
same pieces: the data (and its class count, checked against `num_classes`), the model, its
variable shapes and initial variables, and per stage the optimizer and its freeze labels, the
regularisation (label smoothing, mixup/cutmix), the parameter average and the jitted train and
eval steps. `bench` therefore times, and `lr_find` sweeps, the step `train` trains.

    run = transfer.assembly.build(config)
    stage = run.stage(0)
    state = run.new_state(run.initial_variables()[0], stage)
    state, metrics = run.train_step(stage)(state, batch)

A trained run read back from its checkpoint (eval, export) is `Run.from_checkpoint`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from transfer import configs
from transfer import ema as ema_lib
from transfer import models, optim, parallel, regularisation, runs, steps, train_state
from transfer import stages as stages_lib
from transfer.errors import UserError


@dataclasses.dataclass(frozen=True)
class StageParts:
  """What one stage trains with.

  Attributes:
    stage: the stage (its config, first step and length).
    tx: its optimizer (a fresh one per stage; frozen params get no state).
    param_labels: the optimizer's label tree (which params train, at which rate multiple).
    regularisation: the stage's label smoothing and mixup/cutmix.
    ema_decay: the stage's parameter-average decay (used when the state keeps an average).
  """

  stage: stages_lib.Stage
  tx: optax.GradientTransformation
  param_labels: Any
  regularisation: regularisation.Regularisation
  ema_decay: float

  @property
  def config(self):
    return self.stage.config


@dataclasses.dataclass
class Run:
  """A run assembled from its config (see `build`); the loop adds only side effects.

  Attributes:
    config: the validated run config.
    mesh: the `data` mesh it runs on.
    data: the run's `Dataset` (the first stage's augmentation).
    num_classes: classes in the data (= `config.num_classes` when that is set).
    model: the unbound Flax module; `outputs` its number of outputs.
    variable_shapes: the model's variables as `jax.ShapeDtypeStruct`s (nothing initialised).
    plan: the stages with their first steps and lengths.
    metadata: the run metadata stored with every checkpoint (`runs.run_metadata`).
    keeps_ema: whether the train state keeps a parameter average (`ema_decay` > 0).
    variables, step, workdir: a trained run's restored variables, checkpoint step and run
      directory (`from_checkpoint`, which leaves `data`, `variable_shapes` and `plan` empty).
    source: the run's weights parsed once (`runs.weights_source`); None for a trained run,
      whose preprocessing is on record (`metadata["preprocessing"]`).
  """

  config: Any
  mesh: Any
  data: Any
  num_classes: int
  model: Any
  outputs: int
  variable_shapes: Any
  plan: list
  metadata: dict[str, Any]
  keeps_ema: bool
  variables: dict[str, Any] | None = None
  step: int | None = None
  workdir: str | None = None
  source: Any = None
  _parts: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def from_checkpoint(cls, workdir: str, checkpoint: str | int | None = "latest", *,
                      dtype: str | None = None, conv: str = "auto", devices=None,
                      announce: str | None = None) -> "Run":
    """A trained run rebuilt from one of its checkpoints, without the original config (eval,
    export): the model from the stored run metadata, the config stored with the checkpoint
    (its dataset path the absolute one recorded), the variables restored (`variables`, with
    `ema_params` when the run kept an average; `ema.serving_variables` chooses), its `step`.
    No data is opened (`validation_data` does) and there is no plan to train. `announce` (a
    command name) prints which step was read, on stderr.

    Raises:
      UserError: no checkpoint that restores (see `checkpoint.load_trained_variables`).
    """
    import ml_collections
    from transfer import checkpoint as checkpoint_lib
    variables, meta = checkpoint_lib.load_trained_variables(workdir, checkpoint, announce)
    recorded = meta["run"]
    config = ml_collections.ConfigDict(meta["config"])
    if (recorded.get("data") or {}).get("dataset"):  # absolute: works from any directory
      config.dataset = recorded["data"]["dataset"]
    model = runs.model_from_meta(recorded, dtype=dtype, conv=conv)
    return cls(config, parallel.make_mesh(devices), None, len(recorded["class_names"]), model,
               recorded["outputs"], None, [], recorded, ema_lib.has_ema(variables),
               variables=variables, step=meta["step"], workdir=workdir)

  def validation_data(self):
    """A trained run's validation split, checked to be the split it was trained with."""
    from transfer import data as data_lib
    ds = data_lib.create(self.config, preprocess_source=self.metadata["preprocessing"])
    if not ds.num_val:
      raise UserError(f"{self.workdir} was trained without a validation split "
                      f"({self.config.dataset}, val_fraction={self.config.val_fraction}); there "
                      f"is nothing to evaluate on")
    data_lib.check_same_data(self.metadata.get("data") or {}, ds.identity(),
                             f"eval of {self.workdir}",
                             hint="restore the run's data there, or train a new run on this data")
    return ds

  @property
  def weights_source(self) -> str:
    """The weights' preprocessing mode, as recorded (`runs.run_metadata`), for the pipeline."""
    return self.metadata["preprocessing"]

  @property
  def total_steps(self) -> int:
    return stages_lib.total_steps(self.plan)

  @property
  def staged(self) -> bool:
    return stages_lib.is_staged(self.config)

  def stage(self, which) -> StageParts:
    """The parts of a stage (by index or `stages.Stage`), built once per run."""
    stage = self.plan[which] if isinstance(which, int) else which
    if stage.index not in self._parts:
      c = stage.config
      tx, labels = optim.make_optimizer(self.variable_shapes["params"], c, stage.steps)
      self._parts[stage.index] = StageParts(stage, tx, labels,
                                            regularisation.Regularisation.from_config(c),
                                            ema_lib.decay(c))
    return self._parts[stage.index]

  def stage_of(self, step: int) -> StageParts:
    """The parts of the stage whose state a checkpoint at run step `step` holds."""
    return self.stage(stages_lib.stage_of(self.plan, step))

  def sweep(self, parts: StageParts, total_steps: int, schedule) -> StageParts:
    """`parts` with its optimizer driven by `schedule` over `total_steps` (`lr_find`)."""
    tx, labels = optim.make_optimizer(self.variable_shapes["params"], parts.config, total_steps,
                                      schedule=schedule)
    return dataclasses.replace(parts, tx=tx, param_labels=labels)

  def stage_data(self, parts: StageParts):
    """The stage's dataset: the run's, or a new one when the stage augments differently."""
    if parts.config.augment == self.config.augment:
      return self.data
    from transfer import data as data_lib
    return data_lib.create(parts.config, preprocess_source=self.weights_source)

  def stage_metadata(self, parts: StageParts) -> dict[str, Any]:
    """The run metadata of a checkpoint in a stage: its optimizer, trainable set and rates."""
    c = parts.config
    return dict(self.metadata, optimizer=c.optimizer, trainable=list(c.trainable),
                lr_mults=dict(c.lr_mults), layer_decay=c.layer_decay)

  def check_checkpoint(self, meta: dict[str, Any], workdir: str) -> None:
    """Refuses a checkpoint of `workdir` written by a different run (model, data, stages)."""
    parts = self.stage_of(int(meta.get("step", 0)))
    stage = parts.stage
    runs.check_same_run(meta["run"], self.stage_metadata(parts), workdir)
    runs.check_same_data(meta["run"].get("data"), self.data.identity(), f"resuming {workdir}")
    saved = meta.get("stage")
    if saved and (saved.get("index"), saved.get("start")) != (stage.index, stage.start):
      raise UserError(f"{workdir} holds a different run: its checkpoint at step {meta['step']} "
                      f"is in stage {saved.get('index', 0) + 1} (from step {saved.get('start')})"
                      f", this config puts it in stage {stage.index + 1} (from step "
                      f"{stage.start}); nothing was changed there. Use another --workdir")

  def initial_variables(self) -> tuple[dict[str, Any], str]:
    """Variables before training (`init_from` > weights > random) and where they came from."""
    return runs.initial_variables(self.config, self.model, self.variable_shapes["params"],
                                  self.data.identity(), source=self.source)

  def train_step(self, parts: StageParts, kind: str = "full"):
    """The stage's jitted train step on images (`full`) or cached backbone features (`head`).

    It donates the state (the run's own: `new_state`, `restart_state`, a restored checkpoint),
    so the state passed in is deleted, with any array it shares with `new_state`'s variables.
    """
    return steps.make_train_step(self.model, parts.tx, parts.param_labels, self.mesh,
                                 self.config.parallel, kind, parts.regularisation,
                                 parts.ema_decay, donate=True)

  def eval_step(self, kind: str = "full", tta: bool = False):
    """The jitted eval step (sums over a masked batch)."""
    return steps.make_eval_step(self.model, self.mesh, self.num_classes, self.config.parallel,
                                kind, tta=tta)

  def new_state(self, variables: dict[str, Any], parts: StageParts):
    """A fresh train state of `variables` for the stage's optimizer, replicated on the mesh.

    Device arrays already placed like that are taken over, not copied (the CLI keeps one copy
    of the params): `train_step` donates the state, so pass host arrays or a copy to keep
    `variables` readable.
    """
    return parallel.replicate(train_state.create_train_state(
        variables["params"], parts.tx, self.config.seed, variables.get("batch_stats"),
        ema=self.keeps_ema, apply_fn=self.model.apply), self.mesh)

  def restart_state(self, state, parts: StageParts):
    """The state a new stage starts from: these params and BatchNorm statistics, a fresh
    optimizer state (none for frozen params), step 0. Jitted so it works on arrays that span
    processes; params pass through bit for bit. The parameter average restarts at the params
    too, as in a run started with `init_from`."""
    restart = lambda params, batch_stats: train_state.create_train_state(
        params, parts.tx, self.config.seed, batch_stats, ema=self.keeps_ema,
        apply_fn=self.model.apply)
    return jax.jit(restart, out_shardings=parallel.replicated(self.mesh))(state.params,
                                                                          state.batch_stats)

  def abstract_state(self, step: int):
    """The restore target of a checkpoint at `step`: the state of its stage's optimizer."""
    parts = self.stage_of(step)
    abstract = jax.eval_shape(
        lambda v: train_state.create_train_state(v["params"], parts.tx, self.config.seed,
                                                 v.get("batch_stats"), ema=self.keeps_ema,
                                                 apply_fn=self.model.apply),
        self.variable_shapes)
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(self.mesh)),
        abstract)


def build(config, devices=None, *, dtype: str | None = None) -> Run:
  """Assembles the run `config` describes; bad data or config fails here, before compiling.

  Args:
    config: a validated run config.
    devices: the devices to run on (default: all of them, every process's).
    dtype: compute dtype override (bench); default `config.dtype` resolved for this backend.

  Returns:
    The `Run`. Every stage's optimizer and freeze patterns are built and checked.

  Raises:
    UserError: a batch that does not divide over the devices, `num_classes` that does not
      match the data, or nothing to train.
  """
  from transfer import data as data_lib
  from transfer import platform
  platform.setup()  # first use from Python: the CLI's XLA flags and compile cache (idempotent)
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.batch_size, mesh)
  source = runs.run_source(config)  # parsed once for the whole run (an init_from run's own)
  ds = data_lib.create(config, preprocess_source=source)
  num_classes = check_num_classes(config, ds)
  model, outputs = runs.build_model(config, num_classes, dtype=dtype, source=source)
  metadata = runs.run_metadata(config, ds.class_names, outputs, ds.identity(), conv=model.conv,
                               variant=getattr(model, "variant", None), source=source,
                               model=model)
  steps_per_epoch = ds.steps_per_epoch
  plan = stages_lib.plan(config, steps_per_epoch) if steps_per_epoch > 0 else []
  if (stages_lib.total_steps(plan) <= 0 or steps_per_epoch <= 0
      or min(s.steps for s in plan) <= 0):
    raise UserError(f"nothing to train: {ds.num_train} training examples, batch_size="
                    f"{config.batch_size}; lower batch_size or add data")
  configs.check_lengths(config, [(stage.config, stage.steps) for stage in plan])
  # Shapes only: a resumed run never initialises, a fresh one initialises once.
  shapes = jax.eval_shape(lambda: models.init_variables(model, config.image_size, config.seed))
  run = Run(config, mesh, ds, num_classes, model, outputs, shapes, plan, metadata,
            ema_lib.enabled(config), source=source)
  for stage in plan:  # every stage's patterns are checked before anything runs
    run.stage(stage)
  return run


def check_num_classes(config, ds) -> int:
  """The run's class count: the data's; `num_classes` > 0 must agree with it."""
  num_classes = config.num_classes if config.num_classes > 0 else ds.num_classes
  if num_classes != ds.num_classes:
    raise UserError(f"num_classes={num_classes} but the dataset has {ds.num_classes} classes "
                    f"({', '.join(ds.class_names[:10])}); use num_classes=-1")
  return num_classes
