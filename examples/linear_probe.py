"""Linear probe: how well do a pretrained network's frozen features separate your classes?

The standard evaluation of a backbone without fine-tuning: the network's pooled features
(`transfer.create_model(..., num_classes=0, pooling="avg")`), computed on images preprocessed
the way the weights expect (`transfer.weights.transform`), then a scikit-learn logistic
regression on them. Fitting takes seconds once the features are computed.

    pip install scikit-learn
    python examples/linear_probe.py --data PATH --model resnet50 --weights torchvision:resnet50

PATH holds `PATH/<class>/*.jpg` (a stratified `--val_fraction` of each class is held out) or
`PATH/train/<class>/...` and `PATH/val/<class>/...`. It prints the feature size, the image
counts and the held-out accuracy of the probe.
"""

import argparse
import os

import jax
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import transfer
from transfer.predict import decode_image, expand_images


def list_images(root):
  """(paths, labels, class names) of `root/<class>/...` (folders walked recursively)."""
  classes = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
  paths, labels = [], []
  for label, name in enumerate(classes):
    found = expand_images([os.path.join(root, name)])
    paths += found
    labels += [label] * len(found)
  return paths, np.asarray(labels), classes


def features(model, variables, prep, paths, batch_size):
  """The model's output for every image, `batch_size` at a time (the last batch padded, so
  the forward pass compiles once)."""
  apply = jax.jit(model.apply)
  out = []
  for start in range(0, len(paths), batch_size):
    chunk = paths[start:start + batch_size]
    x = prep([decode_image(p) for p in chunk])  # resize, crop and normalise as the weights need
    x = np.concatenate([x, np.zeros((batch_size - len(x),) + x.shape[1:], x.dtype)])
    out.append(np.asarray(apply(variables, x))[:len(chunk)])
  return np.concatenate(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, help="PATH/<class>/* or PATH/{train,val}/<class>/*")
  parser.add_argument("--model", default="resnet50")
  parser.add_argument("--weights", default="torchvision:resnet50", help="registry id or file; "
                      "'none' for random features (a baseline)")
  parser.add_argument("--image_size", type=int, default=None,
                      help="input side (default: the weights' own eval size)")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--val_fraction", type=float, default=0.2)
  parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the probe")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  weights = None if args.weights == "none" else args.weights

  model, variables = transfer.create_model(args.model, weights, num_classes=0, pooling="avg",
                                           image_size=args.image_size)
  prep = transfer.weights.transform(weights, image_size=args.image_size)

  if os.path.isdir(os.path.join(args.data, "train")):
    train_paths, train_y, classes = list_images(os.path.join(args.data, "train"))
    val_paths, val_y, _ = list_images(os.path.join(args.data, "val"))
  else:
    paths, labels, classes = list_images(args.data)
    train_paths, val_paths, train_y, val_y = train_test_split(
        paths, labels, test_size=args.val_fraction, stratify=labels, random_state=args.seed)
  train_x = features(model, variables, prep, train_paths, args.batch_size)
  val_x = features(model, variables, prep, val_paths, args.batch_size)

  probe = make_pipeline(StandardScaler(), LogisticRegression(C=args.C, max_iter=2000))
  probe.fit(train_x, train_y)
  accuracy = probe.score(val_x, val_y)
  print(f"{args.model} features ({train_x.shape[1]}-d, {args.weights}), {len(classes)} classes, "
        f"{len(train_paths)} train / {len(val_paths)} val images: "
        f"linear probe val accuracy {accuracy:.4f}")
  return accuracy


if __name__ == "__main__":
  main()
