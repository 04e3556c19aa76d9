"""Downloads against a local HTTP server: success, wrong hash, cut transfer, no server.

After every failure the cache directory must hold no file at all (no partial, no temporary).
"""

import hashlib
import os
import socket
import urllib.request

import numpy as np
import pytest

from transfer import main as cli_main
from transfer import models
from transfer import weights
from transfer.errors import UserError
from transfer.weights import downloader, export, sources

BODY = os.urandom(300_000)


@pytest.fixture(scope="module")
def server(weight_server):
  weight_server.files.update({"/w/good.bin": (BODY, len(BODY)),
                              "/w/cut.bin": (BODY[:1000], len(BODY))})
  return weight_server


@pytest.fixture(autouse=True)
def _official_url_base(home, monkeypatch):
  """The `home` fixture, with downloads from the official URLs (which the tests redirect)."""
  monkeypatch.delenv("TRANSFER_WEIGHTS_URL_BASE", raising=False)


@pytest.fixture
def cache(tmp_path):
  return tmp_path / "cache"


def md5(data):
  return hashlib.md5(data).hexdigest()


def test_success(server, cache):
  dest = str(cache / "good.bin")
  assert downloader.fetch(server.url("/w/good.bin"), dest, hash_kind="md5",
                        expected=md5(BODY)) == dest
  assert open(dest, "rb").read() == BODY
  assert os.listdir(cache) == ["good.bin"]


def test_sha256_prefix(server, cache):
  prefix = hashlib.sha256(BODY).hexdigest()[:8]
  dest = downloader.fetch(server.url("/w/good.bin"), str(cache / f"w-{prefix}.pth"),
                        hash_kind="sha256_prefix", expected=prefix, progress=False)
  assert os.path.getsize(dest) == len(BODY)


@pytest.mark.parametrize("kind, expected", [("md5", "0" * 32), ("sha256_prefix", "deadbeef")])
def test_hash_mismatch_leaves_nothing(server, cache, kind, expected):
  dest = str(cache / "good.bin")
  with pytest.raises(UserError) as e:
    downloader.fetch(server.url("/w/good.bin"), dest, hash_kind=kind, expected=expected)
  message = str(e.value)
  assert "nothing was saved" in message and dest in message and "\n" not in message
  assert os.listdir(cache) == []


def test_interrupted_transfer_leaves_nothing(server, cache):
  dest = str(cache / "cut.bin")
  with pytest.raises(UserError, match=f"interrupted: got 1000 of {len(BODY)} bytes"):
    downloader.fetch(server.url("/w/cut.bin"), dest, hash_kind="md5", expected=md5(BODY))
  assert os.listdir(cache) == []


def test_no_server_names_url_and_manual_path(cache):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # Closed once the block ends: nothing listens there.
  dest = str(cache / "x.h5")
  link = f"http://127.0.0.1:{port}/w/x.h5"
  with pytest.raises(UserError) as e:
    downloader.fetch(link, dest, hash_kind="md5", expected="0" * 32)
  message = str(e.value)
  assert link in message and f"place it at {dest}" in message and "\n" not in message
  assert os.listdir(cache) == []


def test_not_found(server, cache):
  with pytest.raises(UserError, match="Not Found"):
    downloader.fetch(server.url("/w/missing.bin"), str(cache / "m.bin"), hash_kind="md5",
                   expected="0" * 32)
  assert os.listdir(cache) == []


def test_ctrl_c_leaves_nothing(server, cache, monkeypatch):
  real = urllib.request.urlopen

  class Interrupting:
    def __init__(self, response):
      self.response, self.headers, self.calls = response, response.headers, 0

    def read(self, n):
      self.calls += 1
      if self.calls > 1:
        raise KeyboardInterrupt
      return self.response.read(1000)

    def __enter__(self):
      return self

    def __exit__(self, *a):
      self.response.close()

  monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Interrupting(real(*a, **k)))
  with pytest.raises(KeyboardInterrupt):
    downloader.fetch(server.url("/w/good.bin"), str(cache / "good.bin"), hash_kind="md5",
                   expected=md5(BODY))
  assert os.listdir(cache) == []


@pytest.fixture
def tiny_entry(server, tmp_path, monkeypatch):
  """A registry entry for a generated vgg16_tiny file served by the local server."""
  model = models.get("vgg16_tiny", include_top=True)
  from transfer.weights import port
  rng = np.random.default_rng(0)
  params = {k: {n: rng.standard_normal(s.shape, dtype=np.float32) for n, s in v.items()}
            for k, v in port.param_shapes(model, 224).items()}
  local = tmp_path / "served.h5"
  export.write_keras_h5(local, export.keras_layers(params, models.spec("vgg16_tiny")))
  data = local.read_bytes()
  server.files["/mirror/vgg16_tiny_weights.h5"] = (data, len(data))
  entry = sources.WeightSource(
      id="keras:vgg16_tiny", arch="vgg16_tiny", url="https://example.invalid/k/vgg16_tiny_weights.h5",
      hash_kind="md5", hash=md5(data), format="keras_h5", include_top=True, preprocess="caffe")
  monkeypatch.setitem(sources._SOURCES, entry.id, entry)
  monkeypatch.setenv("TRANSFER_WEIGHTS_URL_BASE", server.url("/mirror"))
  return entry, params


def test_load_by_id_downloads_once_then_uses_the_cache(server, tiny_entry):
  entry, params = tiny_entry
  before = len(server.requests)
  model = models.get("vgg16_tiny", include_top=True)
  loaded, report = weights.load(entry.id, model, return_report=True)
  assert report.path == sources.cached_path(entry) and len(report.loaded) == 16
  np.testing.assert_array_equal(loaded["fc2"]["kernel"], params["fc2"]["kernel"])
  weights.load(entry.id, model)
  assert len(server.requests) == before + 1


def test_cli_download_fills_the_cache(server, tiny_entry, capsys):
  entry, _ = tiny_entry
  assert cli_main.run(["weights", "download", entry.id]) == 0
  path = capsys.readouterr().out.strip()
  assert path == sources.cached_path(entry) and os.path.isfile(path)
  assert os.listdir(os.path.dirname(path)) == [entry.filename]


# A file already in the cache is checked, not trusted.

def place(entry, data):
  path = sources.cached_path(entry)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return path


def test_download_replaces_a_cached_file_that_fails_its_hash(server, tiny_entry, capsys):
  entry, _ = tiny_entry
  served = server.files["/mirror/vgg16_tiny_weights.h5"][0]
  path = place(entry, served[:len(served) // 2])
  before = len(server.requests)
  assert cli_main.run(["weights", "download", entry.id]) == 0
  assert open(path, "rb").read() == served and len(server.requests) == before + 1
  captured = capsys.readouterr()
  assert captured.out.strip() == path
  said = [line for line in captured.err.splitlines() if "fails its" in line]
  assert len(said) == 1 and said[0].startswith(f"transfer: cached file {path} fails its md5 check")
  assert said[0].endswith("downloading it again") and f"expected {entry.hash}" in said[0]
  assert os.listdir(os.path.dirname(path)) == [entry.filename]


def test_download_keeps_a_good_file_placed_by_hand(server, tiny_entry, capsys):
  entry, _ = tiny_entry
  path = place(entry, server.files["/mirror/vgg16_tiny_weights.h5"][0])
  mtime = os.stat(path).st_mtime_ns
  before = len(server.requests)
  assert cli_main.run(["weights", "download", entry.id]) == 0
  assert len(server.requests) == before and os.stat(path).st_mtime_ns == mtime
  assert "fails" not in capsys.readouterr().err


def test_info_says_when_the_cached_file_fails_its_hash(server, tiny_entry, capsys):
  entry, _ = tiny_entry
  path = place(entry, b"not the weights")
  before = len(server.requests)
  with pytest.raises(SystemExit) as e:
    cli_main.main(["weights", "info", entry.id])
  assert e.value.code == 2 and len(server.requests) == before
  err = capsys.readouterr().err
  assert err == (f"transfer: error: cached file {path} fails its md5 check (got "
                 f"{md5(b'not the weights')}, expected {entry.hash}); run transfer weights "
                 f"download {entry.id}\n")


def test_load_blames_an_unreadable_cached_file_on_its_hash(server, tiny_entry):
  entry, _ = tiny_entry
  served = server.files["/mirror/vgg16_tiny_weights.h5"][0]
  path = place(entry, served[:len(served) // 3])
  with pytest.raises(UserError) as e:
    weights.load(entry.id, models.get("vgg16_tiny", include_top=True))
  message = str(e.value)
  assert message.startswith(f"cached file {path} fails its md5 check") and "\n" not in message
  assert message.endswith(f"run transfer weights download {entry.id}")


def test_hash_mismatch_names_both_digests(tmp_path):
  path = tmp_path / "w.pth"
  path.write_bytes(BODY)
  sha = hashlib.sha256(BODY).hexdigest()
  assert downloader.hash_mismatch(str(path), hash_kind="sha256_prefix", expected=sha[:8]) is None
  assert downloader.hash_mismatch(str(path), hash_kind="md5", expected=md5(BODY)) is None
  assert downloader.hash_mismatch(str(path), hash_kind="sha256_prefix", expected="deadbeef") == (
      f"fails its sha256 check (got {sha}, expected deadbeef...)")
