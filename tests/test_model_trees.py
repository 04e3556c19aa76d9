"""Every registered model keeps its variable tree: paths and shapes of `params` and `batch_stats`.

Checkpoints of existing runs and the ported weight files restore by path, so a refactor of the
model code must leave every path and shape as it was. `tests/golden/model_trees.json` was written
from main before the backbone protocol was written once (`python tests/test_model_trees.py`
regenerates it; do so only for a deliberate change of a tree). For each model and variant it holds
the tree with `head="none"` and, for every other head, the entries that head adds.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

from transfer import models

GOLDEN = pathlib.Path(__file__).parent / "golden" / "model_trees.json"
HEADS = ("none", "imagenet", "gap", "flatten_dense")


def _cases():
  for name in models.names():
    for variant in models.spec(name).variants or (None,):
      yield name, variant


def _tree(name: str, variant: str | None, head: str) -> dict[str, list[int]]:
  """`collection/layer/.../leaf` -> shape of a freshly built model (shapes only, nothing run)."""
  spec = models.spec(name)
  model = models.get(name, head=head, num_classes=None if head in ("none", "imagenet") else 3,
                     variant=variant, conv="xla")
  size = spec.top_image_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  flat = jax.tree_util.tree_flatten_with_path(dict(shapes))[0]
  return {"/".join(str(k.key) for k in path): list(leaf.shape) for path, leaf in flat}


def _golden_entry(name: str, variant: str | None) -> dict[str, dict[str, list[int]]]:
  base = _tree(name, variant, "none")
  entry = {"none": base}
  for head in HEADS[1:]:
    tree = _tree(name, variant, head)
    missing = sorted(set(base) - set(tree))
    assert not missing, f"{name} head={head} lacks backbone entries {missing[:5]}"
    entry[head] = {k: v for k, v in tree.items() if k not in base}
  return entry


def _key(name: str, variant: str | None) -> str:
  return f"{name}:{variant}" if variant else name


@pytest.mark.parametrize("name,variant", list(_cases()))
def test_variable_tree_matches_golden(name, variant):
  golden = json.loads(GOLDEN.read_text())
  want = golden[_key(name, variant)]
  got = _golden_entry(name, variant)
  for head in HEADS:
    extra = sorted(set(got[head]) - set(want[head]))
    lost = sorted(set(want[head]) - set(got[head]))
    shapes = sorted(k for k in set(got[head]) & set(want[head]) if got[head][k] != want[head][k])
    assert not (extra or lost or shapes), (
        f"{name} variant={variant} head={head}: new {extra[:5]}, gone {lost[:5]}, "
        f"reshaped {[(k, want[head][k], got[head][k]) for k in shapes[:5]]}")


def test_golden_covers_every_registered_model():
  golden = json.loads(GOLDEN.read_text())
  assert sorted(golden) == sorted(_key(n, v) for n, v in _cases())


if __name__ == "__main__":  # regenerate (deliberate tree changes only)
  GOLDEN.parent.mkdir(exist_ok=True)
  out = {_key(n, v): _golden_entry(n, v) for n, v in _cases()}
  GOLDEN.write_text(json.dumps(out, sort_keys=True, separators=(",", ":")) + "\n")
  print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)", file=sys.stderr)
