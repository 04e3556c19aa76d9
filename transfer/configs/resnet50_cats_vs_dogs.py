"""The recipe on ResNet50: the ImageNet conv base frozen (BatchNorm in inference mode too), a global
average pooling head trained on Dogs vs Cats.

The base is torchvision's current ResNet50 (`IMAGENET1K_V2`, v1.5; its mean/std preprocessing
comes with the weights). Validation, and `transfer predict`/`export` of the trained run, take the
centre 224 of each image squashed to 232 (`eval_crop = 224 / 232`): torchvision's crop fraction for
these weights, though torchvision resizes the short side to 232 and keeps the aspect ratio, which
`transfer predict --weights torchvision:resnet50` does for the ImageNet classes. Frozen BatchNorm
layers normalise with their ImageNet statistics and never update them, so the head trains on fixed
features, which are computed once (`cache_features`).

    transfer weights download torchvision:resnet50
    transfer train --config resnet50_cats_vs_dogs --workdir workdirs/resnet50_cats_vs_dogs

`--config.weights=keras:resnet50_notop` takes Keras' ResNet50 instead (v1, caffe preprocessing;
add `--config.eval_crop=1.0` for Keras' squash to 224);
`--config.weights=timm:resnet50.a1_in1k` timm's stronger ResNet Strikes Back weights (v1.5, same
keys and preprocessing as torchvision's); the model builds the variant the weights need
(`variant=auto`).

Data: TFDS `cats_vs_dogs` as in `cats_vs_dogs.py`. Expected: validation accuracy of about 97-98%
(ResNet50 features are stronger than VGG16's on this task); not measured on this project's
offline CI. Second stage: `resnet50_fine_tune_conv5.py`.
"""

from transfer.configs import cats_vs_dogs


def get_config():
  c = cats_vs_dogs.get_config()
  c.model = "resnet50"
  c.weights = "torchvision:resnet50"
  c.head = "gap"
  c.head_dropout = 0.0
  c.eval_crop = 224 / 232  # torchvision's crop fraction for IMAGENET1K_V2 (see above)
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.num_epochs = 10
  c.stages = []  # head only; conv5 is the second run, resnet50_fine_tune_conv5
  return c
