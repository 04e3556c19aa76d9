"""Multi-class transfer: VGG16 (torchvision weights) with a global-average-pool softmax head.

The GAP head (mean over the feature map, Dense num_classes) has 2.5k parameters per class instead
of the Flatten head's 25k x 256, which suits small multi-class datasets; training uses random crops
and flips, so the backbone runs every step.

    transfer weights download torchvision:vgg16
    transfer train --config flowers_gap --workdir workdirs/flowers

Data: TFDS `tf_flowers` (3,670 images, 5 classes, only a `train` split: 80/20 split here). Any
other dataset: `--config.dataset=folder:PATH` or `tfds:NAME`; `num_classes` follows the data.

Expected: validation accuracy around 85-90% after 10 epochs with the conv base frozen (typical for
frozen ImageNet VGG features on this set; not measured here, where the data cannot be downloaded).
"""

from transfer.configs import default


def get_config():
  c = default.get_config()
  c.model = "vgg16"
  c.weights = "torchvision:vgg16"
  c.head = "gap"
  c.head_dropout = 0.2
  c.dataset = "tfds:tf_flowers"
  c.train_split = "train[:80%]"
  c.val_split = "train[80%:]"
  c.image_size = 224
  c.augment = "crop_flip"
  c.eval_crop = 0.875
  c.trainable = ["^head/"]
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.batch_size = 32
  c.num_epochs = 10
  return c
