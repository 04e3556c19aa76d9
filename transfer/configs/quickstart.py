"""The offline demo that `transfer train` runs with no `--config`.

VGG16 with the blog head (Flatten, Dense 256 relu, Dropout 0.6, Dense 1 sigmoid) and its conv base
frozen, trained with horizontal flips on 768 generated two-class images at 64x64 (the frozen
backbone runs every step, as in an augmented run). No network needed: ImageNet weights are used
when `keras:vgg16_notop` is in the cache (`transfer weights download keras:vgg16_notop`); otherwise
the conv base is randomly initialised and the run says so.

    transfer train                            # about 1 minute on a 2-core CPU (3 when busy)
    transfer train --config.num_epochs=1      # shorter
    transfer train --config.cache_features=true --config.augment=none   # backbone once, then head

Expect validation accuracy near 100% (the synthetic classes differ in structure that even random
conv features separate). The real recipe is `--config cats_vs_dogs`.
"""

from transfer.configs import default


def get_config():
  c = default.get_config()
  c.weights = "keras:vgg16_notop?"  # "?": use if cached, else random init (announced)
  c.dataset = "synthetic"
  c.synthetic.train_size = 768
  c.synthetic.val_size = 256
  c.image_size = 64
  c.batch_size = 32
  c.num_epochs = 3
  c.learning_rate = 1e-3
  c.augment = "flip"
  c.cache_features = False
  c.log_every_steps = 8
  return c
