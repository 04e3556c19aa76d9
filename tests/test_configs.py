"""Config loading (names, .py, a run's config.json), overrides and the one validation pass."""

import json

import ml_collections
import pytest

from transfer import configs
from transfer import main as cli_main
from transfer.configs import _schema, default
from transfer.errors import UserError


def overridden(**overrides):
  """The quickstart config with `--config.KEY=VALUE` style string overrides applied."""
  return configs.apply_overrides(configs.load("quickstart"),
                                 {k: str(v) for k, v in overrides.items()})


@pytest.mark.parametrize("name", configs.shipped())
def test_every_shipped_config_is_valid(name):
  config = configs.load(name)
  assert configs.validate(config) is config


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", -0.001, "learning_rate=-0.001 is out of range: must be > 0"),
    ("learning_rate", 0, "learning_rate=0.0 is out of range: must be > 0"),
    ("batch_size", 0, "batch_size=0 is out of range: must be >= 1"),
    ("num_epochs", 0, "num_epochs=0 is out of range: must be >= 1 (or set num_steps > 0)"),
    ("num_steps", 0, "num_steps=0 is out of range: must be -1 or > 0"),
    ("num_steps", -2, "num_steps=-2 is out of range: must be -1 or > 0"),
    ("val_fraction", 1, "val_fraction=1.0 is out of range: must be in [0, 1)"),
    ("head_dropout", -0.1, "head_dropout=-0.1 is out of range: must be in [0, 1)"),
    ("eval_crop", 0, "eval_crop=0.0 is out of range: must be in (0, 1]"),
    ("train_crop", 1.5, "train_crop=1.5 is out of range: must be in (0, 1]"),
    ("momentum", 1, "momentum=1.0 is out of range: must be in [0, 1)"),
    ("weight_decay", -1e-4, "weight_decay=-0.0001 is out of range: must be >= 0"),
    ("grad_clip_norm", -1, "grad_clip_norm=-1.0 is out of range: must be >= 0"),
    ("warmup_steps", -5, "warmup_steps=-5 is out of range: must be >= 0"),
    ("image_size", 0, "image_size=0 is out of range: must be >= 1"),
    ("keep_checkpoints", 0, "keep_checkpoints=0 is out of range: must be >= 1"),
    ("keep_best_checkpoints", -1, "keep_best_checkpoints=-1 is out of range: must be >= 0"),
    ("prefetch", 0, "prefetch=0 is out of range: must be >= 1"),
    ("data_workers", -1, "data_workers=-1 is out of range: must be >= 0"),
    ("seed", -1, "seed=-1 is out of range: must be >= 0"),
    ("head_hidden", 0, "head_hidden=0 is out of range: must be >= 1"),
    ("log_every_steps", 0, "log_every_steps=0 is out of range: must be -1 or > 0"),
    ("eval_every_steps", -3, "eval_every_steps=-3 is out of range: must be -1 or > 0"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps=0 is out of range: must be -1 or > 0"),
    ("learning_rate", "nan", "learning_rate=nan is out of range: must be > 0"),
    ("optimizer", "adamx", "optimizer='adamx' is not valid: must be one of adam, adamw, sgd, "
                           "rmsprop"),
    ("schedule", "linear", "schedule='linear' is not valid: must be one of constant, cosine"),
    ("head", "mlp", "head='mlp' is not valid: must be one of imagenet, flatten_dense, gap, none"),
    ("dtype", "fp16", "dtype='fp16' is not valid: must be one of auto, float32, bfloat16"),
    ("conv", "fft", "conv='fft' is not valid: must be one of auto, xla, winograd"),
    ("parallel", "dp", "parallel='dp' is not valid: must be one of shard_map, pmap"),
    ("augment", "mixup", "augment='mixup' is not valid: must be one of none, flip, crop_flip"),
    ("cache_images", "ram", "cache_images='ram' is not valid: must be one of '', memory, disk"),
])
def test_out_of_range_values_name_key_value_and_range(key, value, message):
  with pytest.raises(UserError) as e:
    configs.validate(overridden(**{key: value}))
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_warmup_not_shorter_than_the_run_is_one_line():
  configs.validate(overridden(num_steps=100, warmup_steps=99, schedule="warmup_cosine"))
  with pytest.raises(UserError) as e:
    configs.validate(overridden(num_steps=100, warmup_steps=100, schedule="warmup_cosine"))
  assert str(e.value).startswith("warmup_steps=100 is not shorter than the 100 steps it warms up")
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides", [
    dict(val_fraction=0, head_dropout=0, momentum=0, eval_crop=1, train_crop=1),
    dict(weight_decay=0, grad_clip_norm=0, warmup_steps=0, keep_best_checkpoints=0),
    dict(num_steps=-1, eval_every_steps=-1, log_every_steps=1, checkpoint_every_steps=7),
    dict(num_epochs=0, num_steps=5),   # num_epochs is unused once num_steps is set
    dict(data_workers=0, seed=0, image_size=1, learning_rate=1e-9, cache_images=""),
    dict(dtype="float16", head="none", optimizer="sgd", schedule="warmup_cosine", conv="xla"),
])
def test_boundary_values_are_accepted(overrides):
  configs.validate(overridden(**overrides))


def test_labels_from_is_checked_by_name_and_against_the_dataset():
  config = configs.load("quickstart")
  assert config.labels_from == "folders" and configs.validate(config) is config
  with config.unlocked():
    config.dataset = "folder:/data/cats_vs_dogs"
    config.labels_from = "filename"
    configs.validate(config)
    config.labels_from = "dirs"
  with pytest.raises(UserError, match="labels_from='dirs' is not valid: must be one of folders, "
                                      "filename"):
    configs.validate(config)
  with config.unlocked():
    config.dataset, config.labels_from = "synthetic", "filename"
  with pytest.raises(UserError, match="labels_from='filename' applies to folder:PATH datasets "
                                      "only, not 'synthetic'"):
    configs.validate(config)


def test_partial_configs_from_python_are_checked_where_they_have_keys():
  configs.validate(ml_collections.ConfigDict({"batch_size": 8}))
  with pytest.raises(UserError, match="batch_size=0 is out of range"):
    configs.validate(ml_collections.ConfigDict({"batch_size": 0}))


def test_validate_fills_what_a_partial_config_lacks_from_the_defaults():
  config = ml_collections.ConfigDict({"batch_size": 8, "synthetic": {"num_classes": 3}})
  assert configs.validate(config) is config
  want = default.get_config()
  with want.unlocked():
    want.batch_size, want.synthetic.num_classes = 8, 3
  assert config.to_dict() == want.to_dict()


def test_every_default_key_has_exactly_one_role():
  # A key added to default.py must say in _schema.ROLES whether it is part of a run's identity
  # (a rerun that changes it is refused) or bookkeeping; a role for a key that is gone fails too.
  from transfer import workdir
  keys = set(workdir.flat_config(default.get_config()))
  assert not keys - set(_schema.ROLES), "config keys without a role in _schema.ROLES"
  assert not set(_schema.ROLES) - keys, "roles in _schema.ROLES for keys default.py lacks"
  assert set(_schema.ROLES.values()) <= {_schema.IDENTITY, _schema.STATE, _schema.LENGTH,
                                         _schema.BOOKKEEPING}
  assert _schema.keys_with(_schema.LENGTH) == {"num_epochs", "num_steps"}


def test_state_keys_are_recorded_with_every_checkpoint():
  # runs.check_same_run compares the STATE keys (and DERIVED_STATE) with a checkpoint's record;
  # a STATE key that runs.run_metadata does not record would never be compared.
  from transfer import runs
  meta = runs.run_metadata(default.get_config(), ["cat", "dog"], 1, conv="xla")
  assert _schema.keys_with(_schema.STATE) | set(_schema.DERIVED_STATE) <= set(meta)


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", "32", "batch_size='32' has the wrong type: expected int"),
    ("learning_rate", "1e-3", "learning_rate='1e-3' has the wrong type: expected float"),
    ("cache_features", 1, "cache_features=1 has the wrong type: expected bool"),
    ("batch_size", True, "batch_size=True has the wrong type: expected int"),
    ("trainable", "^head/", "trainable='^head/' has the wrong type: expected list"),
    ("synthetic", 3, "synthetic=3 has the wrong type: expected a dict"),
])
def test_values_of_the_wrong_type_are_rejected(key, value, message):
  # A plain dict (Python API, or a config file that builds its own ConfigDict) is not type-safe.
  config = ml_collections.ConfigDict({**default.get_config().to_dict(), key: value})
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace("^", r"\^")):
    configs.validate(config)


def test_an_int_stands_in_for_a_float_and_a_tuple_for_a_list():
  config = ml_collections.ConfigDict({**default.get_config().to_dict(), "learning_rate": 1,
                                      "trainable": ("^head/",)})
  configs.validate(config)


def test_name_lists_match_the_code_that_consumes_them():
  from transfer import models, optim, parallel
  from transfer.data import pipeline, workers
  from transfer.models import heads
  assert _schema.CHOICES["parallel"] == tuple(parallel.MODES)
  assert _schema.CHOICES["head"] == tuple(heads.HEADS)
  assert _schema.CHOICES["conv"] == tuple(models.CONVS)
  assert _schema.CHOICES["augment"] == tuple(pipeline.AUGMENTS)
  assert _schema.CHOICES["cache_images"] == tuple(pipeline.CACHES)
  assert _schema.CHOICES["schedule"] == optim.SCHEDULES
  assert _schema.CHOICES["data_worker_kind"] == tuple(workers.KINDS)
  from transfer.data import sources
  assert _schema.CHOICES["labels_from"] == tuple(sources.LABELS_FROM)
  for dtype in _schema.CHOICES["dtype"]:
    models.as_dtype(dtype)
  from transfer.models import vit
  assert _schema.CHOICES["token_pool"] == ("auto", *vit.TOKEN_POOLS)
  assert _schema.CHOICES["attention"] == ("auto", *vit.ATTENTIONS)
  assert {o for n in models.names() for o in models.spec(n).options} == set(_schema.MODEL_OPTIONS)


@pytest.mark.parametrize("optimizer", _schema.CHOICES["optimizer"])
@pytest.mark.parametrize("schedule", _schema.CHOICES["schedule"])
def test_every_optimizer_and_schedule_name_builds(optimizer, schedule):
  import jax.numpy as jnp
  from transfer import optim
  warmup = 0 if schedule == "one_cycle" else 2  # one_cycle warms up by pct_start
  config = overridden(optimizer=optimizer, schedule=schedule, warmup_steps=warmup,
                      trainable="^head/")
  params = {"head": {"kernel": jnp.ones((2, 2))}}
  tx, _ = optim.make_optimizer(params, config, 10)
  updates, _ = tx.update(params, tx.init(params), params)
  assert updates["head"]["kernel"].shape == (2, 2)


@pytest.mark.parametrize("command", ["train", "bench"])
@pytest.mark.parametrize("override, message", [
    ("--config.batch_size=0", "batch_size=0 is out of range: must be >= 1"),
    ("--config.num_epochs=0", "num_epochs=0 is out of range: must be >= 1"),
    ("--config.learning_rate=-0.001", "learning_rate=-0.001 is out of range: must be > 0"),
])
def test_cli_rejects_bad_values_before_running(command, override, message, monkeypatch, capsys):
  from transfer import bench, train
  ran = []
  monkeypatch.setattr(train, "main", lambda *a, **k: ran.append(a))
  monkeypatch.setattr(bench, "main", lambda *a, **k: ran.append(a))
  with pytest.raises(SystemExit) as e:
    cli_main.main([command, override])
  assert e.value.code == 2 and not ran
  err = capsys.readouterr().err
  assert err.startswith(f"transfer: error: {message}") and err.count("\n") == 1


# A run's own record: config.json, as `transfer train` writes it.

def written_run_record(tmp_path):
  """A config with nested and list values and overrides, saved the way train.py saves it."""
  config = configs.apply_overrides(configs.load("fine_tune_block5"), {
      "batch_size": "16", "synthetic.train_size": "99", "trainable": "^head/,^block4_",
      "learning_rate": "3e-5", "num_steps": "7"})
  workdir = tmp_path / "run"
  workdir.mkdir()
  with open(workdir / "config.json", "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return config, workdir


@pytest.mark.parametrize("as_dir", [False, True])
def test_config_json_reads_back_the_same_config(tmp_path, as_dir):
  original, workdir = written_run_record(tmp_path)
  loaded = configs.load(str(workdir) if as_dir else str(workdir / "config.json"))
  assert loaded.to_dict() == original.to_dict()
  assert loaded.trainable == ["^head/", "^block4_"] and isinstance(loaded.trainable, list)
  assert isinstance(loaded.synthetic, ml_collections.ConfigDict)
  assert loaded.synthetic.train_size == 99
  assert isinstance(loaded.lr_mults, ml_collections.ConfigDict)
  assert loaded.lr_mults.to_dict() == {"^block5_": 0.1}
  configs.validate(loaded)
  # Types survive, so overrides still parse as the default's type.
  configs.apply_overrides(loaded, {"batch_size": "8", "synthetic.val_size": "3"})
  assert loaded.batch_size == 8 and loaded.synthetic.val_size == 3


def test_cli_trains_from_a_run_record(tmp_path, monkeypatch):
  from transfer import train
  original, workdir = written_run_record(tmp_path)
  seen = []
  monkeypatch.setattr(train, "main", lambda config, **kw: seen.append(config) or 0)
  assert cli_main.run(["train", "--config", str(workdir / "config.json"),
                       "--config.seed=3"]) == 0
  assert seen[0].seed == 3 and seen[0].batch_size == 16 and seen[0].lr_mults["^block5_"] == 0.1


@pytest.mark.parametrize("content, message", [
    ({"batch_size": 8, "batchsize": 8}, "unknown config key 'batchsize'; valid keys: "),
    ({"synthetic": {"train_sise": 3}}, "unknown config key 'synthetic.train_sise'"),
    ({"batch_size": "32"}, "batch_size='32' has the wrong type; expected int"),
    ([1, 2], "holds a JSON list, not an object"),
])
def test_config_json_errors_are_one_line(tmp_path, content, message):
  path = tmp_path / "config.json"
  path.write_text(json.dumps(content))
  with pytest.raises(UserError) as e:
    configs.load(str(path))
  assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_config_json_not_json_or_missing(tmp_path):
  path = tmp_path / "config.json"
  path.write_text("{not json")
  with pytest.raises(UserError, match="is not valid JSON"):
    configs.load(str(path))
  with pytest.raises(FileNotFoundError):
    configs.load(str(tmp_path / "missing.json"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="has no config.json"):
    configs.load(str(tmp_path / "empty"))


def test_the_rerun_checks_and_the_history_follow_the_declared_roles(tmp_path, monkeypatch):
  # One declaration (_schema.ROLES) decides what a rerun may change: reclassifying a key there
  # changes what workdir.check_rerun refuses, what the history records, and what
  # runs.check_same_run compares against a checkpoint's own record.
  from transfer import runs, workdir
  saved = json.loads(default.get_config().to_json_best_effort())
  config = default.get_config()
  config.log_every_steps = 5
  changes = workdir.check_rerun(str(tmp_path), config, saved)
  assert changes == {"log_every_steps": (20, 5)}
  workdir.record_start(str(tmp_path), config, changes, step=3)
  assert workdir.read_history(str(tmp_path))[-1]["changes"] == {"log_every_steps": [20, 5]}
  config.learning_rate = 1e-3
  with pytest.raises(UserError, match=r"holds a different run: learning_rate 0.0001 -> 0.001;"):
    workdir.check_rerun(str(tmp_path), config, saved)

  monkeypatch.setitem(_schema.ROLES, "learning_rate", _schema.BOOKKEEPING)
  monkeypatch.setitem(_schema.ROLES, "log_every_steps", _schema.IDENTITY)
  with pytest.raises(UserError, match=r"holds a different run: log_every_steps 20 -> 5;"):
    workdir.check_rerun(str(tmp_path), config, saved)
  config.log_every_steps = 20
  assert workdir.check_rerun(str(tmp_path), config, saved) == {"learning_rate": (1e-4, 1e-3)}

  meta = runs.run_metadata(default.get_config(), ["cat", "dog"], 1, conv="xla")
  runs.check_same_run(meta, dict(meta, head_dropout=0.1), str(tmp_path))  # identity, unrecorded
  monkeypatch.setitem(_schema.ROLES, "head_dropout", _schema.STATE)
  with pytest.raises(UserError, match=r"holds a different run: head_dropout 0.6 -> 0.1;"):
    runs.check_same_run(meta, dict(meta, head_dropout=0.1), str(tmp_path))
