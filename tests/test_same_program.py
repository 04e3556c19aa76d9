"""The same config compiles the same program from a plain Python process and from the `transfer`
command, which restarts itself with huge pages (`transfer.platform`): the conv choice, the XLA
flags and the train step's program agree, as `transfer bench --json` and
`transfer.bench.step_fingerprint` report them."""

import json
import os
import subprocess
import sys

from transfer.platform import hugepages

OVERRIDES = {"model": "vgg16_tiny", "image_size": 32, "batch_size": 4, "head": "gap",
             "synthetic.train_size": 8, "synthetic.val_size": 4}

_PYTHON = """
import json, os
from transfer import bench, configs, platform
config = configs.load("bench")
for key, value in json.loads(os.environ["OVERRIDES"]).items():
  node, *path = key.split(".")
  target = config[node] if path else config
  target[path[0] if path else node] = value
config = configs.validate(config)
fingerprint = bench.step_fingerprint(config)  # the library sets the process up on first use
print(json.dumps({"conv": platform.setup()["conv_auto"], "step_fingerprint": fingerprint,
                  "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "hugepages": platform.hugepages.active()}))
"""


def _environment(tmp_path):
  """A user's shell: no test flags, no huge pages yet; the tests' compilation cache."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "XLA_FLAGS", "TRANSFER_CPU_XLA_FLAGS")}
  return dict(env, JAX_PLATFORMS="cpu", OVERRIDES=json.dumps(OVERRIDES),
              TRANSFER_HOME=str(tmp_path / "home"))


def _last_json(done):
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_python_and_the_cli_compile_the_same_train_step(tmp_path):
  env = _environment(tmp_path)
  python = _last_json(subprocess.run([sys.executable, "-c", _PYTHON], env=env,
                                     capture_output=True, text=True, timeout=600))
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  cli = _last_json(subprocess.run(
      [sys.executable, "-m", "transfer.main", "bench", "--json", "--steps", "1", "--warmup", "0",
       *flags], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path))
  # The command runs with huge pages where this machine allows them, plain Python without.
  assert cli["hugepages"] == hugepages.wanted(env) and python["hugepages"] is False
  assert cli["conv"] == python["conv"] == "winograd_from_64"
  assert cli["xla_flags"] == python["xla_flags"]
  assert cli["step_fingerprint"] == python["step_fingerprint"]
  assert len(cli["step_fingerprint"]) == 16
