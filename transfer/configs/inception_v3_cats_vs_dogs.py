"""The recipe on InceptionV3: Keras' ImageNet conv base frozen (BatchNorm in inference mode too), a
global average pooling head trained on Dogs vs Cats at InceptionV3's own 299x299 input.

The base is Keras' `inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5`: [-1, 1] input
("tf" preprocessing) and Keras' squash-to-size eval geometry come with the weights. Frozen
BatchNorm layers normalise with their ImageNet statistics and never update them, so the head
trains on fixed features, computed once (`cache_features`).

    transfer weights download keras:inception_v3_notop
    transfer train --config inception_v3_cats_vs_dogs --workdir workdirs/inception_v3_cats_vs_dogs

`--config.weights=torchvision:inception_v3` takes torchvision's port of Google's weights instead
(its pool branches count padding: the model builds that variant, `variant=auto`). torchvision
evaluates them at short side 342, centre crop 299, as `transfer predict --weights` does; a run's
validation keeps this config's `eval_crop` (1.0, the squash): add `--config.eval_crop=0.874`
(299/342) for torchvision's crop fraction.

Data: TFDS `cats_vs_dogs` as in `cats_vs_dogs.py`. Expected: validation accuracy of about 98%
(InceptionV3's GAP features on this task); not measured on this project's offline CI. Second
stage: `inception_v3_fine_tune_mixed9.py`.
"""

from transfer.configs import cats_vs_dogs


def get_config():
  c = cats_vs_dogs.get_config()
  c.model = "inception_v3"
  c.weights = "keras:inception_v3_notop"
  c.image_size = 299
  c.head = "gap"
  c.head_dropout = 0.0
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.num_epochs = 10
  c.stages = []  # head only; mixed9 + mixed10 is the second run, inception_v3_fine_tune_mixed9
  return c
