"""Test set-up: 4 fake CPU devices, quiet TensorFlow, and small shared fixtures.

XLA_FLAGS must be set before jax is imported anywhere, so it lives here at the top.
"""

import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402  (after the environment set-up above)

F32_U = float(np.finfo(np.float32).eps) / 2  # float32 unit round-off, 2**-24

# How long a test waits for an event (a checkpoint committed, a process exiting) before calling it
# a hang. A guard, not a budget: on a quiet machine the events come within seconds, and a machine
# loaded ten times over its cores must still pass well inside it.
HANG_S = 600.0


def wait_for(predicate, what: str, timeout: float = HANG_S, poll: float = 0.1):
  """Polls `predicate()` until it returns something true and returns that; fails naming `what`.

  `predicate` may raise (e.g. when the process it watches has ended) to fail at once.
  """
  deadline = time.monotonic() + timeout
  while True:
    value = predicate()
    if value:
      return value
    if time.monotonic() > deadline:
      pytest.fail(f"no {what} after {timeout:.0f}s")
    time.sleep(poll)


def assert_close_to_scale(ours, ref, rtol: float):
  """Max abs difference within `rtol` of the reference's scale (element-wise rtol is meaningless
  for values near zero). For outputs of a ported network against its reference framework."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  err = np.abs(ours - ref).max()
  assert err <= rtol * np.abs(ref).max(), f"max error {err} vs scale {np.abs(ref).max()}"


def assert_trained_alike(got, want, *, terms: int, steps: int, slack: float = 4.0):
  """Asserts two param trees trained by different programs agree up to float32 round-off.

  For runs whose only difference is the order of the gradient's sums (another device or process
  count, shard_map vs pmap), under an optimizer linear in the gradient (SGD, with momentum).
  Per leaf, with p its largest magnitude (a bound on what `steps` small updates changed, exact
  for biases that start at 0): summing `terms` per element in another order changes the result
  by at most (terms - 1)·u·p, and each step may round p + Δp to the neighbouring float32,
  2u·p. `slack` covers cancellation among the terms and the differences' effect on later steps.

  Args:
    got, want: param trees of the same structure (`want` is the reference).
    terms: the most terms summed into one gradient element (examples × spatial positions).
    steps: optimizer steps taken.
    slack: safety factor over the round-off bound.
  """
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(want))
  for (path, w), g in zip(leaves, jax.tree_util.tree_leaves(jax.device_get(got))):
    w, g = np.asarray(w), np.asarray(g)
    atol = slack * (terms - 1 + 2 * steps) * F32_U * float(np.abs(w).max())
    np.testing.assert_allclose(g, w, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


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
