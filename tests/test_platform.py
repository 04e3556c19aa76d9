"""`transfer.platform`: the conv policy resolved once to a concrete choice, and `setup()`.

The same concrete choice must give the same program whatever the process's huge-page state; only
`conv="auto"` looks at the platform, once, when the model is built, and the run records what it
chose.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from transfer import configs, models, platform, runs
from transfer.errors import UserError
from transfer.platform import hugepages


@pytest.mark.parametrize("setting, backend, want", [
    ("auto", "cpu", "winograd_from_64"),
    ("auto", "gpu", "xla"),
    ("auto", "tpu", "xla"),
    ("xla", "cpu", "xla"),
    ("xla", "gpu", "xla"),
    ("winograd", "cpu", "winograd"),
    ("winograd", "gpu", "winograd"),
    ("winograd_from_128", "cpu", "winograd_from_128"),
])
def test_resolve_conv_table(setting, backend, want):
  assert platform.resolve_conv(setting, backend) == want


def test_auto_does_not_follow_how_the_process_was_started(monkeypatch):
  """With huge pages (the CLI) or without (plain Python), `auto` is the same choice."""
  assert jax.default_backend() == "cpu"  # conftest pins the tests to CPU
  for huge in (True, False):
    monkeypatch.setattr(hugepages, "active", lambda environ=None, huge=huge: huge)
    assert platform.resolve_conv("auto") == "winograd_from_64"


@pytest.mark.parametrize("bad", ["fast", "Auto", "winograd_from_0", "winograd_from_", ""])
def test_unknown_conv_lists_the_valid_values(bad):
  with pytest.raises(UserError, match=r"valid values: auto, xla, winograd, winograd_from_N"):
    platform.resolve_conv(bad, "cpu")


def _plain_environment(**extra):
  """This environment as a user's shell has it: no test XLA flags or cache, no huge pages."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "XLA_FLAGS", "TRANSFER_CPU_XLA_FLAGS",
                      "TRANSFER_COMPILE_CACHE")}
  return dict(env, JAX_PLATFORMS="cpu", **extra)


def test_setup_in_a_fresh_process_starts_no_backend_and_is_idempotent(tmp_path):
  """As the CLI runs it: before JAX has a backend (a multi-process run must join first)."""
  code = ("import json, os\nfrom transfer import platform\n"
          "first = platform.setup()\nflags = os.environ.get('XLA_FLAGS', '')\n"
          "second = platform.setup()\n"
          "assert second == first and os.environ.get('XLA_FLAGS', '') == flags, (first, second)\n"
          "assert not platform.xla_flags.backend_started()\n"
          "print(json.dumps({'setup': first, 'xla_flags': flags}))\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=_plain_environment(TRANSFER_HOME=str(tmp_path / "home")),
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  described = out["setup"]
  assert set(described) == {"xla_cpu_flags", "compile_cache", "hugepages", "hugepages_note",
                            "conv_auto"}
  assert described["hugepages"] is False  # started without the tunable
  assert described["hugepages_note"].startswith("off")
  assert described["conv_auto"] == "winograd_from_64"  # as the CLI, which has huge pages
  assert described["compile_cache"] == str(tmp_path / "home" / "compile_cache")
  for flag in described["xla_cpu_flags"]:
    assert flag in out["xla_flags"].split()


def test_setup_after_the_backend_started(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored afterwards
  jax.devices()
  first = platform.setup()
  assert platform.setup() == first == json.loads(json.dumps(first))
  assert first["conv_auto"] == platform.resolve_conv("auto")
  assert first["hugepages"] == hugepages.active()


_CACHE_PROBE = """
import json, sys
import jax
from transfer.platform import compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
import transfer
model = transfer.models.get("vgg16_tiny", head="gap", num_classes=3)  # the library's first use
variables = transfer.models.init_variables(model, 32, 0)
print(json.dumps({"setup": transfer.platform.setup(), "hits": len(hits)}))
"""


def _cache_probe(env):
  done = subprocess.run([sys.executable, "-c", _CACHE_PROBE], capture_output=True, text=True,
                        env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_compilation_cache_is_on_under_transfer_home_and_reused(tmp_path):
  """The library's first use turns the cache on; a second process loads what the first
  compiled instead of compiling it; TRANSFER_COMPILE_CACHE=0 switches it off."""
  env = _plain_environment(TRANSFER_HOME=str(tmp_path / "home"))
  first = _cache_probe(env)
  cache = tmp_path / "home" / "compile_cache"
  assert first["setup"]["compile_cache"] == str(cache)
  assert any(cache.iterdir())
  # (The first process hits too: flax's eager init traces some identical programs twice.)
  second = _cache_probe(env)
  assert second["hits"] > first["hits"]  # the init programs, read back

  off = _cache_probe(dict(env, TRANSFER_HOME=str(tmp_path / "home2"), TRANSFER_COMPILE_CACHE="0"))
  assert off["setup"]["compile_cache"] is None and off["hits"] == 0
  assert not (tmp_path / "home2").exists()


def test_hugepages_explain():
  assert hugepages.explain({"TRANSFER_CPU_MALLOC": "0", "JAX_PLATFORMS": "cpu"}).startswith("off")
  note = hugepages.explain({"JAX_PLATFORMS": "cpu"})
  if hugepages.wanted({"JAX_PLATFORMS": "cpu"}):
    assert hugepages.TUNABLE in note  # says how to get them from Python
  if hugepages.active({"GLIBC_TUNABLES": hugepages.TUNABLE}):
    assert hugepages.explain({"GLIBC_TUNABLES": hugepages.TUNABLE}).startswith("on")


def _fields(module):
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.name not in ("parent", "name")}


def _program(model, params, x):
  return jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, x).as_text()


def test_auto_is_decided_at_build_and_a_concrete_choice_is_the_same_program(monkeypatch):
  def build(huge: bool, conv: str):
    monkeypatch.setattr(hugepages, "active", lambda environ=None: huge)
    return models.get("vgg16_tiny", head="gap", num_classes=3, conv=conv)

  with_pages, without = build(True, "auto"), build(False, "auto")
  assert with_pages.conv == without.conv == "winograd_from_64"
  assert _fields(with_pages) == _fields(without)

  # The tiny model's widest layer has 32 inputs: from 16 up, some layers take Winograd.
  a, b = build(True, "winograd_from_16"), build(False, "winograd_from_16")
  assert _fields(a) == _fields(b)
  params = models.init_params(a, 32)
  x = jnp.zeros((2, 32, 32, 3))
  monkeypatch.setattr(hugepages, "active", lambda environ=None: True)
  text = _program(a, params, x)
  monkeypatch.setattr(hugepages, "active", lambda environ=None: False)
  assert _program(b, params, x) == text  # tracing reads no process state
  assert _program(build(False, "xla"), params, x) != text


def test_run_metadata_records_the_choice_and_the_xla_flags(monkeypatch):
  config = configs.load("quickstart")
  config.model, config.head, config.weights, config.image_size = "vgg16_tiny", "gap", "none", 32
  config.conv = "winograd_from_16"
  model, outputs = runs.build_model(config, 3)
  meta = json.loads(json.dumps(runs.run_metadata(config, ["a", "b", "c"], outputs,
                                                 conv=model.conv)))
  assert meta["conv"] == model.conv == "winograd_from_16"
  assert meta["platform"] == {"xla_flags": os.environ.get("XLA_FLAGS", ""),
                              "hugepages": hugepages.active()}
  for flag in platform.setup()["xla_cpu_flags"]:
    assert flag in meta["platform"]["xla_flags"]
  assert runs.model_from_meta(meta).conv == "winograd_from_64"  # this machine's auto
