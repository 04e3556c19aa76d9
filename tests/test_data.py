"""Tests for transfer.data: sources, bad files, determinism, resume, sharding and prefetch."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

import transfer.data
from transfer.data.sources import folder_sources
from transfer.errors import UserError
from helpers import assert_batches_equal, make_config, take

RED, BLUE = (220, 30, 40), (30, 40, 220)


# Synthetic data, determinism and resume.

def test_synthetic_shapes_and_classes():
  ds = transfer.data.create(make_config(), preprocess_source="keras:vgg16")
  assert (ds.num_classes, ds.num_train, ds.num_val) == (3, 40, 13)
  assert ds.class_names == ["class_0", "class_1", "class_2"]
  assert (ds.steps_per_epoch, ds.local_batch_size, ds.skipped) == (5, 8, [])
  batch = next(ds.train_batches())
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1, 2}


def test_synthetic_classes_are_learnable():
  # A nearest-class-mean classifier on raw pixels must beat chance clearly: not pure noise.
  ds = transfer.data.create(make_config(augment="none"), preprocess_source="unit")
  train = list(ds.eval_batches("train", batch_size=8))
  x = np.concatenate([b["image"][b["mask"]] for b in train]).reshape(ds.num_train, -1)
  y = np.concatenate([b["label"][b["mask"]] for b in train])
  means = np.stack([x[y == c].mean(0) for c in range(3)])
  val = list(ds.eval_batches("val", batch_size=8))
  xv = np.concatenate([b["image"][b["mask"]] for b in val]).reshape(ds.num_val, -1)
  yv = np.concatenate([b["label"][b["mask"]] for b in val])
  pred = np.argmin(((xv[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (pred == yv).mean() > 0.8


@pytest.mark.parametrize("augment", ["none", "flip", "crop_flip"])
def test_same_seed_same_batches_and_exact_resume(augment):
  config = make_config(augment=augment)
  a = take(transfer.data.create(config, preprocess_source="unit").train_batches(), 12)
  ds = transfer.data.create(config, preprocess_source="unit")
  assert_batches_equal(a, take(ds.train_batches(), 12))
  # Step 7 is in the second epoch (5 steps per epoch).
  assert ds.position(7) == {"epoch": 1, "index": 2} and ds.step_of({"epoch": 1, "index": 2}) == 7
  assert_batches_equal(a[7:], take(ds.train_batches(start_step=7), 5))
  other = take(transfer.data.create(make_config(augment=augment, seed=1),
                                    preprocess_source="unit").train_batches(), 1)
  assert not np.array_equal(a[0]["image"], other[0]["image"])


def test_epochs_cover_train_set_in_new_orders():
  ds = transfer.data.create(make_config(), preprocess_source="unit")
  batches = take(ds.train_batches(), 2 * ds.steps_per_epoch)
  epochs = [np.concatenate([b["id"] for b in batches[e * 5:(e + 1) * 5]]) for e in range(2)]
  for ids in epochs:
    assert len(set(ids)) == 40  # 40 examples, batch 8: no remainder dropped here.
  assert not np.array_equal(epochs[0], epochs[1])


def test_crop_flip_changes_pixels_but_not_labels():
  ds = transfer.data.create(make_config(augment="crop_flip"), preprocess_source="unit")
  plain = transfer.data.create(make_config(augment="none"), preprocess_source="unit")
  a, b = next(ds.train_batches()), next(plain.train_batches())
  np.testing.assert_array_equal(a["id"], b["id"])
  np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.allclose(a["image"], b["image"])


def test_no_tensorflow_for_synthetic_and_folders(tmp_path):
  write_folder(tmp_path)
  code = textwrap.dedent(f"""
      import sys
      import transfer.data
      from tests.helpers import make_config
      for name in ("synthetic", "folder:{tmp_path}"):
        ds = transfer.data.create(make_config(dataset=name), preprocess_source="keras:vgg16")
        next(ds.train_batches())
      assert "tensorflow" not in sys.modules, "tensorflow was imported"
      """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


_OPEN_AT_EXIT = textwrap.dedent("""
    import sys, types
    # Iterators left open in a namespace that outlives the modules they use (as a notebook's).
    state = sys.modules["notebook_state"] = types.ModuleType("notebook_state")
    import transfer.data
    from tests.helpers import make_config
    if __name__ == "__main__":
      config = make_config(data_worker_kind=sys.argv[1], data_workers=2)
      ds = transfer.data.create(config, preprocess_source="unit")
      state.train, state.val = ds.train_batches(), ds.eval_batches()
      next(state.train), next(iter(state.val))
      print("took a batch")
    """)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_open_batch_iterators_exit_without_noise(kind, tmp_path):
  """A program that ends with batch iterators open (decode threads or processes busy) exits
  quietly: no `Exception ignored ...` from executors shut down during module teardown."""
  script = tmp_path / "open_at_exit.py"  # a file: spawned workers re-import __main__
  script.write_text(_OPEN_AT_EXIT)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_ROOT)
  result = subprocess.run([sys.executable, str(script), kind], cwd=_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "took a batch"
  noise = [line for line in result.stderr.splitlines()
           if "Exception ignored" in line or "Traceback" in line or "Error" in line]
  assert not noise, result.stderr[-2000:]


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Image folders.

GOOD = {  # name -> (class, writer)
    "rgb.jpg": ("cat", lambda img, p: img.save(p, quality=95)),
    "rgba.png": ("cat", lambda img, p: img.convert("RGBA").save(p)),
    "anim.gif": ("cat", lambda img, p: img.save(p, save_all=True, append_images=[
        Image.new("RGB", img.size, BLUE)])),  # Only the first (red) frame may be read.
    "plain.bmp": ("cat", lambda img, p: img.save(p)),
    "lossless.webp": ("cat", lambda img, p: img.save(p, lossless=True)),
    "cmyk.jpg": ("dog", lambda img, p: img.convert("CMYK").save(p, quality=95)),
    "palette.png": ("dog", lambda img, p: img.convert("P").save(p)),
    "palette_alpha.png": ("dog", lambda img, p: img.convert("P").save(p, transparency=0)),
    "gray.png": ("dog", lambda img, p: img.convert("L").save(p)),
    "gray.jpg": ("dog", lambda img, p: img.convert("L").save(p)),
    "photo.webp": ("dog", lambda img, p: img.save(p, quality=90)),
    "big.jpg": ("dog", lambda img, p: img.resize((90, 45)).save(p)),
}
BAD = {  # name -> (class, bytes)
    "corrupt.jpg": ("cat", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4),
    "notes.txt": ("cat", b"not an image\n"),
    "empty.png": ("dog", b""),
}


def write_folder(root, layout=None):
  """A two-class folder of every format, plus corrupt, truncated, empty and text files.

  Cats are red and dogs blue, except the gray images, so colours can be checked after decoding.
  """
  layout = layout or {"": None}
  for sub in layout:
    for name, (cls, write) in GOOD.items():
      os.makedirs(root / sub / cls, exist_ok=True)
      write(Image.new("RGB", (40, 30), RED if cls == "cat" else BLUE), root / sub / cls / name)
    for name, (cls, data) in BAD.items():
      (root / sub / cls / name).write_bytes(data)
    full = (root / sub / "cat" / "rgb.jpg").read_bytes()
    (root / sub / "cat" / "truncated.jpg").write_bytes(full[:len(full) // 2])
    noise = np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)
    Image.fromarray(noise).save(root / sub / "dog" / "noise.png")
    png = (root / sub / "dog" / "noise.png").read_bytes()
    os.remove(root / sub / "dog" / "noise.png")
    (root / sub / "dog" / "truncated.png").write_bytes(png[:len(png) * 2 // 3])
  return root


def bad_names(ds):
  return sorted(os.path.basename(path) for path, _ in ds.skipped)


def all_examples(ds, split):
  batches = list(ds.eval_batches(split, batch_size=4))
  keep = lambda k: np.concatenate([b[k][b["mask"]] for b in batches])
  return keep("image"), keep("label")


def test_folder_reads_every_format_and_skips_bad_files(tmp_path, caplog):
  write_folder(tmp_path)
  config = make_config(dataset=f"folder:{tmp_path}", batch_size=4, val_fraction=0.25)
  ds = transfer.data.create(config, preprocess_source="unit")
  assert bad_names(ds) == ["corrupt.jpg", "empty.png", "notes.txt", "truncated.jpg",
                           "truncated.png"]
  for name in bad_names(ds):
    assert name in caplog.text
  assert ds.class_names == ["cat", "dog"]
  # A quarter of each class's files is held out before checking, so some held-out files are bad.
  assert ds.num_train + ds.num_val == len(GOOD) and 1 <= ds.num_val <= 4
  images, labels = map(np.concatenate, zip(all_examples(ds, "train"), all_examples(ds, "val")))
  pixels = (images.reshape(len(images), -1, 3) + 1.0) * 127.5
  colour = (pixels[..., 0].mean(1) - pixels[..., 2].mean(1)) / 255.0
  gray = np.abs(colour) < 0.05
  assert gray.sum() == 2  # gray.png and gray.jpg; every other file keeps its class colour.
  assert np.all(colour[(labels == 0) & ~gray] > 0.3), colour
  assert np.all(colour[(labels == 1) & ~gray] < -0.3), colour


def test_folder_strict_data_lists_bad_files(tmp_path):
  write_folder(tmp_path)
  with pytest.raises(UserError, match="5 unreadable.*corrupt.jpg"):
    transfer.data.create(make_config(dataset=f"folder:{tmp_path}", batch_size=4,
                                     strict_data=True), preprocess_source="unit")


def test_folder_train_val_layout(tmp_path):
  write_folder(tmp_path, layout={"train": None, "val": None})
  ds = transfer.data.create(make_config(dataset=f"folder:{tmp_path}", batch_size=4),
                            preprocess_source="unit")
  assert ds.num_train == ds.num_val == len(GOOD)
  assert len(ds.skipped) == 10


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty_class", "is empty"),
    ("one_class", "at least 2"),
    ("only_bad", "no readable training images for class.*'dog'"),
])
def test_folder_errors(tmp_path, case, message):
  img = Image.new("RGB", (20, 20), RED)
  os.makedirs(tmp_path / "cat")
  for i in range(4):
    img.save(tmp_path / "cat" / f"{i}.png")
  if case != "one_class":
    os.makedirs(tmp_path / "dog")
  if case == "only_bad":
    (tmp_path / "dog" / "x.jpg").write_bytes(b"junk")
  path = tmp_path / "nowhere" if case == "missing" else tmp_path
  with pytest.raises(UserError, match=message):
    transfer.data.create(make_config(dataset=f"folder:{path}", batch_size=4, val_fraction=0.0),
                         preprocess_source="unit")


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cache_gives_the_same_batches(tmp_path, cache):
  write_folder(tmp_path / "data")
  config = make_config(dataset=f"folder:{tmp_path / 'data'}", batch_size=4, augment="crop_flip",
                       eval_crop=0.8, cache_dir=str(tmp_path / "cache"))
  plain = transfer.data.create(config, preprocess_source="unit")
  config.cache_images = cache
  for _ in range(2):  # The second disk run reuses the files, bad-file list included.
    ds = transfer.data.create(config, preprocess_source="unit")
    assert bad_names(ds) == bad_names(plain)
    assert_batches_equal(take(plain.train_batches(), 4), take(ds.train_batches(), 4))
    assert_batches_equal(list(plain.eval_batches()), list(ds.eval_batches()))
  if cache == "disk":
    assert len(os.listdir(tmp_path / "cache")) == 4  # train and val: data + metadata each.


# Folder layouts, stable splits and the data's fingerprint.

def write_images(folder, names, colour=RED):
  """Tiny valid PNGs `folder/name` (names may contain `/`)."""
  for name in names:
    path = folder / name
    os.makedirs(path.parent, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format="PNG")
  return folder


def write_classes(folder, counts=None):
  """`folder/<class>/<i>.png` for {class: count} (default cat 10, dog 10)."""
  for cls, n in (counts or {"cat": 10, "dog": 10}).items():
    write_images(folder, [f"{cls}/{i}.png" for i in range(n)], RED if cls == "cat" else BLUE)
  return folder


def folder_data(path, **overrides):
  overrides = {"batch_size": 4, "augment": "none", **overrides}
  return transfer.data.create(make_config(dataset=f"folder:{path}", **overrides),
                              preprocess_source="unit")


def split_names(ds, split):
  return ds._splits[split].names()


def test_folder_split_and_fingerprint_do_not_depend_on_the_spelling(tmp_path, monkeypatch):
  write_classes(tmp_path / "data")
  os.symlink(tmp_path / "data", tmp_path / "link")
  monkeypatch.chdir(tmp_path)
  spellings = ["data", "./data", str(tmp_path / "data"), "data/", "link"]
  datasets = [folder_data(p) for p in spellings]
  monkeypatch.chdir(tmp_path / "data" / "cat")  # Another working directory, relative again.
  datasets.append(folder_data("../../data"))
  first = datasets[0].identity()
  assert first["dataset"] == f"folder:{os.path.realpath(tmp_path / 'data')}"
  assert (first["num_train"], first["num_val"]) == (16, 4)  # 20% of each class held out.
  for ds in datasets[1:]:
    assert ds.identity() == first
  # A copy elsewhere holds out the same files and keeps the fingerprint; only the root differs.
  shutil.copytree(tmp_path / "data", tmp_path / "copy")
  copy = folder_data(tmp_path / "copy")
  assert split_names(copy, "val") == split_names(datasets[0], "val")
  assert copy.identity()["fingerprint"] == first["fingerprint"]
  assert copy.root != datasets[0].root
  transfer.data.check_same_data(first, copy.identity(), "resume of w")


def test_folder_hold_out_is_a_function_of_relative_path_and_seed(tmp_path):
  write_classes(tmp_path, {"cat": 30, "dog": 30})
  val = lambda seed: split_names(folder_data(tmp_path, seed=seed), "val")
  assert val(0) == val(0) and len(val(0)) == 12
  assert all(name.split("/")[0] in ("cat", "dog") for name in val(0))  # Relative names.
  assert val(0) != val(1)  # The seed is mixed into the hold-out order.
  assert sum(name.startswith("cat/") for name in val(1)) == 6  # Still per class.


def test_fingerprint_changes_when_files_change(tmp_path):
  root = write_classes(tmp_path / "data")
  before = folder_data(root, val_fraction=0.0).identity()
  write_images(root, ["cat/new.png"])
  added = folder_data(root, val_fraction=0.0).identity()
  assert added["fingerprint"] != before["fingerprint"]
  with pytest.raises(UserError, match=r"^resume of /w: .*train: 20 -> 21 examples.*"
                                      r"point --config.dataset at .*folder:"):
    transfer.data.check_same_data(before, added, "resume of /w")
  os.remove(root / "cat" / "new.png")
  os.remove(root / "dog" / "3.png")
  removed = folder_data(root, val_fraction=0.0).identity()
  assert removed["fingerprint"] not in (before["fingerprint"], added["fingerprint"])
  os.rename(root / "dog" / "4.png", root / "dog" / "3.png")  # Back to 19, other names.
  write_images(root, ["dog/4b.png"])
  renamed = folder_data(root, val_fraction=0.0).identity()
  with pytest.raises(UserError, match="train: other files, same count"):
    transfer.data.check_same_data(before, renamed, "eval", hint="evaluate on the run's data")
  os.rename(root / "dog", root / "wolf")
  with pytest.raises(UserError, match=r"classes \['cat', 'dog'\] -> \['cat', 'wolf'\]"):
    transfer.data.check_same_data(before, folder_data(root, val_fraction=0.0).identity(), "eval")
  other = folder_data(write_classes(tmp_path / "other", {"cat": 10, "dog": 10, "fox": 2}),
                      val_fraction=0.0).identity()
  real = os.path.realpath(tmp_path)
  with pytest.raises(UserError, match=f"root {real}/data -> {real}/other with different "
                                      "files; classes .*train: 20 -> 22 examples"):
    transfer.data.check_same_data(before, other, "eval")
  for saved in (None, {}):  # Runs from before fingerprints: nothing to compare.
    transfer.data.check_same_data(saved, other, "eval")


def test_synthetic_identity_covers_its_parameters():
  ds = transfer.data.create(make_config(), preprocess_source="unit")
  ident = ds.identity()
  assert (ident["dataset"], ident["root"], ident["num_train"], ident["num_val"]) == \
      ("synthetic", "", 40, 13)
  assert json.loads(json.dumps(ident)) == ident
  other = transfer.data.create(make_config(seed=1), preprocess_source="unit").identity()
  with pytest.raises(UserError, match="parameters .*seed=0 -> .*seed=1"):
    transfer.data.check_same_data(ident, other, "eval")


@pytest.mark.parametrize("val_dir", ["val", "valid", "validation"])
def test_folder_train_and_named_validation_folder(tmp_path, val_dir):
  write_classes(tmp_path / "train")
  write_classes(tmp_path / val_dir, {"cat": 3, "dog": 2})
  write_classes(tmp_path / "test", {"cat": 4, "dog": 4})
  ds = folder_data(tmp_path)
  assert (ds.class_names, ds.num_train, ds.num_val) == (["cat", "dog"], 20, 5)
  assert split_names(ds, "val")[0] == f"{val_dir}/cat/0.png"
  assert any("test ignored" in note for note in ds.notes)


def test_folder_kaggle_train_and_test_holds_out_of_train(tmp_path):
  # Kaggle: labelled train/, unlabelled test/; this used to train a "test vs train" classifier.
  write_classes(tmp_path / "train")
  write_images(tmp_path, [f"test/{i}.jpg" for i in range(5)])
  ds = folder_data(tmp_path)
  assert (ds.class_names, ds.num_train, ds.num_val) == (["cat", "dog"], 16, 4)
  assert all(name.startswith("train/") for name in split_names(ds, "val"))
  assert f"{os.path.realpath(tmp_path)}/test ignored" in ds.describe()


def test_folder_test_beside_class_folders_is_not_a_class(tmp_path):
  flat = write_classes(tmp_path / "flat")
  write_classes(flat / "test", {"cat": 2, "dog": 3})
  ds = folder_data(flat)
  assert (ds.class_names, ds.num_train + ds.num_val) == (["cat", "dog"], 20)
  assert len(ds.notes) == 1 and "test ignored" in ds.notes[0]
  # Named explicitly, test/ is the validation split, beside class folders or beside train/.
  nested = write_classes(tmp_path / "nested" / "train").parent
  write_classes(nested / "test", {"cat": 2, "dog": 3})
  for root in (flat, nested):
    ds = folder_data(root, val_split="test")
    assert (ds.num_train, ds.num_val, ds.notes) == (20, 5, [])
    assert split_names(ds, "val")[-1] == "test/dog/2.png"


def test_folder_val_split_test_needs_the_folder(tmp_path):
  write_classes(tmp_path)
  with pytest.raises(UserError, match="val_split='test' but .*/test does not exist"):
    folder_data(tmp_path, val_split="test")


@pytest.mark.parametrize("under", ["", "train"])
def test_folder_labels_from_filename(tmp_path, under):
  names = [f"cat.{i}.jpg" for i in range(6)] + [f"dog.{i}.jpg" for i in range(4)]
  write_images(tmp_path / under if under else tmp_path, names + ["README.txt"])
  if under:
    write_images(tmp_path, [f"test1/{i}.jpg" for i in range(3)])
  with pytest.raises(UserError, match="no class folders; .*--config.labels_from=filename"):
    folder_data(tmp_path)
  ds = folder_data(tmp_path, labels_from="filename", val_fraction=0.25)
  assert (ds.class_names, ds.num_train, ds.num_val) == (["cat", "dog"], 7, 3)
  assert "2 classes: cat 4, dog 3" in ds.describe()
  assert any("README.txt" in note for note in ds.notes)
  if under:
    assert any("test1/" in note for note in ds.notes)


def test_labels_from_is_checked(tmp_path):
  write_classes(tmp_path)
  with pytest.raises(UserError, match="unknown labels_from 'name'.*'folders', 'filename'"):
    folder_data(tmp_path, labels_from="name")
  with pytest.raises(UserError, match="applies to folder:PATH datasets only"):
    transfer.data.create(make_config(labels_from="filename"), preprocess_source="unit")
  with pytest.raises(UserError, match="no files named LABEL.ID.EXT.*labels_from=folders"):
    folder_data(tmp_path, labels_from="filename")


def test_describe_lists_classes_with_counts_and_skipped_files(tmp_path):
  write_classes(tmp_path, {"cat": 5, "dog": 4})
  (tmp_path / "dog" / "bad.png").write_bytes(b"junk")
  line = folder_data(tmp_path, val_fraction=0.0).describe()
  assert "9 train / no val examples; 2 classes: cat 5, dog 4; 2 steps per epoch of 4" in line
  assert "1 unreadable file(s) skipped: dog/bad.png" in line
  many = transfer.data.create(make_config(**{"synthetic.num_classes": 23,
                                             "synthetic.train_size": 46}),
                              preprocess_source="unit").describe()
  assert "23 classes: class_0 2, class_1 2," in many
  assert "class_19 2, ... and 3 more" in many and "class_20" not in many


def test_dangling_symlink_is_skipped_and_named(tmp_path):
  write_classes(tmp_path)
  os.symlink(tmp_path / "gone.png", tmp_path / "cat" / "link.png")
  ds = folder_data(tmp_path, val_fraction=0.0)
  assert ds.num_train == 20
  real = os.path.realpath(tmp_path)  # Names are under the resolved root.
  assert ds.skipped == [(os.path.join(real, "cat", "link.png"),
                         f"FileNotFoundError: dangling symbolic link to {tmp_path / 'gone.png'}")]
  with pytest.raises(UserError, match="1 unreadable image.*link.png.*dangling"):
    folder_data(tmp_path, val_fraction=0.0, strict_data=True)


def test_empty_validation_split(tmp_path):
  write_classes(tmp_path / "data", {"cat": 4, "dog": 4})
  ds = folder_data(tmp_path / "data", val_fraction=0.0)
  assert (ds.num_train, ds.num_val) == (8, 0)
  assert list(ds.eval_batches("val")) == []
  assert ds.identity()["num_val"] == 0
  # Too few images for any to be held out, and a class is never held out entirely.
  write_classes(tmp_path / "small", {"cat": 1, "dog": 3})
  ds = folder_data(tmp_path / "small", val_fraction=0.1)
  assert (ds.num_train, ds.num_val) == (4, 0)
  found = folder_sources(str(tmp_path / "small"), 0.9)
  assert (len(found.train), len(found.val)) == (2, 2)
  assert found.train.labels.tolist() == [0, 1]
  synthetic = transfer.data.create(make_config(**{"synthetic.val_size": 0}),
                                   preprocess_source="unit")
  assert synthetic.num_val == 0 and list(synthetic.eval_batches()) == []
  with pytest.raises(UserError, match=r"val_fraction must be in \[0, 1\)"):
    folder_data(tmp_path / "data", val_fraction=1.0)


# Batch sizes, evaluation and processes.

@pytest.mark.parametrize("batch_size, process_count, message", [
    (6, 1, "4 local devices"), (8, 3, "3 processes"), (4, 2, "4 local devices")])
def test_batch_size_must_divide(batch_size, process_count, message):
  with pytest.raises(UserError, match=message):
    transfer.data.create(make_config(batch_size=batch_size), preprocess_source="unit",
                         process_index=0, process_count=process_count)


@pytest.mark.parametrize("batch_size, process_count", [(4, 1), (8, 1), (12, 1), (16, 1), (8, 2),
                                                       (24, 2)])
def test_eval_counts_every_example_once(batch_size, process_count):
  seen = []
  for p in range(process_count):
    ds = transfer.data.create(make_config(), preprocess_source="unit", process_index=p,
                              process_count=process_count)
    for batch in ds.eval_batches("val", batch_size=batch_size):
      assert batch["image"].shape[0] == batch_size // process_count
      seen += list(batch["id"][batch["mask"]])
      assert np.all(batch["id"][~batch["mask"]] == -1)
  assert sorted(seen) == list(range(13))


def test_two_processes_split_each_global_batch():
  config = make_config(augment="crop_flip")
  whole = take(transfer.data.create(config, preprocess_source="unit").train_batches(3), 4)
  parts = [take(transfer.data.create(config, preprocess_source="unit", process_index=p,
                                     process_count=2).train_batches(3), 4) for p in range(2)]
  for one, a, b in zip(whole, *parts):
    assert not set(a["id"]) & set(b["id"])
    for k in one:
      np.testing.assert_array_equal(one[k], np.concatenate([a[k], b[k]]))
  evals = [list(transfer.data.create(config, preprocess_source="unit", process_index=p,
                                     process_count=2).eval_batches()) for p in range(2)]
  for one, a, b in zip(transfer.data.create(config, preprocess_source="unit").eval_batches(),
                       *evals):
    for k in one:
      np.testing.assert_array_equal(one[k], np.concatenate([a[k], b[k]]))


def test_prefetch_to_device_shards_over_the_mesh():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  ds = transfer.data.create(make_config(), preprocess_source="unit")
  host = take(ds.train_batches(), 3)
  device = list(transfer.data.prefetch_to_device(iter(host), sharding, size=2))
  assert len(device) == 3
  for h, d in zip(host, device):
    assert d["image"].shape == (8, 16, 16, 3) and d["image"].sharding == sharding
    assert [s.data.shape[0] for s in d["image"].addressable_shards] == [2, 2, 2, 2]
    for k in h:
      np.testing.assert_array_equal(np.asarray(d[k]), h[k])
  eval_batch = next(transfer.data.prefetch_to_device(ds.eval_batches(), sharding))
  assert eval_batch["mask"].dtype == np.bool_ and eval_batch["mask"].sharding == sharding


def test_input_throughput_is_positive():
  ds = transfer.data.create(make_config(), preprocess_source="unit")
  assert transfer.data.input_throughput(ds, 3) > 0


def test_unknown_options_are_user_errors():
  for overrides in ({"dataset": "imagenet"}, {"augment": "mixup"}, {"cache_images": "gpu"},
                    {"eval_crop": 1.5}, {"synthetic.num_classes": 1}):
    with pytest.raises(UserError):
      transfer.data.create(make_config(**overrides), preprocess_source="unit")


# TFDS, offline through tfds.testing.mock_data.

def test_tfds_cats_vs_dogs_holds_out_part_of_train(mock_tfds, monkeypatch):
  calls = []
  tfds = pytest.importorskip("tensorflow_datasets", reason="tfds extra not installed")
  real = tfds.core.DatasetBuilder.as_dataset
  record = lambda self, split, **kw: calls.append(split) or real(self, split=split, **kw)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "as_dataset", record)
  config = make_config(dataset="tfds:cats_vs_dogs", data_dir=mock_tfds, augment="crop_flip")
  ds = transfer.data.create(config, preprocess_source="keras:vgg16")
  assert calls == ["train[:80%]", "train[80%:]"]
  assert ds.class_names == ["cat", "dog"]
  assert ds.num_train == ds.num_val == 10  # mock_data yields num_examples for any split.
  ident = ds.identity()
  assert (ident["dataset"], ident["root"], ident["num_val"]) == ("tfds:cats_vs_dogs", "", 10)
  batches = take(ds.train_batches(), 3)
  assert batches[0]["image"].shape == (8, 16, 16, 3) and batches[0]["image"].dtype == np.float32
  assert_batches_equal(batches[1:], take(transfer.data.create(
      config, preprocess_source="keras:vgg16").train_batches(1), 2))
  images, _ = all_examples(ds, "val")
  assert images.shape == (10, 16, 16, 3)


def test_tfds_uses_an_existing_validation_split(mock_tfds):
  config = make_config(dataset="tfds:beans", data_dir=mock_tfds, batch_size=4,
                       cache_images="memory")
  ds = transfer.data.create(config, preprocess_source="torchvision:vgg16")
  assert ds.class_names == ["angular_leaf_spot", "bean_rust", "healthy"]
  assert len(list(ds.eval_batches())) == 3


def test_tfds_errors(mock_tfds, monkeypatch):
  with pytest.raises(UserError, match="unknown TFDS dataset.*cats_vs_dogs"):
    transfer.data.create(make_config(dataset="tfds:cats_vs_dogz"), preprocess_source="unit")
  tfds = pytest.importorskip("tensorflow_datasets", reason="tfds extra not installed")

  def offline(self, *args, **kwargs):
    raise ConnectionError("no network")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
  with pytest.raises(UserError, match="could not download.*no network.*data_dir"):
    transfer.data.create(make_config(dataset="tfds:cats_vs_dogs", data_dir=mock_tfds),
                         preprocess_source="unit")


# TFDS set-up errors: missing packages, no network, a data_dir that does not hold the dataset.

def _no_download(self, *args, **kwargs):
  pytest.fail("download_and_prepare must not run")


def test_tfds_without_tensorflow_datasets_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import` now raises ImportError
  with pytest.raises(UserError) as e:
    transfer.data.create(make_config(dataset="tfds:beans"), preprocess_source="unit")
  message = str(e.value)
  assert message.startswith("tfds:beans needs TensorFlow and TensorFlow Datasets")
  assert "pip install -e '.[tfds]'" in message and "\n" not in message


def test_tfds_not_prepared_and_offline_fails_at_once(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets", reason="tfds extra not installed")
  from transfer.data import tfds_source
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", _no_download)
  monkeypatch.setattr(tfds_source, "network_reachable", lambda: False)
  empty = str(tmp_path / "empty")
  with pytest.raises(UserError) as e:
    transfer.data.create(make_config(dataset="tfds:beans", data_dir=empty),
                         preprocess_source="unit")
  message = str(e.value)
  assert message.startswith(f"tfds:beans is not prepared in {empty} and there is no network")
  assert "--config.data_dir=DIR" in message and "\n" not in message


def test_tfds_errors_name_the_data_dir_tfds_uses(tmp_path, monkeypatch):
  # data_dir="" means TFDS's default: $TFDS_DATA_DIR (read when TFDS is imported), not always ~.
  tfds = pytest.importorskip("tensorflow_datasets", reason="tfds extra not installed")
  from transfer.data import tfds_source
  monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path / "from_env"))
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", _no_download)
  monkeypatch.setattr(tfds_source, "network_reachable", lambda: False)
  with pytest.raises(UserError, match=f"not prepared in {tmp_path / 'from_env'} and"):
    transfer.data.create(make_config(dataset="tfds:beans", data_dir=""), preprocess_source="unit")


def test_tfds_prepared_dataset_does_not_probe_the_network(mock_tfds, monkeypatch):
  from transfer.data import tfds_source
  monkeypatch.setattr(tfds_source, "network_reachable", lambda: pytest.fail("probed"))
  ds = transfer.data.create(make_config(dataset="tfds:beans", data_dir=mock_tfds),
                            preprocess_source="unit")
  assert ds.num_train == 10


def test_tfds_module_missing_while_preparing_says_how_to_install(mock_tfds, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets", reason="tfds extra not installed")

  def missing(self, *args, **kwargs):
    raise ModuleNotFoundError("No module named 'importlib_resources'")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", missing)
  with pytest.raises(UserError) as e:
    transfer.data.create(make_config(dataset="tfds:beans", data_dir=mock_tfds),
                         preprocess_source="unit")
  assert str(e.value) == ("preparing tfds:beans needs a module that is not installed (No module "
                          "named 'importlib_resources'); install it with pip install -e '.[tfds]'")


def test_network_probe(monkeypatch):
  from transfer.data import tfds_source
  for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  import socket
  with socket.socket() as listening:
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    assert tfds_source.network_reachable("127.0.0.1", listening.getsockname()[1], 30.0)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]  # Nothing listens once the block ends.
  assert not tfds_source.network_reachable("127.0.0.1", closed, 30.0)
  monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # Downloads would go through it.
  assert tfds_source.network_reachable("127.0.0.1", closed, 30.0)
