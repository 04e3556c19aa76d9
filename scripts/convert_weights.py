"""Converts a VGG or ResNet weight file between layouts, checking it against the model on the way.

Usage:
    python scripts/convert_weights.py SRC OUT [--model vgg16]

SRC is any file or registry id `transfer.weights.load` reads. OUT's extension picks the layout:
`.safetensors` writes torchvision keys (so torchvision weights load without torch installed), `.h5`
writes the legacy Keras layout. The model is detected from SRC unless given; the ImageNet top is
kept when SRC has one. Conversion goes through a strict load, so a file that does not fit fails
with the usual error instead of producing a half-converted copy.

The preprocessing belongs to the original weights, not to the layout, while `mode_for` guesses it
from the extension: Keras weights written as .safetensors still expect "caffe" input, torchvision
weights written as .h5 still expect "torch" input. Pass the mode explicitly for converted files.
A ResNet stays in its framework's layout: a Keras (v1) ResNet written with torchvision keys would
be read as the torchvision (v1.5) variant, a different network, so that is refused.
"""

from __future__ import annotations

import argparse
import os
import sys

from transfer import models
from transfer import weights
from transfer.weights import export, port


def convert(src: str, out: str, model: str | None = None) -> str:
  """Writes `src` to `out` in the layout its extension names; returns the detected model."""
  meta = weights.info(src)
  arch = model or meta["arch"]
  if arch is None:
    raise SystemExit(f"cannot tell which model {src} is for; pass --model")
  spec = models.spec(arch)
  has_top = any(l["model_name"] in spec.top_layers for l in meta["layers"])
  net = models.get(arch, include_top=has_top, variant=weights.variant_for(src, arch))
  variables = weights.load_variables(src, net, image_size=spec.top_image_size if has_top
                                     else spec.min_image_size)
  params = variables["params"]
  layout = {".safetensors": "safetensors", ".h5": "keras_h5"}.get(os.path.splitext(out)[1])
  if layout and spec.variants and port.file_variant(layout, spec) != net.variant:
    # The file would be read as the other variant, which computes something else.
    raise SystemExit(f"{src} holds the {net.variant} variant of {arch}; a {layout} file would "
                     f"be read as the {port.file_variant(layout, spec)} variant")
  if out.endswith(".safetensors"):
    state = export.torch_state_dict(params, spec, variables.get("batch_stats"))
    export.write_safetensors(out, state)
  elif out.endswith(".h5"):
    export.write_keras_h5(out, export.keras_layers(params, spec, variables.get("batch_stats")))
  else:
    raise SystemExit(f"unknown output layout for {out}: use .safetensors or .h5")
  return arch


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("src")
  parser.add_argument("out")
  parser.add_argument("--model", help="registry model name (default: detected from SRC)")
  args = parser.parse_args(argv)
  arch = convert(args.src, args.out, args.model)
  print(f"wrote {arch} weights to {args.out}")


if __name__ == "__main__":
  main(sys.argv[1:])
