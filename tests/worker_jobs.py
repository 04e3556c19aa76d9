"""Decode jobs for tests of `transfer.data.workers` that a spawned worker imports (nothing heavy)."""

import os


def die(min_side):
  """A job whose worker process dies at once, as one killed for memory would."""
  del min_side
  os._exit(3)
