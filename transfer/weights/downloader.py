"""Fetching weight files into the cache, all or nothing.

A download streams into a temporary file beside its destination while hashing it, and is renamed
into place only when the byte count and the hash match. Any failure (no network, a server that
hangs up early, a wrong hash, Ctrl-C) removes the temporary file, so the cache never holds a file
that a later run would trust but should not. Plain urllib: no extra dependency.

Files whose publisher gives no hash (hash kind `"none"`: the Hugging Face Hub, DINOv2's and
Google's AugReg files) must arrive with the size the server announces, and their sha256 is then
recorded beside them, `<file>.sha256` (`sha256sum`'s format), so `hash_mismatch` can tell when the
cached file later changes.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request

from transfer.errors import UserError
from transfer.weights.record import HASH_KINDS, NO_HASH

CHUNK = 1 << 20
TIMEOUT_S = 30


def fetch(url: str, dest: str, *, hash_kind: str, expected: str, progress: bool = True) -> str:
  """Downloads `url` to `dest` if its hash matches; leaves nothing behind otherwise.

  Args:
    url: http(s) URL.
    dest: final path; its directory is created. An existing file is replaced.
    hash_kind: `"md5"`, `"sha256_prefix"` (the hex digest must start with `expected`) or
      `"none"` (no published hash: the server must announce the size, and the sha256 is recorded
      in `record_path(dest)`).
    expected: the expected hex digest or prefix (ignored for `"none"`).
    progress: show a tqdm progress bar on stderr.

  Returns:
    `dest`.

  Raises:
    UserError: the server cannot be reached, the transfer stops early, the hash differs, or a
      file without a published hash comes without a size; the message names the URL and where
      the file can be placed by hand.
  """
  directory = os.path.dirname(os.path.abspath(dest))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dest)}.", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out:
      digest = _stream(url, out, _hasher(hash_kind), progress, dest,
                       need_size=hash_kind == NO_HASH)
    if not _matches(hash_kind, digest, expected):
      raise UserError(f"{url} gave a file with {_algorithm(hash_kind)} {digest}, expected "
                       f"{expected}{'...' if hash_kind == 'sha256_prefix' else ''}; nothing was "
                       f"saved. Retry, or place a verified copy at {dest}")
    if hash_kind == NO_HASH:
      _remove(record_path(dest))  # A stale record must never vouch for the new file.
    os.replace(tmp, dest)
    if hash_kind == NO_HASH:
      write_record(dest, digest)
  except BaseException:
    # Also on KeyboardInterrupt: a partial file must never look like a finished one.
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return dest


def _stream(url: str, out, hasher, progress: bool, dest: str, need_size: bool = False) -> str:
  """Copies the body of `url` into `out`, feeding `hasher`; returns the hex digest.

  With `need_size` (no published hash), the announced Content-Length is the only check of the
  transfer, so a response without one is refused.
  """
  try:
    response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    raise UserError(f"cannot download {url} ({reason}); without network, download it elsewhere "
                     f"and place it at {dest}") from None
  with response:
    total = response.headers.get("Content-Length")
    total = int(total) if total and total.isdigit() else None
    if need_size and total is None:
      raise UserError(f"{url} sent no Content-Length, and no hash is published for it: the "
                       f"download cannot be checked; nothing was saved. Retry, or place the file "
                       f"at {dest}")
    received = 0
    with _progress_bar(total, os.path.basename(dest), progress) as bar:
      try:
        while chunk := response.read(CHUNK):
          out.write(chunk)
          hasher.update(chunk)
          received += len(chunk)
          bar.update(len(chunk))
      except (OSError, http.client.HTTPException) as e:
        raise UserError(f"download of {url} failed after {received} bytes ({e!r}); nothing was "
                         f"saved. Retry, or place the file at {dest}") from None
  # http.client returns a short body without complaint when the server closes early.
  if total is not None and received != total:
    raise UserError(f"download of {url} was interrupted: got {received} of {total} bytes; "
                     f"nothing was saved. Retry, or place the file at {dest}")
  return hasher.hexdigest()


def _progress_bar(total: int | None, name: str, enabled: bool):
  from tqdm import tqdm  # Deferred: only downloads need it.
  return tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, disable=not enabled, leave=False)


def _algorithm(hash_kind: str) -> str:
  """The digest a hash kind checks (a file without a published hash: its recorded sha256)."""
  if hash_kind not in HASH_KINDS:
    raise ValueError(f"unknown hash kind {hash_kind!r}")
  return "md5" if hash_kind == "md5" else "sha256"


def _hasher(hash_kind: str):
  return hashlib.new(_algorithm(hash_kind))


def _matches(hash_kind: str, digest: str, expected: str) -> bool:
  if hash_kind == NO_HASH:
    return True  # Nothing published to compare a download with; the record is made from it.
  if hash_kind == "md5":
    return digest == expected.lower()
  return digest.startswith(expected.lower())


def file_digest(path: str, hash_kind: str) -> str:
  """The hex digest of a file on disk, for checking a file placed by hand."""
  hasher = _hasher(hash_kind)
  with open(path, "rb") as f:
    while chunk := f.read(CHUNK):
      hasher.update(chunk)
  return hasher.hexdigest()


def hash_mismatch(path: str, *, hash_kind: str, expected: str) -> str | None:
  """Why the file at `path` is not the expected one, or None when its hash matches.

  A cached file can be cut short by a full disk or copied in by hand from a bad source; the
  caller decides whether to download again or to say so. Without a published hash (`"none"`)
  the file is compared with the sha256 recorded when it was downloaded; a file with no record
  (placed by hand) has its sha256 recorded now, with one line on stderr saying so.

  Returns:
    None, or e.g. `"fails its md5 check (got 9e10..., expected 6d6b...)"`.
  """
  if hash_kind == NO_HASH:
    return _record_mismatch(path)
  digest = file_digest(path, hash_kind)
  if _matches(hash_kind, digest, expected):
    return None
  return (f"fails its {_algorithm(hash_kind)} check (got {digest}, expected "
          f"{expected}{'...' if hash_kind == 'sha256_prefix' else ''})")


# ------------------------------------------------------- files without a published hash

def record_path(path: str) -> str:
  """Where the sha256 of a downloaded file without a published hash is recorded."""
  return f"{path}.sha256"


def write_record(path: str, digest: str) -> str:
  """Records `digest` as the sha256 of `path`, atomically, in `sha256sum -c`'s format."""
  record = record_path(path)
  tmp = f"{record}.part"
  with open(tmp, "w") as f:
    f.write(f"{digest}  {os.path.basename(path)}\n")
  os.replace(tmp, record)
  return record


def _record_mismatch(path: str) -> str | None:
  """`hash_mismatch` for a file without a published hash: against its record."""
  record = record_path(path)
  digest = file_digest(path, NO_HASH)
  if not os.path.isfile(record):
    write_record(path, digest)
    print(f"transfer: {path} has no published hash; recorded its sha256 {digest} in {record}",
          file=sys.stderr)
    return None
  with open(record) as f:
    recorded = (f.read().split() or [""])[0].lower()
  if digest == recorded:
    return None
  return (f"differs from the sha256 recorded when it was downloaded (got {digest}, recorded "
          f"{recorded or 'nothing'} in {record}; no hash is published for it)")


def _remove(path: str) -> None:
  if os.path.exists(path):
    os.remove(path)
