"""`create_model`: a registered model with its pretrained weights in one call.

    model, variables = transfer.create_model("resnet50", weights="torchvision:resnet50",
                                             num_classes=0, pooling="avg")
    prep = transfer.weights.transform("torchvision:resnet50")
    features = model.apply(variables, prep(images))          # (N, 2048)

The pieces are the package's own, called once each: the weights are parsed by
`weights.sources.resolve` (their architecture, variant, whether they hold the ImageNet top),
the module is built by `models.get`, and the variables come from `weights.load_variables` (the
strict merge `transfer train` uses) or `models.init_variables` for random init.

How the output is chosen, mirroring Keras (`include_top`, `pooling`, `classes`) and timm
(`num_classes`, `global_pool`):

  * `num_classes=0`: no classifier; the features, pooled per `pooling` (`"avg"`, `"max"`), or
    the unpooled NHWC map with `pooling=None` (timm's `num_classes=0`, Keras' `include_top=False`).
  * `num_classes=N`: a fresh classifier of N outputs (`head`, default `"gap"`: global average
    pooling and a dense layer); with `include_top=True`, the architecture's own ImageNet top
    instead, of N outputs (from the weights when they hold it and N is 1000).
  * `num_classes=None` (default): the weights' own output: their ImageNet top when they hold
    it (1000 classes), else their features as for 0; random init builds the 1000-class top.
  * `include_top=None` (default) takes the weights' top exactly when they hold it and
    `num_classes` is None or 1000; `include_top=False` makes a 1000-output head fresh.
"""

from __future__ import annotations

from typing import Any

from transfer.errors import UserError

IMAGENET_CLASSES = 1000


def create_model(name: str | None = None, weights: str | None = None, *,
                 num_classes: int | None = None, pooling: str | None = "avg",
                 include_top: bool | None = None, head: str = "gap",
                 head_hidden: int | None = None, head_dropout: float | None = None,
                 variant: str = "auto", image_size: int | None = None, dtype: Any = "float32",
                 conv: str = "auto", seed: int = 0, return_report: bool = False):
  """A model and its variables, pretrained or random, ready for `model.apply(variables, x)`.

  Args:
    name: a registered model (`transfer.models.names()`); None = the architecture the weights
      are recognised as.
    weights: a registry id (`torchvision:resnet50`, `keras:vgg16_notop`; downloaded into the
      cache on first use), a weight file (`.h5`, `.pth`, `.safetensors`: recognised from its
      contents like an id), or None for random initialisation.
    num_classes: 0 = features, N = N outputs, None = the weights' own (see the module doc).
    pooling: the features' pooling with `num_classes=0`: `"avg"` (default, timm's), `"max"`,
      or None for the unpooled map (Keras' default). A classifier pools as its head does
      (`gap` and the ResNet/InceptionV3 tops average, VGG's top flattens); `"max"` with one
      is refused.
    include_top: the architecture's own ImageNet classifier (Keras' switch); None decides from
      the weights and `num_classes`.
    head: the fresh classifier for `num_classes=N`: `"gap"` or `"flatten_dense"`.
    head_hidden, head_dropout: that head's hidden width and dropout.
    variant: `"auto"` (the form the weights need: a Keras ResNet is v1, a torchvision one v1.5;
      the model's default for random init) or a variant name (`models.spec(name).variants`).
    image_size: the input side the variables are built for (a VGG's flatten layers depend on
      it); default the weights' own eval size (`transfer.weights.transform(weights)`), 224 or
      the architecture's top size for random init.
    dtype: compute dtype (`"float32"`, `"bfloat16"`, `"auto"`); params stay float32.
    conv: convolution algorithm (`models.get`).
    seed: initialises whatever is fresh (a new head, or everything for random init).
    return_report: also return the `weights.LoadReport` (None for random init).

  Returns:
    `(model, variables)`: the unbound linen module and `{"params"}` (plus `"batch_stats"` for
    BatchNorm networks), or `(model, variables, report)` when `return_report`.

  Raises:
    UserError: an unknown model or id, weights of another architecture, a top the weights do
      not hold, or options that contradict each other.
  """
  from transfer import models
  from transfer import weights as weights_lib
  source = weights_lib.sources.resolve(weights)
  if name is None:
    if source.arch is None:
      raise UserError(f"create_model: no registered architecture recognised in weights "
                      f"{weights!r}; pass the model name ({', '.join(models.names())})")
    name = source.arch
  spec = models.spec(name)
  if source.arch is not None and source.arch != name:
    raise UserError(f"weights {source.source} are for {source.arch}, model is {name}; use "
                    f"create_model({source.arch!r}, ...) or other weights")
  top, outputs = _output(source, num_classes, include_top)
  if outputs and pooling == "max":
    raise UserError(f"pooling={pooling!r} applies to features (num_classes=0); with a "
                    f"classifier use pooling='avg' or num_classes=0 and your own head")
  if variant == "auto":
    variant = weights_lib.variant_for(source, name) if spec.variants else None
  if top:
    model = models.get(name, include_top=True, num_classes=outputs, dtype=dtype, conv=conv,
                       variant=variant)
  elif outputs:
    model = models.get(name, head=head, num_classes=outputs, head_hidden=head_hidden,
                       head_dropout=head_dropout, dtype=dtype, conv=conv, variant=variant)
  else:
    model = models.get(name, head="none", pooling=pooling, dtype=dtype, conv=conv,
                       variant=variant)
  if image_size is None:
    fixed = top and spec.top_fixed_size
    image_size = spec.top_image_size if fixed or source.source is None else source.input_size
  models.check_image_size(name, model.head, image_size)
  if source.source is None:
    variables, report = models.init_variables(model, image_size, seed), None
  else:
    variables, report = weights_lib.load_variables(weights, model, image_size=image_size,
                                                   rng=seed, return_report=True)
    variables = dict(variables)
  return (model, variables, report) if return_report else (model, variables)


def _output(source, num_classes: int | None, include_top: bool | None) -> tuple[bool, int]:
  """`(imagenet_top, outputs)`: whether to build the ImageNet top, and the classifier's outputs
  (0 = none, the features)."""
  if num_classes is not None and num_classes < 0:
    raise UserError(f"num_classes must be >= 0 (0: features), got {num_classes}")
  holds_top = bool(source.include_top)
  if include_top is None:
    include_top = (num_classes in (None, IMAGENET_CLASSES)
                   and (holds_top or source.source is None and num_classes is None))
  if include_top:
    outputs = IMAGENET_CLASSES if num_classes is None else num_classes
    if outputs == 0:
      raise UserError("include_top=True builds a classifier; num_classes=0 asks for features")
    if source.source is not None and not holds_top:
      raise UserError(f"weights {source.source} hold no ImageNet top; use include_top=False "
                      f"(or num_classes=0 for features) or weights with the top")
    if source.source is not None and outputs != IMAGENET_CLASSES:
      raise UserError(f"the ImageNet top of weights {source.source} has {IMAGENET_CLASSES} "
                      f"classes, not {outputs}; use include_top=False for a fresh head")
    return True, outputs
  if num_classes is None:
    return False, 0
  return False, num_classes
