"""Writes transfer/imagenet_classes.txt: the 1000 ImageNet-1k classes in model output order.

Usage:
    python scripts/make_imagenet_classes.py SYNSET_TO_LEMMA.txt [OUT]

The class order (sorted WordNet ids, the order every ImageNet-1k classifier uses) comes from the
installed tensorflow-datasets (`datasets/imagenet2012/labels.txt`). tfds ships only the ids, so the
readable names come from a "wnid<TAB>lemma, lemma, ..." table given on the command line (for
example `timm/data/_info/imagenet_synset_to_lemma.txt` from the timm wheel). The label is the first
lemma, as Keras' `decode_predictions` shows it. Output: one "wnid<TAB>label" line per class.
"""

from __future__ import annotations

import os
import sys


def tfds_wnids() -> list[str]:
  """The 1000 WordNet ids in class-index order, from the installed tensorflow-datasets."""
  import tensorflow_datasets  # Only to find its package directory; nothing is built or downloaded.
  root = os.path.dirname(tensorflow_datasets.__file__)
  with open(os.path.join(root, "datasets", "imagenet2012", "labels.txt")) as f:
    wnids = [line.strip() for line in f if line.strip()]
  if len(wnids) != 1000:
    raise SystemExit(f"expected 1000 ImageNet ids in tfds, found {len(wnids)}")
  return wnids


def read_lemmas(path: str) -> dict[str, str]:
  """wnid -> first lemma from a tab-separated synset table."""
  lemmas = {}
  with open(path) as f:
    for line in f:
      wnid, _, names = line.rstrip("\n").partition("\t")
      if names:
        lemmas[wnid] = names.split(",")[0].strip()
  return lemmas


def main(argv: list[str]) -> None:
  if not argv:
    raise SystemExit(__doc__)
  out = argv[1] if len(argv) > 1 else os.path.join(
      os.path.dirname(__file__), "..", "transfer", "imagenet_classes.txt")
  lemmas = read_lemmas(argv[0])
  wnids = tfds_wnids()
  missing = [w for w in wnids if w not in lemmas]
  if missing:
    raise SystemExit(f"no name for {len(missing)} ids, e.g. {missing[:3]}")
  with open(out, "w") as f:
    f.writelines(f"{w}\t{lemmas[w]}\n" for w in wnids)
  print(f"wrote {len(wnids)} classes to {out}")


if __name__ == "__main__":
  main(sys.argv[1:])
