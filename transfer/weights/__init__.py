"""Pretrained weights: port Keras, torchvision and timm VGG and ResNet files into our models,
download, inspect, export.

    params = transfer.weights.load("keras:vgg16_notop", model)     # registry id, cached download
    variables = transfer.weights.load_variables("keras:resnet50_notop", resnet)  # + batch_stats
    params, report = transfer.weights.load("my.h5", model, return_report=True)
    x = transfer.weights.preprocess(images, "keras:vgg16_notop")   # the weights' own input scaling
    prep = transfer.weights.transform("torchvision:resnet50")      # + resize and crop, from uint8
    source = transfer.weights.sources.resolve("my_inception.h5")   # parsed once: arch, tf, 299

Modules: `sources` (the registry: ids, URLs, hashes, cache paths; `resolve`, a config's
`weights` parsed once into a `ParsedSource`; its records `record.WeightSource`, the Vision
Transformers' in `vit_sources`), `downloader` (verified, all-or-nothing fetch; the sha256 of a
file without a published hash recorded beside it), `formats` (reading .h5 / .weights.h5 / .pth /
.safetensors / .npz), `port` (names, layouts, strict merge),
`pretrained` (the public calls), `recognition` (what a file is, from its contents; `info`), `preprocess` (per-source input normalisation and eval geometry:
`transform`, `resolve_data_config`), `cli`.
"""

from transfer.weights.cli import cli
from transfer.weights.preprocess import (DataConfig, Transform, mode_for, preprocess,
                                         resolve_data_config, transform)
from transfer.weights.pretrained import (LoadReport, download, load, load_variables, resolve,
                                        variant_for)
from transfer.weights.recognition import info
from transfer.weights.sources import ParsedSource, WeightSource, ids


def registry() -> list[WeightSource]:
  """All registered weight files, sorted by id."""
  from transfer.weights import sources
  return [sources.get(i) for i in sources.ids()]


__all__ = ["DataConfig", "LoadReport", "ParsedSource", "Transform", "WeightSource", "cli",
           "download", "ids", "info", "load", "load_variables", "mode_for", "preprocess",
           "registry", "resolve", "resolve_data_config", "transform", "variant_for"]
