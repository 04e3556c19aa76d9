"""What a train step does besides plain cross-entropy: label smoothing, mixup and cutmix.

Pure per-device code (the mixing pairs examples across the global batch with one `ppermute`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from transfer import parallel

# Folded into a step's key to give the mixup/cutmix key. Dropout folds in example ids, which are
# below the batch size, so this value keeps the two streams apart for any batch under 2**31 - 1.
_MIX_STREAM = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Regularisation:
  """What the train step does besides plain cross-entropy on the batch (all off by default).

  Attributes:
    label_smoothing: softmax targets `y*(1-ls) + ls/C`; the one-logit sigmoid head's target
      `y*(1-ls) + ls/2` (two classes, so the same rule with C = 2).
    mixup_alpha: > 0: mixup with lambda ~ Beta(alpha, alpha), one lambda per global batch.
    cutmix_alpha: > 0: cutmix with lambda ~ Beta(alpha, alpha), one box per global batch, lambda
      corrected to the box's real area (timm's `correct_lam`).
    switch_prob: with both alphas > 0, the probability that a batch gets cutmix rather than
      mixup (timm's `switch_prob`, 0.5). Every batch is mixed (timm's `mix_prob` = 1).
  """

  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  switch_prob: float = 0.5

  @classmethod
  def from_config(cls, config) -> "Regularisation":
    """The run's regularisation from its (validated) config; each key's default, in default.py,
    is off (an older run's config.json is read back over those defaults)."""
    get = lambda key: float(config[key])
    return cls(label_smoothing=get("label_smoothing"), mixup_alpha=get("mixup_alpha"),
               cutmix_alpha=get("cutmix_alpha"))

  @property
  def mixes(self) -> bool:
    """Whether batches are mixed (mixup or cutmix)."""
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0

  @property
  def soft(self) -> bool:
    """Whether the loss takes soft targets (smoothing or mixing)."""
    return self.mixes or self.label_smoothing > 0


def mix_key(step_key):
  """The step's mixup/cutmix key, apart from the dropout keys folded from the same step key."""
  return jax.random.fold_in(step_key, _MIX_STREAM)


def cutmix_box(rng, lam, height: int, width: int):
  """timm's `rand_bbox` + `correct_lam`: a box of area about (1 - lam) of the image.

  The box's sides are `floor(side * sqrt(1 - lam))`, its centre uniform over the image, clipped
  at the borders; the returned lambda is the share of the image outside the clipped box.

  Returns:
    `(top, bottom, left, right, lam)`: rows [top, bottom) and columns [left, right) come from
    the partner image; `lam` is the weight of the example's own target.
  """
  ky, kx = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  area = ((bottom - top) * (right - left)).astype(jnp.float32)
  return top, bottom, left, right, 1.0 - area / (height * width)


def mix_batch(rng, images, targets, partner: Callable, reg: Regularisation):
  """Mixup or cutmix of a batch with its partner examples (timm's `Mixup`, mode "batch").

  Args:
    rng: the step's mixing key (the same on every device).
    images: (N, H, W, C) this device's images.
    targets: soft targets, (N, C) or (N,) (`soft_targets`).
    partner: maps a per-example array to the partner of each example (`flipped_partner`).
    reg: the alphas and switch probability.

  Returns:
    `(images, targets, lam)`: mixed images and targets, and the weight of each example's own
    target (after cutmix's area correction).
  """
  k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 4)
  other_images, other_targets = partner(images), partner(targets)
  height, width = images.shape[1], images.shape[2]

  def mixup():
    lam = jax.random.beta(k_mixup, reg.mixup_alpha, reg.mixup_alpha)
    return lam * images + (1.0 - lam) * other_images, lam

  def cutmix():
    lam = jax.random.beta(k_cutmix, reg.cutmix_alpha, reg.cutmix_alpha)
    top, bottom, left, right, lam = cutmix_box(k_box, lam, height, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return jnp.where(inside[None, :, :, None], other_images, images), lam

  if reg.mixup_alpha > 0 and reg.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < reg.switch_prob
    (mixed_a, lam_a), (mixed_b, lam_b) = cutmix(), mixup()
    mixed, lam = jnp.where(use_cutmix, mixed_a, mixed_b), jnp.where(use_cutmix, lam_a, lam_b)
  elif reg.cutmix_alpha > 0:
    mixed, lam = cutmix()
  else:
    mixed, lam = mixup()
  lam = lam.astype(jnp.float32)
  return mixed.astype(images.dtype), lam * targets + (1.0 - lam) * other_targets, lam


def flipped_partner(num_devices: int) -> Callable:
  """Per-device code: each example's partner in the global batch flipped end to end.

  Global example g pairs with example B-1-g (timm pairs with `x.flip(0)`). Device d's partners
  are device (n-1-d)'s examples in reverse order, so one `ppermute` gives them, and the pairs
  (hence the mixed batch) are the same whatever the number of devices.
  """
  def partner(x):
    if num_devices > 1:
      x = jax.lax.ppermute(x, parallel.AXIS,
                           perm=[(d, num_devices - 1 - d) for d in range(num_devices)])
    return x[::-1]
  return partner
