"""Staged fine-tuning: one run equals the two-command recipe, stages own their optimizer state,
resume lands in the right stage bit for bit, and the stage list is checked and part of the run."""

import contextlib
import io
import os

import jax
import numpy as np
import pytest

import ml_collections

from transfer import checkpoint, configs, metrics, optim, stages, train
from transfer.errors import UserError
from helpers import final_params, kill_and_resume, preempt_and_resume, tiny_config

HEAD = ["^head/"]
BLOCK5 = ["^head/", "^block5_"]
STAGE2 = dict(trainable=BLOCK5, learning_rate=3e-4, lr_mults={"^block5_": 0.1})


def staged_config(n1=4, n2=4, **overrides):
  """Head only on cached features for n1 steps, then block5 at a lower rate for n2 steps."""
  c = tiny_config(augment="none", cache_features=True, optimizer="adam", keep_checkpoints=10,
                  **overrides)
  c.stages = [dict(name="head", steps=n1, trainable=HEAD),
              dict(name="block5", steps=n2, **STAGE2)]
  return configs.validate(c)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
  """A finished two-stage run (4 + 4 steps) and its log."""
  workdir = str(tmp_path_factory.mktemp("staged") / "run")
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    summary = train.train_and_evaluate(staged_config(), workdir)
  return workdir, summary, err.getvalue()


def _params(workdir):
  return jax.device_get(checkpoint.load_trained(workdir)[0])


def test_a_two_stage_run_equals_the_two_command_version(staged, tmp_path):
  workdir, summary, _ = staged
  assert summary["step"] == 8
  first = str(tmp_path / "first")
  train.train_and_evaluate(tiny_config(augment="none", cache_features=True, num_steps=4,
                                       trainable=HEAD), first)
  second = tiny_config(augment="none", cache_features=True, num_steps=4, init_from=first)
  second.trainable, second.learning_rate = STAGE2["trainable"], STAGE2["learning_rate"]
  second.lr_mults = ml_collections.ConfigDict(STAGE2["lr_mults"])
  train.train_and_evaluate(second, str(tmp_path / "second"))
  ours, theirs = _params(workdir), _params(str(tmp_path / "second"))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours),
                          jax.tree_util.tree_leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # block5 really trained in stage 2 (else the comparison above proves little).
  first_params = _params(first)
  assert not np.array_equal(ours["block5_conv1"]["kernel"], first_params["block5_conv1"]["kernel"])
  np.testing.assert_array_equal(ours["block4_conv1"]["kernel"],
                                first_params["block4_conv1"]["kernel"])


def _opt_state_params(workdir, step):
  """{param path: number of optimizer-state arrays shaped like it} in checkpoint `step`."""
  saved = checkpoint.Checkpointer(workdir).saved_shapes(step)
  found = {}
  for key, (shape, _) in saved.items():
    if key.startswith("opt_state.") and shape:
      for moment in (".mu.", ".nu."):
        if moment in key:
          path = key.split(moment, 1)[1].replace(".", "/")
          found[path] = found.get(path, 0) + 1
  return found


def _trainable_paths(workdir, patterns):
  params = _params(workdir)
  labels = optim.param_labels(params, patterns)
  return {p for p, l in zip(optim.param_paths(params), jax.tree_util.tree_leaves(labels))
          if l != optim.FROZEN}


def test_each_stage_holds_optimizer_state_for_its_trainable_params_only(staged):
  workdir, _, _ = staged
  # Adam: one mu and one nu per trainable parameter, nothing for frozen ones.
  boundary = _opt_state_params(workdir, 4)  # the state at the end of stage 1
  assert boundary == {p: 2 for p in _trainable_paths(workdir, HEAD)}
  after = _opt_state_params(workdir, 8)
  assert after == {p: 2 for p in _trainable_paths(workdir, BLOCK5)}
  assert any(p.startswith("block5_") for p in after)


def test_checkpoints_metrics_and_curves_record_the_stages(staged):
  workdir, _, log = staged
  meta = checkpoint.load_trained(workdir, checkpoint=4)[1]
  assert meta["stage"] == {"index": 0, "name": "head", "start": 0, "steps": 4}
  assert meta["run"]["trainable"] == HEAD and meta["data_position"] == {"epoch": 0, "index": 4}
  meta = checkpoint.load_trained(workdir)[1]
  assert meta["stage"] == {"index": 1, "name": "block5", "start": 4, "steps": 4}
  assert meta["run"]["trainable"] == BLOCK5 and meta["run"]["lr_mults"] == {"^block5_": 0.1}
  # Stage 2's data restarts at its own step 0, as the init_from run's does.
  assert meta["data_position"] == {"epoch": 0, "index": 4}
  records = metrics.read_metrics(workdir)
  assert metrics.stage_starts(records) == [(0, "head"), (4, "block5")]
  rates = {r["step"]: (r["stage"], r["learning_rate"]) for r in records if "train_loss" in r}
  assert rates == {2: ("head", pytest.approx(1e-3)), 4: ("head", pytest.approx(1e-3)),
                   6: ("block5", pytest.approx(3e-4)), 8: ("block5", pytest.approx(3e-4))}
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
  # The feature cache serves the head-only stage and is dropped once block5 trains.
  head, block5 = log.split("stage 2/2 (block5)")
  assert "cache_features: running the frozen backbone once" in head
  assert "cache_features not used: backbone layers are trainable" in block5


def test_a_run_stopped_at_the_stage_boundary_resumes_into_stage_two(staged, tmp_path,
                                                                    monkeypatch):
  """Stopped right after stage 1's last step: the rerun starts stage 2 from the checkpoint and
  ends bit for bit where the uninterrupted run did."""
  workdir = str(tmp_path / "run")

  def stopped_at_four():
    assert checkpoint.Checkpointer(workdir).latest_step() == 4
  summary = preempt_and_resume(staged_config, workdir, 4, monkeypatch, after_stop=stopped_at_four)
  assert summary["trained_steps"] == 4
  for a, b in zip(jax.tree_util.tree_leaves(_params(workdir)),
                  jax.tree_util.tree_leaves(_params(staged[0]))):
    np.testing.assert_array_equal(a, b)
  assert metrics.stage_starts(metrics.read_metrics(workdir)) == [(0, "head"), (4, "block5")]


def test_changing_the_stages_is_refused_on_resume(staged):
  workdir, _, _ = staged
  # The run's record reads back with its stages: `transfer train --workdir W` continues it.
  assert configs.load(workdir).stages == staged_config().stages
  with pytest.raises(UserError, match=r"holds a different run: stages "):
    train.train_and_evaluate(staged_config(n2=6), workdir)
  with pytest.raises(UserError, match=r"num_steps 6 -> 12 .*length of the stages"):
    c = staged_config(num_steps=12)
    train.train_and_evaluate(c, workdir)


@pytest.mark.parametrize("stage,message", [
    (dict(step=3), r"^stages\[1\] has unknown key 'step'; a stage may set: name, epochs"),
    (dict(steps=3, epochs=1), r"^stages\[1\] sets both epochs and steps"),
    (dict(learning_rate=-1.0), r"^stages\[1\]\.learning_rate=-1.0 is out of range"),
    (dict(schedule="linear"), r"^stages\[1\]\.schedule='linear' is not valid"),
    (dict(steps=3, warmup_steps=3), r"^stages\[1\]\.warmup_steps=3 is not shorter than the 3 "),
    # A check across keys, one of them inherited: the stage, then the message.
    (dict(schedule="one_cycle"), r"^stages\[1\]: warmup_steps=2 does not apply"),
    (dict(learning_rate="fast"), r"^stages\[1\]\.learning_rate='fast' has the wrong type"),
    ("head", r"^stages\[1\] is 'head', not a dict"),
])
def test_a_bad_stage_is_one_line(stage, message):
  c = tiny_config(warmup_steps=2)
  c.stages = [dict(steps=3), stage]
  with pytest.raises(UserError, match=message) as error:
    configs.validate(c)
  assert "\n" not in str(error.value)


def test_a_warmup_longer_than_an_epochs_stage_is_refused_once_its_length_is_known(tmp_path):
  """A stage given in epochs has its length only once the data is read: 48 images, batch 8,
  one epoch is 6 steps."""
  c = tiny_config(warmup_steps=6)
  c.stages = [dict(steps=8), dict(epochs=1, name="second")]
  configs.validate(c)  # the length is not known yet
  with pytest.raises(UserError, match=r"^stages\[1\]: warmup_steps=6 is not shorter than the 6 "
                                      r"steps") as error:
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert "\n" not in str(error.value) and not os.path.exists(tmp_path / "w" / "checkpoints")


def test_stage_plan_inherits_the_run_and_maps_steps_to_stages():
  c = tiny_config(num_steps=-1, num_epochs=3, learning_rate=1e-3)
  c.stages = [dict(epochs=1), dict(steps=5, learning_rate=1e-4), dict(name="last")]
  plan = stages.plan(c, steps_per_epoch=6)
  assert [(s.name, s.start, s.steps) for s in plan] == [
      ("stage1", 0, 6), ("stage2", 6, 5), ("last", 11, 18)]
  assert [s.config.learning_rate for s in plan] == [1e-3, 1e-4, 1e-3]
  assert all(s.config.stages == [] for s in plan)
  assert [stages.stage_of(plan, n).index for n in (0, 1, 6, 7, 11, 12, 29)] == [
      0, 0, 0, 1, 1, 2, 2]
  assert [(s.start, s.steps) for s in stages.plan(tiny_config(num_steps=7), 6)] == [(0, 7)]


def test_the_shipped_recipe_is_one_staged_run():
  c = configs.validate(configs.load("cats_vs_dogs"))
  plan = stages.plan(c, steps_per_epoch=100)
  assert [s.name for s in plan] == ["head", "block5"]
  head, block5 = (s.config for s in plan)
  assert list(head.trainable) == ["^head/"] and head.cache_features and head.augment == "none"
  assert list(block5.trainable) == ["^head/", "^block5_"] and dict(block5.lr_mults) == {
      "^block5_": 0.1}
  assert block5.learning_rate < head.learning_rate


# SIGKILL in stage 2, through the CLI: 30 head steps on cached features, then 60 with block5.
KILL_STAGES = repr([dict(name="head", steps=30, trainable=HEAD),
                    dict(name="block5", steps=60, **STAGE2)])
KILL = dict(stages=KILL_STAGES, num_steps=90, augment="none", cache_features="true")


def test_sigkill_in_stage_two_resumes_there_bit_for_bit(tmp_path):
  reference, workdir = tmp_path / "reference", tmp_path / "run"
  latest = []  # the checkpoint the rerun resumes from
  out = kill_and_resume(  # after stage 2's first checkpoint; the run must not have finished
      workdir, 40, reference=reference, **KILL,
      after_kill=lambda: latest.append(checkpoint.Checkpointer(str(workdir)).latest_step()))
  ref_params, _ = final_params(reference)
  (resumed_from,) = latest
  assert 40 <= resumed_from < 90
  assert f"resumed from step {resumed_from}" in out and "stage 1/2" not in out
  assert "stage 2/2 (block5)" in out
  params, meta = final_params(workdir)
  assert meta["step"] == 90 and meta["stage"]["index"] == 1
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
    np.testing.assert_array_equal(a, b)  # same programs, steps, data and RNG: bitwise
  records = metrics.read_metrics(str(workdir))
  assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 91))
  assert metrics.stage_starts(records) == [(0, "head"), (30, "block5")]
  assert metrics.stage_starts(records) == metrics.stage_starts(
      metrics.read_metrics(str(reference)))
