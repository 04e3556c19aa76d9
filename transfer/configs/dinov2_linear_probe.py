"""DINOv2's linear probe: a linear classifier on the frozen features of DINOv2 ViT-S/14.

The backbone is DINOv2's own `dinov2_vits14_pretrain.pth` (self-supervised, no classifier; ImageNet
mean/std). Its features are what DINOv2's linear evaluation feeds its classifier: the class token
concatenated with the mean of the patch tokens (`token_pool="tok_gap"`, 2 x 384 values), and the
head is one Dense layer on them (`head="gap"` with no dropout: on a feature vector the global
average pool is the identity). Images are DINOv2's evaluation transform: short side 256, centre
224 (`eval_crop = 224 / 256`), bicubic. Nothing in the backbone trains and nothing augments its
input, so its features are computed once (`cache_features`) and the head's epochs cost almost
nothing.

    transfer weights download dinov2:vits14
    transfer train --config dinov2_linear_probe --workdir workdirs/dinov2_linear_probe

`--config.weights=timm:vit_small_patch14_dinov2.lvd142m` takes timm's copy of the same weights;
`--config.model=dinov2_b14 --config.weights=dinov2:vitb14` the larger backbone; the `_reg4`
models and weights add DINOv2's four register tokens.

Data: TFDS `tf_flowers` (3,670 images, 5 classes, only a `train` split: 80/20 here), as in
`flowers_gap.py`; any other: `--config.dataset=folder:PATH` or `tfds:NAME`.

Expected: not measured here, where neither the data nor the weights can be downloaded (the
project's tests train this config two steps on a generated file and synthetic images). The
published reference for this backbone is DINOv2's linear probe on ImageNet-1k: 81.1% top-1 for
ViT-S/14 (DINOv2's README); on a 5-class flower set expect well above `flowers_gap`'s 85-90%
from frozen VGG16 features.
"""

from transfer.configs import default


def get_config():
  c = default.get_config()
  c.model = "dinov2_s14"
  c.weights = "dinov2:vits14"
  c.token_pool = "tok_gap"  # class token + mean patch token: DINOv2's linear-probe input
  c.head = "gap"
  c.head_dropout = 0.0      # a plain linear layer on the features
  c.dataset = "tfds:tf_flowers"
  c.train_split = "train[:80%]"
  c.val_split = "train[80%:]"
  c.image_size = 224
  c.augment = "none"
  c.eval_crop = 224 / 256   # DINOv2's evaluation transform: resize 256, centre crop 224
  c.cache_features = True
  c.trainable = ["^head/"]
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.schedule = "cosine"
  c.batch_size = 64
  c.num_epochs = 30
  return c
