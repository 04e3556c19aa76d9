"""The blog recipe in one run: a small head on the frozen VGG16 ImageNet conv base, then block5
unfrozen at a lower rate, on Dogs vs Cats.

Head: Flatten -> Dense 256 relu -> Dropout 0.6 -> Dense 1 sigmoid, binary cross-entropy, RMSprop.
The conv base is Keras' `vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5` (caffe preprocessing).
Two stages (`stages`; see `transfer/stages.py`):
  1. `head`: 30 epochs, conv base frozen, no augmentation, so its features are computed once
     (`cache_features`): about one pass of VGG16 over the data plus 30 cheap head epochs;
  2. `block5`: 10 epochs with block5 unfrozen at a 10x smaller rate than the head (`lr_mults`) and
     horizontal flips (the backbone runs every step; the feature cache is dropped by itself).
Stage 2 starts as a new run from stage 1's params would (`fine_tune_block5` with `init_from`, the
two-command form, which this run equals): a fresh optimizer, its own step 0.

    transfer weights download keras:vgg16_notop
    transfer lr_find --config cats_vs_dogs --workdir workdirs/cats_vs_dogs   # optional
    transfer train --config cats_vs_dogs --workdir workdirs/cats_vs_dogs

`--config.stages=[]` trains the head only (stage 1 alone, `num_epochs` long).

Data: TFDS `cats_vs_dogs` (23,262 images, only a `train` split: 80% train / 20% validation). With
network access TFDS downloads it (about 800 MB); otherwise prepare it elsewhere with
`tfds build cats_vs_dogs` and pass `--config.data_dir=DIR`.

Expected: validation accuracy about 96-97% (the figure the blog recipe reaches with these weights
and this head); not measured on this project's offline CI, which runs this config on generated
weights and mock data only. Unfreezing block5 adds about one point (the usual outcome of this
recipe; not measured here either).
"""

from transfer.configs import default


def get_config():
  c = default.get_config()
  c.model = "vgg16"
  c.weights = "keras:vgg16_notop"
  c.head = "flatten_dense"
  c.head_hidden = 256
  c.head_dropout = 0.6
  c.dataset = "tfds:cats_vs_dogs"
  c.train_split = "train[:80%]"
  c.val_split = "train[80%:]"
  c.image_size = 224
  c.augment = "none"
  c.eval_crop = 1.0
  c.cache_features = True
  c.trainable = ["^head/"]
  c.optimizer = "rmsprop"
  c.momentum = 0.0
  c.learning_rate = 2e-5
  c.batch_size = 32
  c.num_epochs = 30
  c.log_every_steps = 100
  c.stages = [
      dict(name="head", epochs=30, trainable=["^head/"]),
      dict(name="block5", epochs=10, trainable=["^head/", "^block5_"], learning_rate=1e-5,
           lr_mults={"^block5_": 0.1}, augment="flip"),
  ]
  return c
