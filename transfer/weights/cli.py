"""`transfer weights info | download | list`: printing around the library calls."""

from __future__ import annotations

import os

from transfer.weights import pretrained, recognition, sources


def cli(action: str, args) -> None:
  """Runs one `transfer weights` action.

  Args:
    action: `"info"`, `"download"` or `"list"`.
    args: the parsed namespace (`args.source` for info, `args.id` for download).
  """
  if action == "info":
    print(format_info(recognition.info(args.source)))
  elif action == "download":
    path = pretrained.download(args.id)
    print(path)
  elif action == "list":
    print(format_list())
  else:
    raise ValueError(f"unknown weights action {action!r}")


def format_info(meta: dict) -> str:
  """Human-readable `info` output: header, then one line per stored array."""
  arch = meta["arch"] or "unknown"
  if meta.get("variant"):
    arch += f" (variant={meta['variant']})"
  lines = [f"{meta['path']}", f"format: {meta['format']}  arch: {arch}  "
           f"preprocess: {meta['preprocess']}  params: {meta['num_params']:,}  "
           f"layers: {len(meta['layers'])}"]
  for layer in meta["layers"]:
    alias = f" ({layer['model_name']})" if layer["model_name"] != layer["name"] else ""
    for w in layer["weights"]:
      shape = "x".join(map(str, w["shape"])) or "scalar"
      lines.append(f"  {layer['name'] + alias:<30} {w['name']:<32} {shape}")
  return "\n".join(lines)


def format_list() -> str:
  """Registry ids with what they hold, their URL and whether they are cached (and, for timm's
  ResNets, the Hugging Face Hub file timm itself loads, which no published hash verifies).

  A file whose publisher gives no hash says so: it is checked by its size, and its sha256,
  recorded at download, is what later uses are checked against.
  """
  lines = []
  for source_id in sources.ids():
    entry = sources.get(source_id)
    path = sources.cached_path(entry)
    state = f"cached at {path}" if os.path.isfile(path) else "not cached"
    top = "with top" if entry.include_top else "no top"
    hub = f"  (publisher's hub copy, unverified: {entry.hub_url})" if entry.hub_url else ""
    unverified = ("  (no published hash: size checked, sha256 recorded at download)"
                  if not entry.published_hash else "")
    lines.append(f"{source_id:<24} {entry.arch:<9} {top:<8} preprocess={entry.preprocess:<6} "
                 f"{sources.url_for(entry)}  [{state}]{unverified}{hub}")
  return "\n".join(lines)
