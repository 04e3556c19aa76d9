"""The order in which Keras lists a functional model's layers, for weight files keyed by it.

Keras names the layers it builds in a helper without names by a process-wide counter
(`conv2d_1` ... in Keras 2, `conv2d` ... in Keras 3, shifted by every model built before), so
such names say nothing about a layer's place in the network. What a weight file does carry is
order: a legacy `.h5` lists its layers in `model.layers` order (`layer_names`), and Keras 3's
`.weights.h5` keys each layer by its class and its index among that class's layers in the same
order (`batch_normalization_3` is the fourth BatchNormalization of `model.layers`, whatever its
name). `layer_order` computes that order from a network's structure, so a porter can match
layers by kind and position.

`model.layers` of a Keras functional model (tf.keras, Keras 2.1 and later, Keras 3) sorts layers
by decreasing depth, a layer's longest path to the output in layers, and layers of equal depth
by the order a depth-first walk from the output, through each layer's inputs in call order,
first reaches them. (Keras 1 and 2.0 sorted equal depths by layer name instead.) It is also the
rule Keras itself loads the official application files by: `load_weights_from_hdf5_group` gives
the k-th layer with weights in the file's `layer_names` to the k-th layer with weights of
`model.layers`, positionally, so a file `keras.applications.InceptionV3(weights="imagenet")`
loads lists its layers in this order.
"""

from __future__ import annotations

from typing import Sequence


def layer_order(nodes: Sequence[tuple[str, Sequence[str]]]) -> tuple[str, ...]:
  """Layer names in Keras' `model.layers` order.

  Args:
    nodes: every Keras layer as `(name, input layer names in call order)`, the model's input
      layer with no inputs; the last node is the model's output.

  Returns:
    The names (input layer included) as Keras' `Functional.layers` lists them.
  """
  inputs = {name: tuple(ins) for name, ins in nodes}
  output = nodes[-1][0]
  first_reached: dict[str, int] = {}
  finished: list[str] = []  # post-order: every layer after all of its inputs
  stack = [(output, iter(inputs[output]))]
  first_reached[output] = 0
  while stack:  # iterative depth-first walk (InceptionV3 is ~300 layers deep)
    name, pending = stack[-1]
    nxt = next(pending, None)
    if nxt is None:
      stack.pop()
      finished.append(name)
    elif nxt not in first_reached:
      first_reached[nxt] = len(first_reached)
      stack.append((nxt, iter(inputs[nxt])))
  depth = {output: 0}
  for name in reversed(finished):  # each layer before its inputs: longest path to the output
    for source in inputs[name]:
      depth[source] = max(depth.get(source, 0), depth[name] + 1)
  return tuple(sorted(first_reached, key=lambda n: (-depth[n], first_reached[n])))
