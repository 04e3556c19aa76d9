"""Input at scale: TFDS ArrayRecord read by index without loading the split, the TFRecord limit,
decode workers (threads or processes) that never change the batches, and a disk cache that is
streamed through its memory map.

The TFDS dataset is `tests/tfds_noise.py`: 3000 + 200 random-noise PNGs of 160x160 (about 77 KB
each, 246 MB encoded), prepared once per module in both formats (about 10 s each).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import transfer.data
from transfer.errors import UserError
from helpers import (assert_batches_equal, assert_trees_equal, cli_train, final_params, finish,
                     kill_and_resume, make_config, noise_config, take, wait_for)

try:
  import tfds_noise  # needs tensorflow_datasets; the worker tests below do not
except ImportError:
  tfds_noise = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
  """{"array_record": data_dir, "tfrecord": data_dir, "encoded": bytes of both splits' shards}."""
  if tfds_noise is None:
    pytest.skip("tfds extra not installed")
  dirs = {fmt: str(tmp_path_factory.mktemp(fmt)) for fmt in ("array_record", "tfrecord")}
  sizes = {}
  for fmt, data_dir in dirs.items():
    version_dir = tfds_noise.prepare(data_dir, fmt)
    sizes[fmt] = sum(os.path.getsize(os.path.join(version_dir, f))
                     for f in os.listdir(version_dir) if f"{fmt}-" in f)
  return {**dirs, "encoded": sizes["array_record"]}


def test_array_record_batches_equal_the_in_memory_path(noise, tmp_path):
  kw = dict(preprocess_source="unit")
  # The in-memory path reads TFRecord through tf.data; as_dataset fails on ArrayRecord files.
  memory = transfer.data.create(noise_config(noise["tfrecord"], tmp_path), **kw)
  indexed = transfer.data.create(noise_config(noise["array_record"], tmp_path), **kw)
  assert indexed.identity() == memory.identity()
  assert (indexed.num_train, indexed.num_val) == (3000, 200)
  assert_batches_equal(take(memory.train_batches(), 3), take(indexed.train_batches(), 3))
  late = 2 * indexed.steps_per_epoch + 5  # a resume point in the third epoch
  assert_batches_equal(take(memory.train_batches(late), 2), take(indexed.train_batches(late), 2))
  assert_batches_equal(list(memory.eval_batches())[:3], list(indexed.eval_batches())[:3])
  # A second start reads the labels from the cache directory, not from the records.
  assert any(f.startswith("labels-") for f in os.listdir(tmp_path))
  again = transfer.data.create(noise_config(noise["array_record"], tmp_path), **kw)
  assert again.identity() == indexed.identity()


def test_array_record_processes_split_each_global_batch_and_read_only_their_rows(
    noise, tmp_path, monkeypatch):
  config = noise_config(noise["array_record"], tmp_path)
  decoded = []
  real = transfer.data.images.open_bytes
  monkeypatch.setattr(transfer.data.images, "open_bytes",
                      lambda data, side=0: decoded.append(1) or real(data, side))
  parts = []
  for p in range(2):
    ds = transfer.data.create(config, preprocess_source="unit", process_index=p,
                              process_count=2)
    parts.append(take(ds.train_batches(400), 3))
  monkeypatch.undo()
  # Three steps of four rows each per process: nothing else of the 3000 examples was decoded
  # (up to the batches assembled ahead in the background, `prefetch` = 2 per process).
  assert 2 * 3 * 4 <= len(decoded) <= 2 * (3 + 2) * 4
  whole = take(transfer.data.create(config, preprocess_source="unit").train_batches(400), 3)
  for one, a, b in zip(whole, *parts):
    assert not set(a["id"]) & set(b["id"])
    for k in one:
      np.testing.assert_array_equal(one[k], np.concatenate([a[k], b[k]]))


_MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")

    def rss_mib(key):
      for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
          return int(line.split()[1]) / 1024

    def main():
      import transfer.data
      from helpers import noise_config
      data_dir, cache_dir, kind = sys.argv[1:4]
      make = lambda split: transfer.data.create(
          noise_config(data_dir, cache_dir, train_split=split, data_worker_kind=kind,
                       data_workers=2), preprocess_source="unit")
      # Warm up on 60 examples: imports, readers, worker threads or processes, allocator arenas.
      small = make("train[:2%]")
      batches = small.train_batches()
      [next(batches) for _ in range(5)]
      batches.close()
      list(small.eval_batches())
      del small, batches
      base = rss_mib("VmRSS")
      ds = make("train")  # reads every label (the first time)
      batches = ds.train_batches()
      for _ in range(ds.steps_per_epoch):  # one epoch: every training example read and decoded
        next(batches)
      batches.close()
      list(ds.eval_batches())
      print("GROWTH_MIB", rss_mib("VmHWM") - base)

    if __name__ == "__main__":
      main()
    """)


def _growth_mib(data_dir, cache_dir, kind) -> float:
  """Peak resident memory over the warm baseline for one epoch and one eval pass, in MiB."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, data_dir, str(cache_dir), kind],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return float(result.stdout.split("GROWTH_MIB")[-1])


def test_array_record_memory_does_not_grow_with_the_dataset(noise, tmp_path):
  """Reading all 3200 examples grows the resident set by far less than their encoded size.

  The bound is a quarter of the encoded size (about 59 MiB of 236 MiB): measured growth was 33 MiB
  with threads and 27 MiB with processes (the label pass, allocator arenas, reader state). It cannot
  pass by accident: every example is read and decoded, and the same measurement of the in-memory
  path, which keeps the encoded split, must exceed the whole encoded size.
  """
  encoded_mib = noise["encoded"] / 2**20
  assert encoded_mib > 200
  for kind in ("thread", "process"):
    growth = _growth_mib(noise["array_record"], tmp_path / kind, kind)
    assert growth < encoded_mib / 4, f"{kind}: grew {growth:.0f} MiB, {encoded_mib:.0f} encoded"
  held = _growth_mib(noise["tfrecord"], tmp_path / "tfrecord", "thread")
  assert held > encoded_mib, f"in memory: grew {held:.0f} MiB, {encoded_mib:.0f} encoded"


def test_tfrecord_above_the_memory_limit_says_how_to_get_array_record(noise, tmp_path,
                                                                      monkeypatch):
  from transfer.data import tfds_source
  monkeypatch.setattr(tfds_source, "in_memory_limit", lambda: noise["encoded"] // 2)
  with pytest.raises(UserError) as e:
    transfer.data.create(noise_config(noise["tfrecord"], tmp_path), preprocess_source="unit")
  message = str(e.value)
  assert message.startswith(f"tfds:{tfds_noise.NAME} is prepared only as TFRecord")
  assert "tfds convert_format --dataset_version_dir=" in message and "\n" not in message
  assert "--out_file_format=array_record" in message and "--file_format=array_record" in message
  # The ArrayRecord copy of the same data is not limited: it is never held.
  transfer.data.create(noise_config(noise["array_record"], tmp_path), preprocess_source="unit")


# Decode workers: the count and kind change the speed, never the pixels.

def _write_jpegs(root, n_per_class=6):
  """Photo-like JPEGs of several sizes (gradients plus noise), quality 90, in two classes."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for c in ("cat", "dog"):
    os.makedirs(root / c)
    for i in range(n_per_class):
      h, w = rng.integers(40, 90, size=2)
      y, x = np.mgrid[0:h, 0:w]
      base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
      img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(root / c / f"{i}.jpg", quality=90)
  (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0junk")
  return root


@pytest.mark.parametrize("cache", ["", "disk"])
def test_worker_count_and_kind_do_not_change_batches(tmp_path, cache):
  root = _write_jpegs(tmp_path / "data")

  def batches(kind, count):
    config = make_config(dataset=f"folder:{root}", batch_size=4, augment="crop_flip",
                         data_worker_kind=kind, data_workers=count, cache_images=cache,
                         cache_dir=str(tmp_path / f"cache-{kind}-{count}"))
    ds = transfer.data.create(config, preprocess_source="unit")
    assert [os.path.basename(n) for n, _ in ds.skipped] == ["broken.jpg"]
    return take(ds.train_batches(), 4) + list(ds.eval_batches())

  reference = batches("thread", 1)
  for kind, count in (("thread", 2), ("process", 1), ("process", 2)):
    assert_batches_equal(reference, batches(kind, count))


@pytest.mark.parametrize("augment", ["inception_crop", "randaugment"])
def test_augmentation_in_worker_processes_equals_threads(tmp_path, augment):
  """With worker processes the augmentation runs there, next to the decoding: same pixels."""
  root = _write_jpegs(tmp_path / "data")

  def batches(kind, count):
    config = make_config(dataset=f"folder:{root}", batch_size=4, augment=augment,
                         data_worker_kind=kind, data_workers=count)
    ds = transfer.data.create(config, preprocess_source="unit")
    try:
      return take(ds.train_batches(3), 3)
    finally:
      ds.close()

  reference = batches("thread", 1)
  assert_batches_equal(reference, batches("process", 2))


def test_process_workers_on_array_record_and_synthetic(noise, tmp_path):
  for dataset, extra in ((f"tfds:{tfds_noise.NAME}", {"data_dir": noise["array_record"]}),
                         ("synthetic", {})):
    config = make_config(dataset=dataset, image_size=32, augment="crop_flip",
                         cache_dir=str(tmp_path), **extra)
    threads = transfer.data.create(config, preprocess_source="unit")
    config.data_worker_kind, config.data_workers = "process", 2
    processes = transfer.data.create(config, preprocess_source="unit")
    assert_batches_equal(take(threads.train_batches(5), 2), take(processes.train_batches(5), 2))


def test_unknown_worker_kind_is_a_user_error():
  with pytest.raises(UserError, match="unknown data_worker_kind 'gpu'"):
    transfer.data.create(make_config(data_worker_kind="gpu"), preprocess_source="unit")


def _children(pid: int) -> list[int]:
  """The pids of the processes whose parent is `pid` (from /proc)."""
  found = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
      continue
    if ppid == pid:
      found.append(int(entry))
  return found


def test_array_record_resume_after_sigkill_matches_an_uninterrupted_run(noise, tmp_path):
  """`transfer train` on the ArrayRecord dataset, killed after a checkpoint and rerun, ends with
  the parameters of an uninterrupted run, bit for bit. The killed run decodes in worker
  processes, the others in threads: the kind never changes the batches."""
  data = {"dataset": f"tfds:{tfds_noise.NAME}", "data_dir": noise["array_record"],
          "cache_dir": str(tmp_path / "cache"), "augment": "crop_flip", "num_steps": 30}
  reference = tmp_path / "reference"  # first and alone, as the runs share one cache_dir
  proc = cli_train(reference, **data)
  out = finish(proc, reference)
  assert proc.returncode == 0, out[-3000:]

  workdir, decoders = tmp_path / "run", []

  def find_decoders(proc):
    decoders.extend(_children(proc.pid))
    assert len(decoders) >= 2  # the two decode workers (and multiprocessing's resource tracker)

  def decoders_exit():
    # Orphaned workers would wait forever on their queue; they notice the parent is gone and exit.
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in decoders),
             f"the killed run's decode workers {decoders} to exit", timeout=120)

  kill_and_resume(workdir, 10, **data,
                  killed_extra=dict(data_worker_kind="process", data_workers=2),
                  before_kill=find_decoders, after_kill=decoders_exit)
  params, meta = final_params(workdir)
  assert meta["step"] == 30
  assert_trees_equal(params, final_params(reference)[0])


_CACHE_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")

    def rss_anon_mib():
      for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
          return int(line.split()[1]) / 1024

    def main():
      import transfer.data
      from helpers import make_config
      cache, cache_dir, workers = sys.argv[1:4]
      config = make_config(image_size=256, batch_size=4, augment="none", cache_images=cache,
                           cache_dir=cache_dir, data_workers=2, data_worker_kind=workers,
                           **{"synthetic.train_size": 960, "synthetic.val_size": 8})
      small = make_config(**{"synthetic.train_size": 16})  # warm up: imports, workers, arenas
      next(transfer.data.create(small, preprocess_source="unit").train_batches())
      base = rss_anon_mib()
      ds = transfer.data.create(config, preprocess_source="unit")
      batches = ds.train_batches()
      for _ in range(ds.steps_per_epoch):
        next(batches)
      print("GROWTH_MIB", rss_anon_mib() - base)

    if __name__ == "__main__":
      main()
    """)


def test_disk_cache_streams_through_its_memory_map(tmp_path):
  """Filling and reading a 180 MiB disk cache (960 images at 256x256) adds far less anonymous
  memory than its size: decoded images go straight into the memory-mapped file, whose pages the
  kernel can write back and drop, so a cache larger than RAM works. The bound is a quarter of the
  cache; the memory cache, held in anonymous memory, must exceed the whole size."""
  size_mib = 960 * 256 * 256 * 3 / 2**20

  def growth(cache, workers="thread"):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, cache, str(tmp_path / "c"),
                             workers], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return float(result.stdout.split("GROWTH_MIB")[-1])

  for workers in ("thread", "process"):
    assert growth("disk", workers) < size_mib / 4  # the first fills the cache, the second reads it
  assert growth("memory") > size_mib


def test_a_dead_worker_process_is_one_line():
  import worker_jobs
  from transfer.data import sources, workers
  decoder = workers.Decoder("process", 1)
  jpeg = os.path.join(ROOT, "tests", "does-not-exist.jpg")
  assert isinstance(next(decoder.try_images([(sources.open_path, (jpeg,))], 8)),
                    FileNotFoundError)  # an unreadable file is an answer, not a crash
  with pytest.raises(UserError, match="^a data worker process died .*data_workers=1"):
    decoder.images([(worker_jobs.die, ())], 8)
  decoder.close()
