"""Resampling a ViT's absolute position embeddings to another patch grid, as each source does it.

Weights trained at one resolution carry a G x G grid of position embeddings (after P prefix rows:
the class token; DINOv2's register tokens are not in `pos_embed`). Running the model at another
resolution needs that grid resampled, and every framework does it its own way, so a port that
must give the framework's numbers has to resample the same way. The three ways here, each a
separable pair of 1-D resampling matrices built in float64 (`out = Wh @ grid @ Ww^T` per
channel), reproduce torch's `F.interpolate` exactly as each framework calls it:

- `"timm"`: `timm.layers.resample_abs_pos_embed`, i.e. `F.interpolate(size=new, mode="bicubic",
  align_corners=False, antialias=True)`. torch's antialiased path is PIL's resampling: the cubic
  kernel with a = -0.5, its support widened by the scale factor when shrinking, weights
  normalised over the window clipped to the input. It is the same when enlarging.
  DINOv2's *register* hub models (`dinov2_vit*14_reg`: `interpolate_offset=0`,
  `interpolate_antialias=True`) make exactly this call too, so they take `"timm"`.
- `"torchvision"`: `torchvision.models.vision_transformer.interpolate_embeddings`, i.e.
  `F.interpolate(size=new, mode="bicubic", align_corners=True)`: the cubic kernel with
  a = -0.75 at source positions `i * (n_in - 1) / (n_out - 1)`, border indices clamped.
  torchvision itself only makes square grids; any (h, w) is accepted here.
- `"dinov2"`: DINOv2's own `interpolate_pos_encoding` for the hub models without registers
  (`interpolate_offset=0.1`, `interpolate_antialias=False`): `F.interpolate(scale_factor=
  ((h + 0.1) / M, (w + 0.1) / M), mode="bicubic")`, a = -0.75, clamped borders. torch maps output
  i to source `(i + 0.5) / scale - 0.5` with the *given* scale, not `n_in / n_out`, so the result
  differs from a `size=` resize by the 0.1 offset (the kludge from facebookresearch/dino#8).
  Checked against facebookresearch/dinov2 at b8931f7: since e1277af (#378) a zero offset passes
  `size=` instead; with the hub's 0.1 both versions compute the same thing.

Equal old and new grids return the input itself (no arithmetic), as timm and DINOv2 do. Pure
numpy, so loading weights needs neither torch nor jax.
"""

import math

import numpy as np

from transfer.errors import UserError

METHODS = ("timm", "torchvision", "dinov2")

DINOV2_OFFSET = 0.1  # the hub models' `interpolate_offset` (dinov2/hub/backbones.py)


def _cubic(x, a):
  """Keys' cubic convolution kernel with parameter `a` (torch: -0.75 plain, -0.5 antialiased)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _antialiased(n_in, n_out):
  """torch's `_upsample_bicubic2d_aa` (align_corners=False, size given) as an (n_out, n_in) matrix."""
  scale = n_in / n_out
  stretch = max(scale, 1.0)  # shrinking widens the kernel; enlarging keeps it at 2 pixels
  support = 2.0 * stretch
  w = np.zeros((n_out, n_in))
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)  # int() truncates, as torch's C++ cast does
    hi = min(int(center + support + 0.5), n_in)
    j = np.arange(lo, hi)
    k = _cubic((j - center + 0.5) / stretch, -0.5)
    w[i, lo:hi] = k / k.sum()  # the window clipped to the input is renormalised (PIL's way)
  return w


def _plain_bicubic(n_in, n_out, source):
  """torch's `upsample_bicubic2d` (no antialias, a = -0.75) at source positions `source`."""
  w = np.zeros((n_out, n_in))
  x0 = np.minimum(np.floor(source), n_in - 1)  # torch's guard_index_and_lambda
  t = np.clip(source - x0, 0.0, 1.0)
  rows = np.arange(n_out)
  for k, dist in zip(range(-1, 3), (t + 1, t, 1 - t, 2 - t)):
    idx = np.clip(x0 + k, 0, n_in - 1).astype(int)  # clamped borders: edge pixels repeat
    np.add.at(w, (rows, idx), _cubic(dist, -0.75))
  return w


def resample_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
  """The (n_out, n_in) float64 matrix that resamples one axis of the grid the way `method` does.

  Args:
    n_in: grid length along this axis in the weights.
    n_out: grid length wanted.
    method: one of `METHODS`.

  Returns:
    A matrix whose row i holds the weights of the source rows for output row i.
  """
  _check_method(method)
  i = np.arange(n_out, dtype=np.float64)
  if method == "timm":
    return _antialiased(n_in, n_out)
  if method == "torchvision":  # align_corners=True: the end points map onto each other
    step = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    return _plain_bicubic(n_in, n_out, step * i)
  scale = (n_out + DINOV2_OFFSET) / n_in  # dinov2: the scale factor DINOv2 hands to torch
  return _plain_bicubic(n_in, n_out, (i + 0.5) / scale - 0.5)


def resample_grid(grid: np.ndarray, new_hw, method: str) -> np.ndarray:
  """Resamples an (H, W, C) grid to `new_hw` the way `method` does; H, W, C as in the weights.

  Args:
    grid: the position embeddings' patch grid, rows = image height, any float dtype.
    new_hw: (rows, columns) wanted.
    method: one of `METHODS`.

  Returns:
    The (H', W', C) grid in `grid`'s dtype; `grid` itself when the size does not change.
  """
  _check_method(method)
  (h, w, _), (nh, nw) = grid.shape, _check_hw(new_hw, "new_hw")
  if (h, w) == (nh, nw):
    return grid
  wh, ww = resample_matrix(h, nh, method), resample_matrix(w, nw, method)
  out = np.einsum("ah,hwc,bw->abc", wh, np.asarray(grid, np.float64), ww, optimize=True)
  return out.astype(grid.dtype)


def resample(pos: np.ndarray, prefix: int, new_hw, method: str, old_hw=None) -> np.ndarray:
  """Resamples position embeddings (1, prefix + H*W, C) to a new grid, prefix rows untouched.

  Args:
    pos: the weights' position embeddings: `prefix` rows (class token; 0 when there is none)
      then the H x W grid, row-major.
    prefix: how many leading rows are not part of the grid.
    new_hw: (rows, columns) of the model's patch grid at its input size.
    method: which framework's resampling to reproduce, one of `METHODS`; the weight source
      decides it.
    old_hw: the grid in the weights; default: square, from the row count.

  Returns:
    (1, prefix + H'*W', C) in `pos`'s dtype; `pos` itself when the grid does not change.

  Raises:
    UserError: the rows are not `prefix` plus a grid of `old_hw` (or a square one).
  """
  _check_method(method)
  if pos.ndim != 3 or pos.shape[0] != 1:
    raise UserError(f"position embeddings: expected shape (1, tokens, channels), got {pos.shape}")
  cells = pos.shape[1] - prefix
  if old_hw is None:
    side = math.isqrt(max(cells, 0))
    if side * side != cells or cells == 0:
      raise UserError(f"position embeddings: {pos.shape[1]} rows less {prefix} prefix rows is "
                      f"{cells}, not a square grid; pass old_hw=(rows, columns) or the right prefix")
    old_hw = (side, side)
  old_hw = _check_hw(old_hw, "old_hw")
  if old_hw[0] * old_hw[1] != cells:
    raise UserError(f"position embeddings: {pos.shape[1]} rows less {prefix} prefix rows is "
                    f"{cells}, not a {old_hw[0]} x {old_hw[1]} grid; check old_hw and the prefix")
  if old_hw == _check_hw(new_hw, "new_hw"):
    return pos
  grid = pos[0, prefix:].reshape(*old_hw, pos.shape[2])
  new = resample_grid(grid, new_hw, method).reshape(1, -1, pos.shape[2])
  return np.concatenate([pos[:, :prefix], new], axis=1)


def _check_method(method):
  """Refuses an unknown method, naming the valid ones."""
  if method not in METHODS:
    raise UserError(f"position-embedding resampling {method!r} is unknown; use one of {METHODS}")


def _check_hw(hw, what):
  """(rows, columns) as a tuple of two positive ints, or one clear error."""
  try:
    h, w = (int(v) for v in hw)
  except (TypeError, ValueError):
    raise UserError(f"{what} must be (rows, columns), got {hw!r}") from None
  if h < 1 or w < 1:
    raise UserError(f"{what} must be positive, got {hw!r}")
  return h, w
