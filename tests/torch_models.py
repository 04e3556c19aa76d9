"""Reference torch models for parity tests: a plain `torch.nn` ResNet with torchvision's module
names, its random weights, and the ways its state dict is published; and `import_torchvision`,
for tests that need torchvision's own code beside this CPU torch. Imported only by tests that
`pytest.importorskip("torch")` first.
"""

import importlib.util
import sys

import pytest
import torch

nn = torch.nn


# --- the torch reference --------------------------------------------------------------------------


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (expansion 4), stride on conv2."""

  def __init__(self, inplanes, planes, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.relu(y + shortcut)


class TorchResNet(nn.Module):
  """torchvision's ResNet module layout: conv1, bn1, maxpool, layer1..4, avgpool, fc."""

  def __init__(self, stage_sizes, width=64, num_classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    inplanes = width
    for s, blocks in enumerate(stage_sizes):
      planes, stride = width * 2 ** s, 1 if s == 0 else 2
      downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                 nn.BatchNorm2d(planes * 4))
      layers = [Bottleneck(inplanes, planes, stride, downsample)]
      inplanes = planes * 4
      layers += [Bottleneck(inplanes, planes, 1, None) for _ in range(1, blocks)]
      setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(inplanes, num_classes)
    self.num_stages = len(stage_sizes)

  def features(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for s in range(self.num_stages):
      x = getattr(self, f"layer{s + 1}")(x)
    return x

  def forward(self, x):
    return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def randomize(model, damped=()):
  """Random weights in place, in eval mode: He-scaled convolutions (activations stay O(1)),
  BatchNorm with non-trivial running statistics and affine parameters (the layers whose names
  end with one of `damped` at a third of the scale), and Linear layers."""
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, nn.Conv2d):
        module.weight.normal_(0.0, (2.0 / module.weight[0].numel()) ** 0.5)
      elif isinstance(module, nn.BatchNorm2d):
        module.running_mean.normal_(0.5, 1.0)
        module.running_var.uniform_(0.5, 3.0)
        module.weight.uniform_(0.5, 1.5)
        if name.endswith(tuple(damped)):
          module.weight.mul_(0.3)
        module.bias.normal_(0.0, 0.2)
        module.num_batches_tracked.fill_(1234)
      elif isinstance(module, nn.Linear):
        module.weight.normal_(0.0, (1.0 / module.in_features) ** 0.5)
        module.bias.normal_(0.0, 0.1)
  return model.eval()


def torch_resnet(stage_sizes, seed, width=64):
  """The reference with random weights and random, non-trivial running statistics, in eval mode;
  the last BN of each block gets a smaller scale so the residual sum does not grow through 30+
  blocks."""
  torch.manual_seed(seed)
  return randomize(TorchResNet(stage_sizes, width), damped=("bn3", "downsample.1"))


def run_torch(fn, x_nhwc):
  with torch.no_grad():
    return fn(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def save(model, path, fmt, *, counters=True):
  """Writes the state dict as torchvision (`pth`) or timm/HF (`safetensors`) publish it."""
  state = {k: v for k, v in model.state_dict().items()
           if counters or not k.endswith("num_batches_tracked")}
  if fmt == "pth":
    torch.save(state, path)
  else:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
  return str(path)


# --- torchvision ----------------------------------------------------------------------------------


def import_torchvision():
  """Imports torchvision beside a torch build it was not compiled for (skips where not installed).

  torchvision's import registers fake (meta) kernels for its C++ ops (`torchvision::nms`, ...),
  which fails when its compiled extension does not load against this torch. The models and
  functions the parity tests use never reach those ops, so the registrations are skipped while
  it imports; every other `register_fake` call goes through untouched. timm imports torchvision,
  so call this before importing timm too.
  """
  if "torchvision" in sys.modules:
    return sys.modules["torchvision"]
  if importlib.util.find_spec("torchvision") is None:
    pytest.skip("torchvision is not installed")
  real = torch.library.register_fake

  def register_fake(op, *args, **kwargs):
    if isinstance(op, str) and op.startswith("torchvision::"):
      return args[0] if args else (lambda fn: fn)  # called directly, or as a decorator
    return real(op, *args, **kwargs)

  torch.library.register_fake = register_fake
  try:
    import torchvision  # only with the registrations skipped
  finally:
    torch.library.register_fake = real
  return torchvision
