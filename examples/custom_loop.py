"""Your own training loop around the library's model, freeze labels and train state.

The library gives a flax module, the optimizer with its per-parameter labels (frozen params get
no update and no optimizer state; frozen BatchNorm layers run in inference mode) and a flax
`TrainState`; the jitted step below is yours. Synthetic data, so it runs anywhere in seconds:

    python examples/custom_loop.py                 # resnet50_tiny at 32x32, head + conv5 train
    python examples/custom_loop.py --steps 50
"""

import argparse

import jax
import numpy as np
import optax

from transfer import models, optim, train_state


def main(model_name="resnet50_tiny", steps=10, size=32, batch=8, seed=0):
  model = models.get(model_name, head="gap", num_classes=2)
  variables = models.init_variables(model, size, seed)
  tx, labels = optim.make_optimizer(variables["params"], learning_rate=1e-3,
                                    trainable=["^head/", "^conv5_"])
  print(optim.describe(variables["params"], labels))
  model = model.clone(frozen_batch_norm=optim.frozen_batch_norm(labels))  # frozen BN: inference
  state = train_state.create_train_state(variables["params"], tx, seed,
                                         variables["batch_stats"], apply_fn=model.apply)

  @jax.jit
  def train_step(state, images, targets):
    def loss_fn(params):
      logits, updated = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                       images, train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      return loss, updated["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss

  rng = np.random.default_rng(seed)
  for step in range(1, steps + 1):
    targets = rng.integers(0, 2, batch)  # class 1: brighter images
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    images += targets[:, None, None, None]
    state, loss = train_step(state, images, targets)
    print(f"step {step}: loss {float(loss):.4f}")
  return variables, state


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet50_tiny")
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  main(args.model, args.steps)
