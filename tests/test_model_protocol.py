"""The backbone protocol, declared layer kinds and the import graph (issue 21, points 2 and 3).

A token-sequence backbone with LayerNorm (the shape of a ViT) is built here on `Classifier`, as a
new family would be, to show that the heads, the stage dispatch, `batch_norm_layers` and the
torch porting work from the declaration and not from CNN assumptions or array shapes.
"""

import ast
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from transfer import models, optim
from transfer.models.backbone import Classifier
from transfer.weights import formats, port

ROOT = pathlib.Path(__file__).resolve().parents[1]


class TinyTokens(Classifier):
  """4x4 patches -> tokens -> LayerNorm: a test-only token backbone (N, T, C)."""

  width: int = 8

  def backbone(self, x, train: bool = False, example_ids=None):
    n, h, w, c = x.shape
    x = x.reshape(n, h // 4, 4, w // 4, 4, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, (h // 4) * (w // 4), 16 * c)
    x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="embed")(x)
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="encoder_norm")(x)


TOKEN_KINDS = {"embed": models.DENSE, "encoder_norm": models.LAYER_NORM,
               "predictions": models.DENSE}


def _token_spec() -> models.ModelSpec:
  return models.ModelSpec(
      name="tiny_tokens", build=lambda **kw: TinyTokens(arch="tiny_tokens", **kw),
      conv_layers=("embed", "encoder_norm"), top_layers=("predictions",),
      layer_kinds=TOKEN_KINDS, family="tokens",
      port=models.Porting(torch_names={"embed": "0", "encoder_norm": "1", "predictions": "2"}))


@pytest.mark.parametrize("head", ["gap", "flatten_dense", "imagenet"])
def test_heads_take_a_token_sequence(head):
  model = TinyTokens(head=head, num_classes=3)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(1), x)
  tokens = model.apply(variables, x, stage="features")
  assert tokens.shape == (2, 16, 8)
  logits = model.apply(variables, x)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  np.testing.assert_allclose(model.apply(variables, tokens, stage="head"), logits, rtol=1e-6)
  if head == "gap":  # the mean over the tokens, then the head's dense layer
    dense = variables["params"]["head"]["logits"]
    want = tokens.mean(axis=1) @ dense["kernel"] + dense["bias"]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)


def test_layer_norm_is_not_batch_norm():
  """A LayerNorm has `scale` and `bias` like a BatchNorm; only its declared kind says which."""
  params = TinyTokens(head="gap", num_classes=2).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
  assert set(params["encoder_norm"]) == {"scale", "bias"}
  assert optim.batch_norm_layers(params, TOKEN_KINDS) == ()
  as_bn = {**TOKEN_KINDS, "encoder_norm": models.BATCH_NORM}
  assert optim.batch_norm_layers(params, as_bn) == ("encoder_norm",)


@pytest.mark.parametrize("name", ["resnet50_tiny", "inception_v3_tiny", "vgg16_tiny"])
def test_declared_kinds_drive_batch_norm_layers(name):
  spec = models.spec(name)
  params = models.init_params(models.get(name, head="gap", num_classes=2), spec.min_image_size)
  declared = tuple(sorted(n for n, k in spec.layer_kinds.items() if k == models.BATCH_NORM))
  assert optim.batch_norm_layers(params) == declared
  assert optim.batch_norm_layers(params, spec.layer_kinds) == declared
  assert spec.batch_norm == bool(declared)
  assert set(params) - {"head"} <= set(spec.layer_kinds)


def test_torch_layer_norm_ports_as_scale_not_kernel(tmp_path):
  """torch's LayerNorm `weight` is our `scale`; a shape-based guess would make it a kernel."""
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Linear(48, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
  path = tmp_path / "tokens.pth"
  torch.save(net.state_dict(), path)
  spec = _token_spec()
  with formats.open_weights(path) as wf:
    view = port.model_view(wf, spec)
    assert set(view["encoder_norm"]) == {"scale", "bias"}
    np.testing.assert_array_equal(view["encoder_norm"]["scale"].read(),
                                  net[1].weight.detach().numpy())
    np.testing.assert_array_equal(view["embed"]["kernel"].read(),
                                  net[0].weight.detach().numpy().T)
    model = spec.build(head="imagenet", num_classes=3)
    shapes = port.by_layer(port.variable_shapes(model, 16))
    plan = port.plan_merge(shapes, view)
    assert not plan.problems and set(plan.loaded) == {"embed", "encoder_norm", "predictions"}
    params = port.read_layers(view, shapes, plan.loaded)
  x = np.random.RandomState(0).rand(2, 16, 16, 3).astype(np.float32)
  patches = x.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 48)
  with torch.no_grad():
    want = net(torch.from_numpy(patches)).mean(dim=1).numpy()  # tokens averaged after the top
  got = model.apply({"params": params}, x)
  # The ImageNet top pools the tokens first; a linear top commutes with the mean.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_spec_refuses_an_undeclared_layer():
  with pytest.raises(ValueError, match="without a kind"):
    models.ModelSpec(name="x", build=TinyTokens, conv_layers=("embed", "norm"),
                     top_layers=(), layer_kinds={"embed": models.DENSE},
                     port=models.Porting(torch_names={}))


def _imports(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
  return out


def test_platform_imports_nothing_from_models():
  """models -> platform only: the platform code owns the conv choice's spelling."""
  for path in (ROOT / "transfer" / "platform").glob("*.py"):
    assert not any(m.startswith("transfer.models") for m in _imports(path)), path
  code = ("import sys, transfer.platform as p; p.resolve_conv('auto', 'cpu'); "
          "assert not [m for m in sys.modules if m.startswith('transfer.models')]")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


class PosEmbed(nn.Module):
  """A learned (1, T, C) tensor in a one-parameter layer, as a ViT's position embeddings."""

  tokens: int
  width: int

  @nn.compact
  def __call__(self, x):
    return x + self.param("embedding", nn.initializers.normal(0.02), (1, self.tokens, self.width))


class TinyTokensPos(TinyTokens):

  def backbone(self, x, train: bool = False, example_ids=None):
    x = super().backbone(x, train)
    return PosEmbed(x.shape[1], x.shape[2], name="pos_embedding")(x)


def _grid_resample(layer, name, have, want, dialect=None):
  """Nearest-neighbour upsampling of a square token grid (a test's stand-in for a ViT's
  bilinear resampling)."""
  if layer != "pos_embedding" or have[1] >= want[1]:
    return None
  side, new = int(round(have[1] ** 0.5)), int(round(want[1] ** 0.5))

  def convert(a):
    grid = a.reshape(1, side, side, a.shape[-1])
    grid = np.repeat(np.repeat(grid, new // side, axis=1), new // side, axis=2)
    return grid.reshape(want)
  return convert


def test_family_adapter_resamples_position_embeddings(tmp_path):
  """A file's position embeddings for an 8x8 input fill a model built for 16x16 through the
  family adapter's `resample`, as `transfer.weights.load` calls it (`port.fit_view`)."""
  table = torch.randn(1, 4, 8)
  torch.save({"pos_embed": table, "0.weight": torch.randn(8, 48), "0.bias": torch.randn(8),
              "1.weight": torch.randn(8), "1.bias": torch.randn(8)}, tmp_path / "pos.pth")
  kinds = {**TOKEN_KINDS, "pos_embedding": models.EMBEDDING}
  spec = models.ModelSpec(
      name="tiny_tokens_pos", build=lambda **kw: TinyTokensPos(arch="tiny_tokens_pos", **kw),
      conv_layers=("embed", "encoder_norm", "pos_embedding"), top_layers=("predictions",),
      layer_kinds=kinds, port=models.Porting(
          torch_names={"embed": "0", "encoder_norm": "1", "pos_embedding": "pos_embed"},
          resample=_grid_resample))
  model = spec.build(head="none")
  shapes = port.by_layer(port.variable_shapes(model, 16))
  with formats.open_weights(tmp_path / "pos.pth") as wf:
    raw = port.model_view(wf, spec)
    assert raw["pos_embedding"]["embedding"].shape == (1, 4, 8)
    assert port.plan_merge(shapes, raw).misshaped
    view = port.fit_view(raw, shapes, spec)
    plan = port.plan_merge(shapes, view)
    assert not plan.problems, plan
    params = port.read_layers(view, shapes, plan.loaded)
  got = np.asarray(params["pos_embedding"]["embedding"]).reshape(4, 4, 8)
  want = table.numpy().reshape(2, 2, 8)
  np.testing.assert_array_equal(got[::2, ::2], want)
  np.testing.assert_array_equal(got[1::2, 1::2], want)
