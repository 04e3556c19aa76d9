"""Position embeddings resampled for another grid give what each framework's own resampling gives.

References, each called the way the framework calls it: timm's real `resample_abs_pos_embed`;
torchvision's real `interpolate_embeddings` on a state dict; DINOv2's `interpolate_pos_encoding`
replicated as its call to `F.interpolate` (facebookresearch/dinov2 at b8931f7 is not installable
here): `scale_factor=((h + 0.1) / M, (w + 0.1) / M)` for the hub models without registers, and
`size=(h, w), antialias=True` for those with registers, which is timm's call.

Tolerances: in float64 torch's arithmetic and ours agree to rounding (1e-12). In float32 torch
computes source positions and weights in float32, which moves results by up to ~2e-5 on a 37-wide
grid of unit-variance values, so float32 comparisons allow 5e-5 (a wrong kernel, offset or border
rule is off by 1e-2 or more).
"""

import numpy as np
import pytest

from transfer.errors import UserError
from transfer.models import pos_embed

torch = pytest.importorskip("torch", reason="torch extra not installed")
F = torch.nn.functional
from torch_models import import_torchvision  # noqa: E402  (needs torch)

ATOL = {np.float64: 1e-12, np.float32: 5e-5}
C = 8
# (old grid, new grid): enlarging, shrinking, and non-square targets.
RESIZES = [((14, 14), (24, 24)), ((7, 7), (12, 12)), ((37, 37), (16, 16)), ((24, 24), (14, 14)),
           ((16, 16), (37, 37)), ((14, 14), (10, 20)), ((24, 24), (12, 7))]
DINOV2_OFFSET = 0.1  # dinov2/hub/backbones.py: interpolate_offset for the models without registers


def embeddings(rows, prefix, dtype, seed=0):
  """(1, rows, C) random position embeddings, unit variance (harder than real ones, ~0.1)."""
  return np.random.default_rng(seed).standard_normal((1, rows, C)).astype(dtype)


def torch_grid_call(pos, prefix, old, fn):
  """Runs `fn` on the grid as torch holds it, (1, C, H, W), and returns (1, H'*W', C) numpy."""
  grid = torch.from_numpy(pos[0, prefix:].reshape(*old, C)).permute(2, 0, 1)[None]
  out = fn(grid)
  return out[0].permute(1, 2, 0).reshape(1, -1, C).numpy()


FRAMEWORK_CALLS = {
    # timm.layers.resample_abs_pos_embed's call.
    "timm": lambda new, M: lambda g: F.interpolate(g, size=new, mode="bicubic", align_corners=False,
                                                 antialias=True),
    # torchvision.models.vision_transformer.interpolate_embeddings's call.
    "torchvision": lambda new, M: lambda g: F.interpolate(g, size=new, mode="bicubic",
                                                        align_corners=True),
    # DINOv2's interpolate_pos_encoding, interpolate_offset=0.1, interpolate_antialias=False.
    "dinov2": lambda new, M: lambda g: F.interpolate(
        g, scale_factor=((new[0] + DINOV2_OFFSET) / M, (new[1] + DINOV2_OFFSET) / M),
        mode="bicubic", antialias=False),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("old,new", RESIZES)
@pytest.mark.parametrize("method", pos_embed.METHODS)
def test_matches_the_frameworks_interpolate_call(method, old, new, dtype):
  pos = embeddings(1 + old[0] * old[1], 1, dtype)
  got = pos_embed.resample(pos, 1, new, method)
  want = torch_grid_call(pos, 1, old, FRAMEWORK_CALLS[method](new, old[0]))
  assert got.dtype == dtype and got.shape == (1, 1 + new[0] * new[1], C)
  assert np.array_equal(got[:, :1], pos[:, :1])  # the class token is not resampled
  np.testing.assert_allclose(got[:, 1:], want, rtol=0, atol=ATOL[dtype])


def test_methods_differ():
  """The three are really different resamplings (by far more than the tolerances)."""
  pos = embeddings(1 + 14 * 14, 1, np.float64)
  outs = [pos_embed.resample(pos, 1, (24, 24), m) for m in pos_embed.METHODS]
  for i in range(len(outs)):
    for j in range(i):
      assert np.abs(outs[i] - outs[j]).max() > 1e-2


@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("old,new", RESIZES + [((12, 20), (24, 24))])
def test_timm_resample_abs_pos_embed(old, new, prefix):
  """timm's own function, with its prefix handling and a non-square source given as old_size."""
  import_torchvision()  # timm imports it
  from timm.layers import resample_abs_pos_embed
  pos = embeddings(prefix + old[0] * old[1], prefix, np.float32, seed=1)
  want = resample_abs_pos_embed(torch.from_numpy(pos), new_size=list(new), old_size=list(old),
                                num_prefix_tokens=prefix).numpy()
  got = pos_embed.resample(pos, prefix, new, "timm", old_hw=old)
  assert got.shape == want.shape
  assert np.array_equal(got[:, :prefix], pos[:, :prefix])
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL[np.float32])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("old,new", [(14, 24), (7, 12), (37, 16), (24, 14), (14, 7)])
def test_torchvision_interpolate_embeddings(old, new, dtype):
  """torchvision's own function on a state dict, as its ViT loads weights at another image size."""
  import_torchvision()
  from torchvision.models.vision_transformer import interpolate_embeddings
  patch = 16
  pos = embeddings(1 + old * old, 1, dtype, seed=2)
  state = {"encoder.pos_embedding": torch.from_numpy(pos.copy())}
  want = interpolate_embeddings(new * patch, patch, state)["encoder.pos_embedding"].numpy()
  got = pos_embed.resample(pos, 1, (new, new), "torchvision")
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL[dtype])


def test_dinov2_register_models_resample_as_timm():
  """DINOv2's hub models with registers (offset 0, antialias) call F.interpolate as timm does."""
  pos = embeddings(1 + 37 * 37, 1, np.float64, seed=3)
  for new in [(16, 16), (46, 46), (16, 24)]:
    want = torch_grid_call(pos, 1, (37, 37), lambda g, new=new: F.interpolate(
        g, size=new, mode="bicubic", antialias=True))
    np.testing.assert_allclose(pos_embed.resample(pos, 1, new, "timm")[:, 1:], want, rtol=0,
                               atol=ATOL[np.float64])


@pytest.mark.parametrize("method", pos_embed.METHODS)
def test_same_grid_is_returned_untouched(method):
  for old, prefix in [((14, 14), 1), ((12, 20), 0)]:
    pos = embeddings(prefix + old[0] * old[1], prefix, np.float32)
    old_hw = None if old[0] == old[1] else old
    assert pos_embed.resample(pos, prefix, old, method, old_hw=old_hw) is pos
    grid = pos[0, prefix:].reshape(*old, C)
    assert pos_embed.resample_grid(grid, old, method) is grid


def test_low_precision_keeps_its_dtype():
  """float16 in, float16 out, computed in float64 and rounded once."""
  pos = embeddings(1 + 14 * 14, 1, np.float64)
  got = pos_embed.resample(pos.astype(np.float16), 1, (16, 16), "timm")
  exact = pos_embed.resample(pos.astype(np.float16).astype(np.float64), 1, (16, 16), "timm")
  assert got.dtype == np.float16
  assert np.array_equal(got, exact.astype(np.float16))


@pytest.mark.parametrize("call,match", [
    (lambda pos: pos_embed.resample(pos, 0, (4, 4), "timm"), r"197 rows less 0 prefix.*not a square"),
    (lambda pos: pos_embed.resample(pos, 1, (4, 4), "timm", old_hw=(14, 13)), r"not a 14 x 13 grid"),
    (lambda pos: pos_embed.resample(pos, 1, (4, 4), "bilinear"), r"'bilinear' is unknown.*timm"),
    (lambda pos: pos_embed.resample(pos, 1, (0, 4), "timm"), r"new_hw must be positive"),
    (lambda pos: pos_embed.resample(pos[0], 1, (4, 4), "timm"), r"expected shape \(1, tokens"),
])
def test_bad_input_is_one_clear_error(call, match):
  pos = embeddings(1 + 14 * 14, 1, np.float32)
  with pytest.raises(UserError, match=match):
    call(pos)
