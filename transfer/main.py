"""The `transfer` command line: parse, then call one library function per subcommand.

    transfer train   [--workdir DIR] [--config FILE|NAME] [--config.KEY=VALUE ...]
    transfer eval    --workdir DIR [--checkpoint best|latest|STEP] [--json] [--tta]
                     [--top_losses K]
    transfer predict (--workdir DIR [--checkpoint ...] | --model vgg16 --weights SRC) [--top K]
                     [--batch_size N] [--json] IMAGE|FOLDER...
    transfer export  --workdir DIR --format stablehlo|onnx|saved_model [--out PATH]
                     [--dtype float32|bfloat16] [--checkpoint best|latest|STEP]
    transfer weights info SRC | download ID | list
    transfer bench   [--mode train|forward|eval|input] [--json] [--config.KEY=VALUE ...]
    transfer lr_find [--workdir DIR] [--config FILE|NAME] [--steps N] [--config.KEY=VALUE ...]

Exit statuses: 0 done; 2 an error the user can fix (bad flag, unknown name, wrong file: one
line); 1 from `predict` when some images could not be read (the others are still classified);
128 + the signal number (143 SIGTERM, 130 Ctrl-C) when a signal stopped `train` after it saved a
checkpoint; 141 when the reader closed the output early (`transfer weights list | head`), as a
command killed by SIGPIPE does, so `set -o pipefail` scripts see it like any other tool's.
"""

from __future__ import annotations

import argparse
import os
import sys

from transfer.errors import UserError


class _Parser(argparse.ArgumentParser):
  """An argument parser whose epilog may be a function, called only when the help is printed
  (the config keys' table loads the default config, which the other answers need not)."""

  def format_help(self) -> str:
    if callable(self.epilog):
      self.epilog = self.epilog()
    return super().format_help()


def _config_keys_help() -> str:
  from transfer import configs
  return ("config keys (--config.KEY=VALUE; defaults from transfer/configs/default.py, the "
          "--config file changes some):\n  " + "\n  ".join(configs.describe_keys()))


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="transfer",
      description="Fine-tune ImageNet networks (VGG16/19, ResNet50/101/152, InceptionV3) in "
                  "JAX/Flax. Config keys are overridden with --config.KEY=VALUE "
                  "(`transfer train --help` lists them).")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                              parser_class=_Parser)

  train = sub.add_parser("train", help="train (or resume) a run in a workdir",
                         epilog=_config_keys_help,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  train.add_argument("--workdir", help="run directory; resumes if it holds checkpoints "
                                       "(default: a new ./workdirs/<config>-<time>)")
  train.add_argument("--config", help="config name (quickstart, cats_vs_dogs, ...), .py file, or "
                                      "a run's config.json or workdir to reproduce it "
                                      "(default: quickstart)")
  _add_distributed_flags(train)

  ev = sub.add_parser("eval", help="evaluate a trained run on its validation split")
  ev.add_argument("--workdir", required=True)
  ev.add_argument("--checkpoint", default="latest",
                  help="latest (the newest that restores), best (highest val_accuracy) or a step")
  ev.add_argument("--json", action="store_true", help="print metrics as one JSON object")
  ev.add_argument("--tta", action="store_true",
                  help="test-time augmentation: average the image's and its mirror's probabilities")
  ev.add_argument("--top_losses", type=int, default=0, metavar="K",
                  help="draw the K most confidently wrong validation images into "
                       "WORKDIR/top_losses.png")

  pred = sub.add_parser("predict", help="classify images with ImageNet weights or a trained run")
  pred.add_argument("images", nargs="+", metavar="IMAGE",
                    help="image files, or folders (walked recursively)")
  pred.add_argument("--workdir", help="a trained run (its classes and weights)")
  pred.add_argument("--checkpoint", default=None,
                    help="with --workdir: latest (default), best (highest val_accuracy) or a step")
  pred.add_argument("--model", default="vgg16", help="ImageNet model (without --workdir)")
  pred.add_argument("--weights", default="keras:vgg16",
                    help="registry id or file with the ImageNet top (without --workdir)")
  pred.add_argument("--top", type=int, default=5, help="classes to print per image")
  pred.add_argument("--json", action="store_true", help="one JSON object per image per line")
  pred.add_argument("--batch_size", type=int, default=8, help="images per forward pass")

  exp = sub.add_parser("export", help="write a trained run as StableHLO, ONNX or a SavedModel")
  exp.add_argument("--workdir", required=True)
  from transfer.export import WRITERS  # the format registry; imports no converter
  exp.add_argument("--format", required=True, choices=tuple(WRITERS),
                   help="the artifact's format")
  exp.add_argument("--out", help="file (directory for saved_model) to write "
                                 "(default: DIR/export/model.<format>)")
  exp.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
  exp.add_argument("--checkpoint", default="latest",
                   help="latest (the newest that restores), best (highest val_accuracy) or a step")

  weights = sub.add_parser("weights", help="inspect and download pretrained weights")
  wsub = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
  info = wsub.add_parser("info", help="layers, shapes and format of a weight file or id")
  info.add_argument("source")
  dl = wsub.add_parser("download", help="download a registry id into the cache")
  dl.add_argument("id")
  wsub.add_parser("list", help="registry ids with their URLs and cache state")

  bench = sub.add_parser("bench", help="time the train step, forward pass or input pipeline")
  bench.add_argument("--mode", default="train", choices=("train", "forward", "eval", "input"))
  bench.add_argument("--config", help="config name or file (default: the bench config)")
  bench.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
  bench.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  bench.add_argument("--json", action="store_true", help="print one JSON line")
  bench.add_argument("--peak_tflops", type=float, default=None,
                     help="device peak for MFU when the device is not in the table")

  lrf = sub.add_parser("lr_find", help="learning-rate range test: suggest a learning rate")
  lrf.add_argument("--workdir", help="where lr_find.json and lr_find.png go (a run there is "
                                     "left untouched; default: a new ./workdirs/<config>-<time>-"
                                     "lr_find)")
  lrf.add_argument("--config", help="config name or file, as for train (default: the workdir's "
                                    "run's config, else quickstart)")
  lrf.add_argument("--steps", type=int, default=100, help="most steps of the sweep")
  lrf.add_argument("--start_lr", type=float, default=1e-7, help="first learning rate")
  lrf.add_argument("--end_lr", type=float, default=10.0, help="last learning rate")
  lrf.add_argument("--stage", type=int, default=1,
                   help="with config.stages: the (1-based) stage whose trainable set is tested")
  return parser


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--coordinator_address", default=None,
                 help="host:port of process 0 for multi-process runs (env TRANSFER_COORDINATOR)")
  p.add_argument("--num_processes", type=int, default=None, help="(env TRANSFER_NUM_PROCESSES)")
  p.add_argument("--process_id", type=int, default=None, help="(env TRANSFER_PROCESS_ID)")


def run(argv: list[str]) -> int:
  """Runs one subcommand; returns the exit status.

  Nothing heavy is imported before the arguments are parsed (`--help` and a mistyped command
  answer at once); then `transfer.platform.setup()` sets the process up (XLA flags, compilation
  cache) before anything creates a JAX backend.
  """
  from transfer import configs

  args_only, overrides = configs.split_overrides(argv)
  args = _parser().parse_args(args_only)
  if overrides and args.command not in ("train", "bench", "lr_find"):
    raise UserError(f"--config.* overrides apply to train, bench and lr_find, not {args.command}")
  if args.command != "weights":  # everything else compiles
    from transfer import platform
    platform.setup()

  if args.command == "train":
    from transfer import train
    config_name, config = _run_config(args, overrides)
    return train.main(config, workdir=args.workdir, config_name=config_name,
                      distributed=dict(coordinator_address=args.coordinator_address,
                                       num_processes=args.num_processes,
                                       process_id=args.process_id))
  elif args.command == "lr_find":
    from transfer import lr_find
    config_name, config = _run_config(args, overrides)
    return lr_find.main(config, args.workdir, config_name, overrides, steps=args.steps,
                        start_lr=args.start_lr, end_lr=args.end_lr, stage=args.stage)
  elif args.command == "eval":
    from transfer import evaluate
    evaluate.main(args.workdir, as_json=args.json, checkpoint=args.checkpoint, tta=args.tta,
                  top_losses=args.top_losses)
  elif args.command == "predict":
    from transfer import predict
    failed = predict.main(args.images, workdir=args.workdir, model=args.model,
                          weights=args.weights, top=args.top, as_json=args.json,
                          batch_size=args.batch_size, checkpoint=args.checkpoint)
    return 1 if failed else 0
  elif args.command == "export":
    from transfer import export
    export.main(args.workdir, args.format, out=args.out, dtype=args.dtype,
                checkpoint=args.checkpoint)
  elif args.command == "weights":
    from transfer import weights
    weights.cli(args.weights_command, args)
  elif args.command == "bench":
    from transfer import bench
    config = configs.validate(configs.apply_overrides(configs.load(args.config or "bench"),
                                                      overrides))
    bench.main(config, mode=args.mode, steps=args.steps, warmup=args.warmup,
               as_json=args.json, peak_tflops=args.peak_tflops)
  return 0


def _run_config(args, overrides: list[str]):
  """The config `train` and `lr_find` run with: `--config`, or the workdir's own record when no
  `--config` is given and the workdir holds a run, then the overrides, validated."""
  from transfer import configs
  config_name = _train_config_name(args.config, args.workdir)
  if args.config is None and config_name != configs.DEFAULT:  # the run's own record
    from transfer import workdir as workdir_lib
    base = workdir_lib.recorded_config(args.workdir)
  else:
    base = configs.load(config_name)
  return config_name, configs.validate(configs.apply_overrides(base, overrides))


def _train_config_name(config: str | None, workdir: str | None) -> str:
  """The config to train with: the one named, else an existing run's own, else the demo's."""
  if config:
    return config
  if workdir:
    from transfer import workdir as workdir_lib
    recorded = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    if os.path.isfile(recorded):
      return recorded
  from transfer import configs
  return configs.DEFAULT


def main(argv: list[str] | None = None) -> None:
  """Console-script entry point."""
  if argv is None and sys.argv[1:2] in (["train"], ["eval"], ["predict"], ["bench"],
                                        ["lr_find"]):
    # The real command line (not a call from Python), about to compute: glibc reads its
    # tunables at start-up only, so restart once with huge pages (transfer/platform/hugepages.py).
    from transfer.platform import hugepages
    hugepages.restart_if_wanted()
  command_line = argv is None
  argv = sys.argv[1:] if argv is None else argv
  if not os.environ.get("TRANSFER_DEBUG"):
    # Orbax's writer threads log every failed future of a write that already failed (a full
    # disk): the one-line error below says it, thousands of lines of asyncio noise do not.
    import logging
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  try:
    status = run(argv)
    sys.stdout.flush()  # Here, not at interpreter exit, so a closed pipe is caught below.
    sys.exit(status)
  except BrokenPipeError:
    # The reader went away (`| head`). Point stdout at /dev/null so the flush at exit cannot
    # fail again, and exit as a command killed by SIGPIPE would (128 + 13).
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(141)
  except (UserError, FileNotFoundError) as e:
    if os.environ.get("TRANSFER_DEBUG"):
      raise
    print(f"transfer: error: {e}", file=sys.stderr)
    _exit(2, command_line)
  except KeyboardInterrupt:
    print("transfer: interrupted", file=sys.stderr)
    _exit(130, command_line)
  except Exception:  # pylint: disable=broad-except
    # Not one of ours: keep the traceback (a bug to report), but do not leave it to threads.
    if os.environ.get("TRANSFER_DEBUG") or not command_line:
      raise
    import traceback
    traceback.print_exc()
    _exit(1, command_line)
  except BaseException as e:  # `preemption.Terminated`: SIGTERM before training started
    if not hasattr(e, "exit_status"):
      raise
    print(f"transfer: {e}; nothing was trained or saved", file=sys.stderr)
    _exit(e.exit_status, command_line)


def _exit(status: int, command_line: bool) -> None:
  """Exits with `status`; from the command line without waiting for worker threads.

  An error can stop the program while XLA compiles or Orbax writes on other threads, and
  interpreter shutdown under live threads can crash (a segfault instead of the message and
  status). Everything the run must keep is saved before the error reaches here.
  """
  if not command_line:
    sys.exit(status)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


if __name__ == "__main__":
  main()
