"""The CLI's restart with glibc's huge-page tunable: when it happens, what it passes on, and that the
restarted process is the same command (same arguments, output and exit status)."""

import json
import os
import platform
import subprocess
import sys

import pytest

from transfer.platform import hugepages

CPU_ONLY = {"JAX_PLATFORMS": "cpu"}
CAN_RESTART = (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
               and hugepages.kernel_allows())


@pytest.mark.parametrize("environ, want", [
    (CPU_ONLY, CAN_RESTART),
    ({**CPU_ONLY, "TRANSFER_CPU_MALLOC": "0"}, False),             # turned off
    ({**CPU_ONLY, "GLIBC_TUNABLES": hugepages.TUNABLE}, False),    # already there
    ({**CPU_ONLY, "TRANSFER_HUGEPAGES_RESTARTED": "1"}, False),    # restarted once already
    ({"JAX_PLATFORMS": "cuda"}, False),                            # the host is not the device
])
def test_wanted(environ, want):
  assert hugepages.wanted(environ) == want


def test_restart_environment_keeps_other_tunables_and_marks_the_restart():
  env = hugepages.restart_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "A": "b"})
  assert env["GLIBC_TUNABLES"] == f"glibc.malloc.tcache_count=0:{hugepages.TUNABLE}"
  assert env["A"] == "b" and not hugepages.wanted(env)
  assert hugepages.restart_environment({})["GLIBC_TUNABLES"] == hugepages.TUNABLE


def _bench(env_extra):
  env = dict(os.environ, **CPU_ONLY, **env_extra)
  env.pop("GLIBC_TUNABLES", None)
  env.pop("TRANSFER_HUGEPAGES_RESTARTED", None)
  args = ["bench", "--json", "--config.model=vgg16_tiny", "--config.image_size=32",
          "--config.batch_size=4", "--steps=1", "--warmup=0"]
  done = subprocess.run([sys.executable, "-m", "transfer.main", *args], env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads([l for l in done.stdout.splitlines() if l.startswith("{")][-1])


def test_cli_restarts_with_huge_pages_and_runs_the_same_command():
  report = _bench({})
  assert report["hugepages"] == CAN_RESTART
  assert report["mode"] == "train" and report["batch_size"] == 4
  assert report["conv"] == "winograd_from_" + str(64 if CAN_RESTART else 256)  # auto, resolved
  assert _bench({"TRANSFER_CPU_MALLOC": "0"})["hugepages"] is False
