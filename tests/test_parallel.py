"""`transfer.parallel`: the `data` mesh, the one batch-size check, and the two data-parallel
wrappers (shard_map and pmap) agreeing on 4 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfer import parallel
from transfer.errors import UserError


def test_make_mesh():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == (parallel.AXIS,) and mesh.devices.size == jax.device_count() == 4
  assert parallel.make_mesh(jax.devices()[:2]).devices.size == 2


@pytest.mark.parametrize("batch_size, per_device", [(4, 1), (8, 2), (32, 8)])
def test_check_batch_size_gives_the_per_device_batch(batch_size, per_device):
  assert parallel.check_batch_size(batch_size, parallel.make_mesh()) == per_device
  assert parallel.check_batch_size(batch_size, process_count=2, local_devices=2) == per_device


@pytest.mark.parametrize("batch_size, processes, local, message", [
    (6, None, None, "batch_size 6 gives 6 examples per process, which does not divide over 4 "
                    "local devices; use a multiple of 4"),
    (0, None, None, "batch_size 0 .* use a multiple of 4"),
    (8, 3, 1, "batch_size 8 does not divide evenly over 3 processes; use a multiple of 3"),
    (4, 2, 4, "batch_size 4 gives 2 examples per process, which does not divide over 4 local "
              "devices; use a multiple of 8"),
])
def test_check_batch_size_messages(batch_size, processes, local, message):
  with pytest.raises(UserError, match=message):
    if processes is None:
      parallel.check_batch_size(batch_size, parallel.make_mesh())
    else:
      parallel.check_batch_size(batch_size, process_count=processes, local_devices=local)


def test_replicate_puts_the_same_value_on_every_device():
  mesh = parallel.make_mesh()
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(1.5)}
  placed = parallel.replicate(tree, mesh)
  for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(tree)):
    assert got.sharding.is_fully_replicated and len(got.sharding.device_set) == 4
    np.testing.assert_array_equal(got, want)


def _per_device(state, batch):
  """One SGD step on the mean of x * w, averaged over devices, plus a check of example_ids."""
  local = batch["x"].shape[0]
  grad = jax.lax.pmean(jnp.mean(batch["x"], axis=0), parallel.AXIS)
  ids_ok = jax.lax.pmin(jnp.all(parallel.example_ids(local) == batch["id"]).astype(jnp.int32),
                        parallel.AXIS)
  total = jax.lax.psum(jnp.sum(batch["x"] * state["w"]), parallel.AXIS)
  return {"w": state["w"] - 0.1 * grad}, {"total": total, "ids_ok": ids_ok}


@pytest.mark.parametrize("donate", [False, True])
def test_shard_map_and_pmap_agree(donate):
  mesh = parallel.make_mesh()
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) / 10
  batch = {"x": x, "id": np.arange(8, dtype=np.int32)}
  w = np.array([1.0, -2.0, 0.5], np.float32)
  results = {}
  for mode in parallel.MODES:
    step = parallel.data_parallel(_per_device, mesh, mode, donate_state=donate)
    state = parallel.replicate({"w": w}, mesh)
    state, out = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
    results[mode] = jax.device_get((state, out))
  (s_state, s_out), (p_state, p_out) = results["shard_map"], results["pmap"]
  np.testing.assert_allclose(s_state["w"], w - 0.1 * x.mean(axis=0), rtol=1e-6)
  np.testing.assert_allclose(s_out["total"], np.sum(x * w), rtol=1e-6)
  assert int(s_out["ids_ok"]) == int(p_out["ids_ok"]) == 1
  np.testing.assert_allclose(p_state["w"], s_state["w"], rtol=1e-6)
  np.testing.assert_allclose(p_out["total"], s_out["total"], rtol=1e-6)


def test_unknown_mode_lists_the_valid_ones():
  with pytest.raises(UserError, match="valid: shard_map, pmap"):
    parallel.data_parallel(_per_device, parallel.make_mesh(), "dp")
