"""Second stage on ResNet50: unfreeze conv5 (its BatchNorm statistics update again) with the head.

Starts from a finished `resnet50_cats_vs_dogs` run (`init_from`: its params and BatchNorm
statistics, a fresh optimizer, step 0). conv5's convolutions and BatchNorm layers train at a 10x
smaller rate than the head (`lr_mults`); their BatchNorm layers use global-batch statistics (the
mean over every device) and update their running statistics; every other BatchNorm stays in
inference mode. Flips make each step see new pixels, so nothing is cached.

    transfer train --config resnet50_fine_tune_conv5 --workdir workdirs/resnet50_conv5 \\
        --config.init_from=workdirs/resnet50_cats_vs_dogs

Expected: a small further gain in validation accuracy over the first stage (the usual outcome of
fine-tuning the last block); not measured here, where the data cannot be downloaded.
"""

import ml_collections

from transfer.configs import resnet50_cats_vs_dogs


def get_config():
  c = resnet50_cats_vs_dogs.get_config()
  c.init_from = "workdirs/resnet50_cats_vs_dogs"
  c.trainable = ["^head/", "^conv5_"]
  c.lr_mults = ml_collections.ConfigDict({"^conv5_": 0.1})
  c.learning_rate = 1e-4
  c.augment = "flip"
  c.cache_features = False
  c.num_epochs = 5
  return c
