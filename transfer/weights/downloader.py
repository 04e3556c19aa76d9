"""Fetching weight files into the cache, all or nothing.

A download streams into a temporary file beside its destination while hashing it, and is renamed
into place only when the byte count and the hash match. Any failure (no network, a server that
hangs up early, a wrong hash, Ctrl-C) removes the temporary file, so the cache never holds a file
that a later run would trust but should not. Plain urllib: no extra dependency.
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

CHUNK = 1 << 20
TIMEOUT_S = 30


def fetch(url: str, dest: str, *, hash_kind: str, expected: str, progress: bool = True) -> str:
  """Downloads `url` to `dest` if its hash matches; leaves nothing behind otherwise.

  Args:
    url: http(s) URL.
    dest: final path; its directory is created. An existing file is replaced.
    hash_kind: `"md5"` or `"sha256_prefix"` (the hex digest must start with `expected`).
    expected: the expected hex digest or prefix.
    progress: show a tqdm progress bar on stderr.

  Returns:
    `dest`.

  Raises:
    UserError: the server cannot be reached, the transfer stops early or the hash differs; the
      message names the URL and where the file can be placed by hand.
  """
  directory = os.path.dirname(os.path.abspath(dest))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dest)}.", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out:
      digest = _stream(url, out, _hasher(hash_kind), progress, dest)
    if not _matches(hash_kind, digest, expected):
      raise UserError(f"{url} gave a file with {_algorithm(hash_kind)} {digest}, expected "
                       f"{expected}{'...' if hash_kind == 'sha256_prefix' else ''}; nothing was "
                       f"saved. Retry, or place a verified copy at {dest}")
    os.replace(tmp, dest)
  except BaseException:
    # Also on KeyboardInterrupt: a partial file must never look like a finished one.
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return dest


def _stream(url: str, out, hasher, progress: bool, dest: str) -> str:
  """Copies the body of `url` into `out`, feeding `hasher`; returns the hex digest."""
  try:
    response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    raise UserError(f"cannot download {url} ({reason}); without network, download it elsewhere "
                     f"and place it at {dest}") from None
  with response:
    total = response.headers.get("Content-Length")
    total = int(total) if total and total.isdigit() else None
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
  if hash_kind not in ("md5", "sha256_prefix"):
    raise ValueError(f"unknown hash kind {hash_kind!r}")
  return "md5" if hash_kind == "md5" else "sha256"


def _hasher(hash_kind: str):
  return hashlib.new(_algorithm(hash_kind))


def _matches(hash_kind: str, digest: str, expected: str) -> bool:
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
  caller decides whether to download again or to say so.

  Returns:
    None, or e.g. `"fails its md5 check (got 9e10..., expected 6d6b...)"`.
  """
  digest = file_digest(path, hash_kind)
  if _matches(hash_kind, digest, expected):
    return None
  return (f"fails its {_algorithm(hash_kind)} check (got {digest}, expected "
          f"{expected}{'...' if hash_kind == 'sha256_prefix' else ''})")
