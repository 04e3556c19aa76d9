"""The offline demo that `transfer train` runs with no `--config`.

VGG16 with the blog head (Flatten, Dense 256 relu, Dropout 0.6, Dense 1 sigmoid) and its conv base
frozen, trained on generated two-class images at 64x64. No network needed: ImageNet weights are
used when `keras:vgg16_notop` is in the cache (`transfer weights download keras:vgg16_notop`),
otherwise the conv base is randomly initialised and the run says so.

    transfer train                         # about 3 minutes on a 2-core CPU
    transfer train --config.num_epochs=1   # shorter

Expect validation accuracy well above chance (the synthetic classes differ in structure that even
random conv features separate); the real recipe is `--config cats_vs_dogs`.
"""

from transfer.configs import default


def get_config():
  c = default.get_config()
  c.weights = "keras:vgg16_notop?"  # "?": use if cached, else random init (announced)
  c.dataset = "synthetic"
  c.image_size = 64
  c.batch_size = 32
  c.num_epochs = 4
  c.learning_rate = 1e-3
  c.cache_features = True
  c.augment = "none"
  c.log_every_steps = 8
  return c
