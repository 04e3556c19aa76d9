"""The export formats are one registry of `Writer`s: the CLI offers exactly its names, and a
format added to it is written, checked and explained by `transfer export` with no other edit."""

import argparse
import json

import numpy as np
import pytest

from transfer import export, main
from transfer.export import serving, to_onnx, to_saved_model, to_stablehlo
from transfer.export.writer import Writer


def _export_parser() -> argparse.ArgumentParser:
  parser = main._parser()
  commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
  return commands.choices["export"]


def _format_choices() -> tuple:
  return tuple(next(a for a in _export_parser()._actions if a.dest == "format").choices)


def test_cli_format_choices_are_the_writer_registry():
  assert _format_choices() == tuple(export.WRITERS) == export.FORMATS
  assert export.FORMATS == ("stablehlo", "onnx", "saved_model")
  assert [export.WRITERS[f] for f in export.FORMATS] == [
      to_stablehlo.WRITER, to_onnx.WRITER, to_saved_model.WRITER]
  with pytest.raises(SystemExit) as e:
    _export_parser().parse_args(["--workdir", "w", "--format", "tflite"])
  assert e.value.code == 2


def test_each_writer_declares_its_extra_where_it_needs_a_converter():
  import tomllib
  import pathlib
  pyproject = pathlib.Path(__file__).parent.parent / "pyproject.toml"
  extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
  for writer in export.WRITERS.values():
    assert writer.extra == "" or writer.extra in extras, writer.name
  assert to_stablehlo.WRITER.extra == "" and to_onnx.WRITER.extra == "export"


def _uniform(variables, images):
  del variables
  return np.full((len(images), 2), 0.5, np.float32)


def _npy_writer(calls):
  """A format of this test's own: the metadata as JSON, and a runtime that answers 1/2 each."""

  def write(model, path):
    calls.append(("write", path))
    with open(path, "w") as f:
      json.dump(model.metadata, f)
    return path

  def read_metadata(path):
    with open(path) as f:
      return json.load(f)

  def run(path, images):
    calls.append(("run", path))
    return _uniform(None, images)

  return Writer(name="npy", title="NumPy", default_name="model.npy", directory=False,
                write=write, read_metadata=read_metadata, run=run,
                usage=lambda path: [f"print(open({path!r}).read())"],
                require=lambda: calls.append(("require", None)))


def test_a_format_added_to_the_registry_is_offered_written_checked_and_explained(
    tmp_path, monkeypatch, capsys):
  calls = []
  monkeypatch.setitem(export.WRITERS, "npy", _npy_writer(calls))
  metadata = {"class_names": ["cat", "dog"], "image_size": 8, "resize_to": 8,
              "probabilities": "softmax", "dtype": "float32"}
  monkeypatch.setattr(serving, "load_serving_model",
                      lambda workdir, checkpoint, dtype: serving.ServingModel(
                          apply=_uniform, variables={}, metadata=metadata))
  assert "npy" in _format_choices()
  assert main.run(["export", "--workdir", str(tmp_path), "--format", "npy"]) == 0
  path = str(tmp_path / "export" / "model.npy")
  assert export.default_path(str(tmp_path), "npy") == path
  assert calls == [("require", None), ("write", path), ("run", path)]
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].startswith("exported npy (") and printed[0].endswith(f"): {path}")
  assert "max |diff| 0.0e+00" in printed[1]
  assert printed[-1] == f"  print(open({path!r}).read())"
