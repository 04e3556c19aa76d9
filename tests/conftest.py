"""Test set-up: 4 fake CPU devices, quiet TensorFlow, one compilation cache, and the shared
fixtures.

XLA_FLAGS (and KERAS_BACKEND) must be set before jax (keras) is imported anywhere, so they live
here at the top, followed by `transfer.platform.setup()`, so every test process (and every
`transfer` command a test starts) compiles as the CLI does. Shared functions are in `helpers.py`;
fixtures are here.

Compiled programs are kept in one persistent cache for the whole suite and later runs of it
(`TRANSFER_COMPILE_CACHE`, default a per-user directory under the temp dir; `0` turns it off):
the `home` fixture moves `TRANSFER_HOME` per test, and the cache must not move with it. JAX's
cache is keyed by program, flags and versions, and xdist workers share it safely
(`transfer.platform.compile_cache`).
"""

import getpass
import os
import subprocess
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TRANSFER_COMPILE_CACHE", os.path.join(
    tempfile.gettempdir(), f"transfer-tests-{getpass.getuser()}", "compile_cache"))

from transfer import platform  # noqa: E402  (after the environment set-up above)

platform.setup()


import pytest  # noqa: E402  (after the environment set-up above)


def write_tfds_metadata(data_dir, name, splits):
  """Writes `name`'s dataset_info with the given split sizes, as a prepared dataset would have.

  The pip package of TFDS does not ship the metadata that mock_data looks for, and without it
  mock_data accepts any split name; with it, a missing validation split is really missing.
  """
  tfds = pytest.importorskip("tensorflow_datasets", reason="tfds extra not installed")
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0)
      for split, n in splits.items()]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


@pytest.fixture
def mock_tfds(tmp_path):
  """TFDS cats_vs_dogs (train only) and beans (train/validation/test), 10 mock images a split."""
  tfds = pytest.importorskip("tensorflow_datasets")
  write_tfds_metadata(tmp_path, "cats_vs_dogs", {"train": 20})
  write_tfds_metadata(tmp_path, "beans", {"train": 20, "validation": 10, "test": 10})
  with tfds.testing.mock_data(num_examples=10, data_dir=str(tmp_path),
                              policy=tfds.testing.MockPolicy.USE_FILES):
    yield str(tmp_path)


@pytest.fixture
def home(tmp_path, monkeypatch):
  """TRANSFER_HOME (the weight cache) in the test's own directory, and every download pointed at
  a closed port instead of the internet. A file uses it with
  `pytestmark = pytest.mark.usefixtures("home")`. Returns the home directory."""
  path = tmp_path / "home"
  monkeypatch.setenv("TRANSFER_HOME", str(path))
  monkeypatch.setenv("TRANSFER_WEIGHTS_URL_BASE", "http://127.0.0.1:9/none")
  return path


@pytest.fixture(scope="module")
def weight_server():
  """A local HTTP server for downloads (`helpers.file_server`), one per test module."""
  from helpers import file_server
  with file_server() as server:
    yield server


@pytest.fixture
def tmpfs(tmp_path):
  """`tmpfs(options)` mounts a tmpfs with `options` ("size=2m", "ro") in the test's directory and
  returns its path: a disk that really fills up, or a file system read-only even to root.
  Mounting needs root with CAP_SYS_ADMIN; the test is skipped elsewhere."""
  mounted = []

  def mount(options: str):
    path = tmp_path / f"tmpfs{len(mounted)}"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)
    if done.returncode != 0:
      pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    mounted.append(path)
    return path

  yield mount
  for path in mounted:
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="session")
def keras():
  """Keras 3 on the TensorFlow backend; the test is skipped where it is not installed."""
  return pytest.importorskip("keras", reason="keras not installed")
