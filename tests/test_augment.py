"""inception_crop and randaugment: per-example determinism, resume, process and batch invariance."""

import numpy as np
import pytest
from PIL import Image

import transfer.data
from transfer.data import augmentation, images
from helpers import assert_batches_equal, make_config, take

AUGMENTS = ["inception_crop", "randaugment"]


def _config(augment, **overrides):
  return make_config(augment=augment, image_size=32, **{"synthetic.base_size": 32, **overrides})


@pytest.mark.parametrize("augment", AUGMENTS)
def test_same_seed_same_batches_and_exact_resume(augment):
  config = _config(augment)
  a = take(transfer.data.create(config, preprocess_source="unit").train_batches(), 8)
  ds = transfer.data.create(config, preprocess_source="unit")
  assert_batches_equal(a[6:], take(ds.train_batches(start_step=6), 2))
  assert a[0]["image"].shape == (8, 32, 32, 3)
  other = take(transfer.data.create(_config(augment, seed=1), preprocess_source="unit")
               .train_batches(), 1)
  assert not np.array_equal(a[0]["image"], other[0]["image"])
  plain = next(transfer.data.create(_config("none"), preprocess_source="unit").train_batches())
  np.testing.assert_array_equal(a[0]["label"], plain["label"])
  assert not np.allclose(a[0]["image"], plain["image"])


@pytest.mark.parametrize("augment", AUGMENTS)
@pytest.mark.parametrize("process_count", [2, 4])
def test_the_same_pixels_whatever_the_process_count(augment, process_count):
  config = _config(augment, batch_size=16)  # 4 fake devices per process (conftest)
  whole = take(transfer.data.create(config, preprocess_source="unit").train_batches(1), 3)
  parts = [take(transfer.data.create(config, preprocess_source="unit", process_index=p,
                                     process_count=process_count).train_batches(1), 3)
           for p in range(process_count)]
  for one, *rest in zip(whole, *parts):
    for k in one:
      np.testing.assert_array_equal(one[k], np.concatenate([r[k] for r in rest]), err_msg=k)


@pytest.mark.parametrize("augment", AUGMENTS)
def test_an_example_gets_the_same_pixels_whatever_the_batch_size_or_worker_count(augment):
  """The epoch's order does not depend on the batch size; an example's augmentation depends
  only on (seed, epoch, id), so batches of 8 and of 4 (and 1 or 3 decode workers) agree."""
  def by_id(batch_size, workers):
    ds = transfer.data.create(_config(augment, batch_size=batch_size, data_workers=workers),
                              preprocess_source="unit")
    out = {}
    for batch in take(ds.train_batches(), ds.steps_per_epoch):
      out.update({int(i): img for i, img in zip(batch["id"], batch["image"])})
    return out
  a, b = by_id(8, 1), by_id(4, 3)
  assert sorted(a) == sorted(b) == list(range(40))
  for i in a:
    np.testing.assert_array_equal(a[i], b[i], err_msg=str(i))


def test_inception_crop_box_follows_the_scale_and_ratio_ranges():
  rng = np.random.default_rng(0)
  areas, ratios = [], []
  for _ in range(2000):
    top, left, h, w = images.inception_crop_box(256, 256, rng)
    assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 256
    areas.append(h * w / 256 ** 2)
    ratios.append(w / h)
  areas, ratios = np.array(areas), np.array(ratios)
  whole = areas == 1.0  # the fallback, after 10 misses (rare for a square image)
  assert whole.mean() < 0.02
  assert areas[~whole].min() >= 0.075 and areas.max() <= 1.0
  assert ratios[~whole].min() >= 0.74 and ratios[~whole].max() <= 1.35
  # Both ranges are covered to their ends (large non-square windows are rejected, so areas
  # are not uniform: no test of the mean).
  assert areas[~whole].min() < 0.1 and areas[~whole].max() > 0.9
  assert ratios[~whole].min() < 0.8 and ratios[~whole].max() > 1.25


def test_inception_crop_fallback_is_the_centred_whole_image():
  class Miss:  # every try asks for more than the image (area > 1 is impossible to fit)
    def uniform(self, lo, hi):
      return hi * 4 if hi == 1.0 else 0.0
    def integers(self, lo, hi):
      raise AssertionError("no window fits, nothing to place")
  assert images.inception_crop_box(40, 40, Miss()) == (0, 0, 40, 40)
  top, left, h, w = images.inception_crop_box(100, 20, Miss())  # tall: ratio clamped at 3/4
  assert (h, w) == (27, 20) and (top, left) == ((100 - 27) // 2, 0)


def test_randaugment_magnitudes_follow_timm():
  arg = images.randaugment_arg
  assert arg("Rotate", 9) == pytest.approx(27.0)
  assert arg("ShearX", 10) == pytest.approx(0.3)
  assert arg("TranslateYRel", 5) == pytest.approx(0.225)
  assert arg("Posterize", 9) == 3 and arg("Solarize", 9) == 230 and arg("SolarizeAdd", 9) == 99
  assert arg("Color", 9) == pytest.approx(1.72) and arg("Sharpness", 0) == pytest.approx(0.1)
  assert arg("Equalize", 9) is None
  assert arg("Rotate", 30) == arg("Rotate", 10)  # clipped to timm's 0-10 scale


@pytest.mark.parametrize("name", images.RANDAUGMENT_OPS)
def test_every_randaugment_op_keeps_shape_and_type(name):
  rng = np.random.default_rng(0)
  image = rng.integers(40, 200, (32, 32, 3)).astype(np.uint8)  # not full range: AutoContrast acts
  out = np.asarray(images._apply_op(Image.fromarray(image), name,
                                    images.randaugment_arg(name, 7)), np.uint8)
  assert out.shape == image.shape
  assert not np.array_equal(out, image), name


def test_randaugment_is_a_function_of_its_generator():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
  outs = [images.randaugment(image, np.random.default_rng((1, 2, 3)), 2, 9) for _ in range(2)]
  np.testing.assert_array_equal(*outs)
  many = {images.randaugment(image, np.random.default_rng(s), 2, 9).tobytes() for s in range(20)}
  assert len(many) > 10


def test_augment_one_randaugment_starts_from_the_inception_crop():
  image = np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.uint8)
  crop = augmentation.augment_one(image, "inception_crop", 32, np.random.default_rng(5))
  rng = np.random.default_rng(5)
  want = images.randaugment(images.inception_crop(image, 32, rng), rng, 1, 5)
  got = augmentation.augment_one(image, "randaugment", 32, np.random.default_rng(5), (1, 5))
  np.testing.assert_array_equal(got, want)
  assert crop.shape == (32, 32, 3)
