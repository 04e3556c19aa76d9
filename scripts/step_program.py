"""Writes the StableHLO text of the train step `transfer bench` times, without source locations.

Two checkouts that write the same text compile the same program, so a refactor that leaves it
unchanged cannot have made the step slower or faster; a timing comparison is then noise. Lowering
only: nothing is compiled or run, which takes seconds even for VGG16 at 224.

    PYTHONPATH=CHECKOUT python scripts/step_program.py vgg16 /tmp/vgg16.txt [--config.KEY=VALUE ...]
    cmp /tmp/old-vgg16.txt /tmp/new-vgg16.txt
"""

import re
import sys

from transfer import configs, models
from transfer.bench import cases


class _Lowered(Exception):
  """Stops the bench set-up once the step is lowered."""


def main(argv: list[str]) -> None:
  model, out, *overrides = argv
  _, values = configs.split_overrides(overrides)
  config = configs.load("bench")
  config.model = model
  config = configs.validate(configs.apply_overrides(config, values))

  def lower_only(fn, *args):
    text = fn.lower(*args).as_text()
    text = re.sub(r"\s*loc\([^\n]*?\)(?=\s*$)", "", text, flags=re.M)  # trailing locations
    with open(out, "w") as f:
      f.write("\n".join(l for l in text.splitlines() if not l.startswith("#loc")) + "\n")
    raise _Lowered

  cases.compile_step = lower_only  # bench's own step, stopped before compiling
  setup = cases.Setup(config, models.resolve_dtype(config.dtype))
  try:
    cases.prepare_train(setup, 0)
  except _Lowered:
    pass
  print(f"{model}: conv {setup.model.conv}, {out}")


if __name__ == "__main__":
  main(sys.argv[1:])
