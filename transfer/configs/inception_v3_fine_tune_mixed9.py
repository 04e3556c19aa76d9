"""Second stage on InceptionV3: train the top two inception blocks (mixed9, mixed10) and the head,
everything before mixed9 frozen: the fine-tuning example of the Keras applications docs (there:
"freeze the first 249 layers", which end at mixed8, then SGD with lr 1e-4 and momentum 0.9).

Starts from a finished `inception_v3_cats_vs_dogs` run (`init_from`: its params and BatchNorm
statistics, a fresh optimizer, step 0). The BatchNorm layers of mixed9 and mixed10 train: they
normalise with global-batch statistics (the mean over every device) and update their running
statistics; every other BatchNorm stays in inference mode. Layer names are stable and readable
(`stem_*`, `mixed0_*` ... `mixed10_*`; see `transfer.models.inception`), so "everything from
mixed9 on" is the two patterns below. Flips make each step see new pixels, so nothing is cached.

    transfer train --config inception_v3_fine_tune_mixed9 --workdir workdirs/inception_v3_mixed9 \\
        --config.init_from=workdirs/inception_v3_cats_vs_dogs

Expected: a small further gain in validation accuracy over the first stage; not measured here,
where the data cannot be downloaded.
"""

from transfer.configs import inception_v3_cats_vs_dogs


def get_config():
  c = inception_v3_cats_vs_dogs.get_config()
  c.init_from = "workdirs/inception_v3_cats_vs_dogs"
  c.trainable = ["^head/", "^mixed9_", "^mixed10_"]
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.learning_rate = 1e-4
  c.augment = "flip"
  c.cache_features = False
  c.num_epochs = 5
  return c
