"""Second stage of the blog recipe as a run of its own: unfreeze block5 and fine-tune it with the
trained head. Superseded by `cats_vs_dogs`, which trains both stages in one run (and equals this
two-command form); kept for runs that start from a head trained elsewhere.

Starts from the parameters of a finished `cats_vs_dogs` run (`init_from`: fresh optimizer state,
step 0), trains block5 at a 10x smaller learning rate than the head (`lr_mults`), with
horizontal flips (so the backbone runs every step: no feature cache).

    transfer train --config cats_vs_dogs --config.stages=[] --workdir workdirs/cats_vs_dogs
    transfer train --config fine_tune_block5 --workdir workdirs/cats_vs_dogs_block5 \\
        --config.init_from=workdirs/cats_vs_dogs

Expected: a further gain of about one point of validation accuracy over the first stage (the usual
outcome of this recipe; not measured here, where the data cannot be downloaded).
"""

import ml_collections

from transfer.configs import cats_vs_dogs


def get_config():
  c = cats_vs_dogs.get_config()
  c.stages = []
  c.init_from = "workdirs/cats_vs_dogs"
  c.trainable = ["^head/", "^block5_"]
  c.lr_mults = ml_collections.ConfigDict({"^block5_": 0.1})
  c.optimizer = "rmsprop"
  c.learning_rate = 1e-5
  c.augment = "flip"
  c.cache_features = False
  c.num_epochs = 10
  return c
