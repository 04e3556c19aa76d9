"""The command line's own handling: argument splitting, which config a train run uses, exit
statuses and one-line errors, and that `import transfer` stays light."""

import json
import os
import subprocess
import sys

import pytest

from transfer import configs, main


def test_config_overrides_are_split_from_the_other_arguments():
  rest, overrides = configs.split_overrides(
      ["train", "--workdir", "w", "--config.batch_size=8", "--config.trainable", "^head/,^b5"])
  assert rest == ["train", "--workdir", "w"]
  assert overrides == {"batch_size": "8", "trainable": "^head/,^b5"}


def test_an_override_without_a_value_is_one_error():
  with pytest.raises(configs.UserError, match=r"--config.seed needs a value"):
    configs.split_overrides(["train", "--config.seed"])


@pytest.mark.parametrize("argv,message", [
    (["eval", "--workdir", "w", "--config.seed=1"], "apply to train, bench and lr_find, not eval"),
    (["predict", "--checkpoint", "best", "x.jpg"], "--checkpoint"),
    (["train", "--config", "no_such_config"], "unknown config 'no_such_config'"),
    (["train", "--config.no_such_key=1"], "unknown config key 'no_such_key'"),
    (["train", "--config.batch_size=0"], "batch_size=0"),
])
def test_mistakes_are_one_line_and_exit_2(argv, message, capsys, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as stop:
    main.main(argv)
  err = capsys.readouterr().err
  assert stop.value.code == 2
  assert err.startswith("transfer: error: ") and message in err and err.count("\n") == 1
  assert not os.path.exists(tmp_path / "workdirs")


def test_a_bad_subcommand_is_argparses_usage_error(capsys):
  with pytest.raises(SystemExit) as stop:
    main.main(["tarin"])
  assert stop.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_train_takes_the_named_config_else_the_runs_own_else_the_demo(tmp_path):
  assert main._train_config_name("cats_vs_dogs", str(tmp_path)) == "cats_vs_dogs"
  assert main._train_config_name(None, str(tmp_path)) == configs.DEFAULT
  assert main._train_config_name(None, None) == configs.DEFAULT
  (tmp_path / "config.json").write_text(json.dumps({"model": "vgg16_tiny"}))
  assert main._train_config_name(None, str(tmp_path)) == str(tmp_path / "config.json")


def test_importing_the_package_imports_neither_jax_nor_tensorflow():
  code = ("import sys, transfer; assert 'jax' not in sys.modules, 'jax'; "
          "assert 'tensorflow' not in sys.modules, 'tf'; "
          "m = transfer.models.get('vgg16_tiny', head='gap', num_classes=3); "
          "assert 'tensorflow' not in sys.modules, 'tf after models'; print(type(m).__name__)")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == "VGG"


def test_an_unknown_attribute_of_the_package_is_an_attribute_error():
  import transfer
  with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
    transfer.nonsense  # pylint: disable=pointless-statement


@pytest.mark.parametrize("argv", [["--help"], ["tarin"], ["train", "--help"]])
def test_help_and_a_mistyped_command_answer_before_jax_is_imported(argv):
  """`transfer --help`, `train --help` and a typo parse their arguments before anything heavy
  is imported (they answered in ~4 s when JAX came first; docs/BENCHMARKS.md has the times)."""
  done = subprocess.run([sys.executable, "-X", "importtime", "-m", "transfer.main", *argv],
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()
              if line.startswith("import time:")}
  assert done.returncode == (2 if argv == ["tarin"] else 0), done.stderr[-2000:]
  assert imported and not {"jax", "jaxlib", "tensorflow", "flax"} & imported
  if argv == ["--help"]:
    assert "VGG16/19, ResNet50/101/152, InceptionV3" in " ".join(done.stdout.split())
  if argv == ["train", "--help"]:  # every config key, its default and its rule
    from transfer.configs import default
    for key, value in default.get_config().items():
      assert f"\n  {key}=" in done.stdout, key
    assert "learning_rate=0.0001  (> 0)" in done.stdout
