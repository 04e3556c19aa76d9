"""One assembled run (`transfer.assembly`): bench times, and lr_find sweeps, the step train trains,
and all of them refuse the same bad config the same way."""

import jax
import optax
import pytest

from transfer import assembly, bench, lr_find, main, models, parallel, steps, train
from helpers import tiny_config

# Every option that changes the train step: smoothing, both mixes, the average, a schedule whose
# length is baked into the step.
REGULARISED = dict(mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1, ema_decay=0.9,
                   schedule="cosine")


def _config(**overrides):
  """`tiny_config` for two steps with no augmentation, evaluation or periodic saves between."""
  return tiny_config(**{"num_steps": 2, "eval_every_steps": -1, "checkpoint_every_steps": 2,
                        "augment": "none", "synthetic.val_size": 16, **overrides})


def _recording(monkeypatch):
  """Records every train step `steps.make_train_step` builds, whoever asks for it, with the
  optimizer it was built for (a step applies only a state made with that optimizer)."""
  made = []
  real = steps.make_train_step

  def record(*args, **kwargs):
    step = real(*args, **kwargs)
    made.append((step, kwargs["tx"] if "tx" in kwargs else args[1]))
    return step

  monkeypatch.setattr(steps, "make_train_step", record)
  return made


def test_bench_times_the_step_train_trains(tmp_path, monkeypatch):
  made = _recording(monkeypatch)
  config = _config(**REGULARISED)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  trains = made[-1]

  setup = bench.Setup(config, models.resolve_dtype(config.dtype))
  bench.cases.prepare_train(setup, warmup=0)
  benched = made[-1]
  assert benched[0] is not trains[0]
  state, batch = setup.state(), {"image": setup.images(), "label": setup.labels_batch()}
  assert state.ema_params  # the average is part of what is timed
  # Each step on bench's arrays, under the optimizer it was built for (tx is static state).
  hlo = lambda made: made[0].lower(state.replace(tx=made[1]), batch).as_text()
  assert hlo(benched) == hlo(trains)

  # The comparison sees the regularisation: the step bench used to time (none) differs.
  plain = steps.make_train_step(setup.model, setup.tx, setup.labels, setup.mesh, config.parallel)
  assert hlo((plain, setup.tx)) != hlo(trains)


def test_lr_find_sweeps_the_regularised_step(monkeypatch):
  """lr_find's step is the run's step (mixing, smoothing, the average) under the sweep's rate."""
  made = _recording(monkeypatch)
  config = _config(**REGULARISED)
  lr_find.find(config, steps=2, start_lr=1e-5, end_lr=1.0)
  swept = made[-1]

  run = assembly.build(_config(**dict(REGULARISED, schedule="constant")))
  parts = run.sweep(run.stage(0), 2, optax.exponential_decay(1e-5, 1, 1.0 / 1e-5))
  state = run.new_state(run.initial_variables()[0], parts)
  assert state.ema_params
  batch = next(iter(run.data.train_batches(0)))
  batch = jax.device_put({"image": batch["image"], "label": batch["label"]},
                         parallel.batch_sharding(run.mesh))
  # Each step on these arrays, under the optimizer it was built for (tx is static state).
  hlo = lambda made: made[0].lower(state.replace(tx=made[1]), batch).as_text()
  # donating the state, as every step a Run makes does
  regularised = steps.make_train_step(run.model, parts.tx, parts.param_labels, run.mesh,
                                      config.parallel, "full", parts.regularisation,
                                      parts.ema_decay, donate=True)
  plain = steps.make_train_step(run.model, parts.tx, parts.param_labels, run.mesh,
                                config.parallel, donate=True)
  assert hlo(swept) == hlo((regularised, parts.tx))
  assert hlo(swept) != hlo((plain, parts.tx))


def test_lr_find_refuses_a_class_count_mismatch_as_train_does(tmp_path, capsys):
  flags = ["--config", "default", "--config.model=vgg16_tiny", "--config.weights=none",
           "--config.image_size=32", "--config.batch_size=8", "--config.num_classes=3"]
  errors = []
  for command in (["train", "--workdir", str(tmp_path / "run")],
                  ["lr_find", "--workdir", str(tmp_path / "lr"), "--steps", "2"]):
    with pytest.raises(SystemExit) as stopped:
      main.main(command + flags)
    assert stopped.value.code == 2
    errors.append(capsys.readouterr().err.strip().splitlines())
  assert errors[0] == errors[1]
  assert errors[1] == ["transfer: error: num_classes=3 but the dataset has 2 classes (class_0, "
                       "class_1); use num_classes=-1"]
  assert not (tmp_path / "lr").exists()
