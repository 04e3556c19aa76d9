"""The library's console lines, and a root logger left as the caller configured it.

Progress lines (the data, the model, each stage) are printed on stderr through `tqdm.write`, so
that while a progress bar is open they appear above it instead of inside it; warnings go through
the `transfer` logger. The library never configures logging: absl's logging functions (which
Orbax calls, also at import) run `logging.basicConfig()` on a root logger without handlers,
after which a program's own `basicConfig(level=...)` silently does nothing. `root_unchanged`
undoes that around the library's work.
"""

from __future__ import annotations

import contextlib
import logging
import sys


def console(message: str) -> None:
  """Prints one line on stderr, above any open progress bar."""
  from tqdm import tqdm
  tqdm.write(message, file=sys.stderr)
  sys.stderr.flush()


@contextlib.contextmanager
def root_unchanged():
  """Removes, on leaving, the root-logger handlers added inside (absl's `basicConfig`)."""
  before = list(logging.root.handlers)
  try:
    yield
  finally:
    for handler in list(logging.root.handlers):
      if handler not in before:
        logging.root.removeHandler(handler)
