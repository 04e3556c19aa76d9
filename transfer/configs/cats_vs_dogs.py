"""The blog recipe: VGG16 ImageNet conv base frozen, a small head trained on Dogs vs Cats.

Head: Flatten -> Dense 256 relu -> Dropout 0.6 -> Dense 1 sigmoid, binary cross-entropy, RMSprop.
The conv base is Keras' `vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5` (caffe preprocessing),
frozen; its features are computed once (`cache_features`), so 30 epochs cost about one pass of
VGG16 over the data plus 30 cheap head epochs.

    transfer weights download keras:vgg16_notop
    transfer train --config cats_vs_dogs --workdir workdirs/cats_vs_dogs

Data: TFDS `cats_vs_dogs` (23,262 images, only a `train` split: 80% train / 20% validation). With
network access TFDS downloads it (about 800 MB); otherwise prepare it elsewhere with
`tfds build cats_vs_dogs` and pass `--config.data_dir=DIR`.

Expected: validation accuracy about 96-97% (the figure the blog recipe reaches with these weights
and this head); not measured on this project's offline CI, which runs this config on generated
weights and mock data only. Second stage: `fine_tune_block5.py`.
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
  return c
