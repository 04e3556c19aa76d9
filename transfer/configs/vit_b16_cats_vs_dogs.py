"""Fine-tuning a Vision Transformer the way timm users do: Google's AugReg ViT-B/16, first a new
head on the frozen network, then the top three blocks with layer-wise learning-rate decay, on Dogs
vs Cats.

The weights are timm's `vit_base_patch16_224.augreg2_in21k_ft_in1k` (ImageNet-21k, fine-tuned on
ImageNet-1k; the Hugging Face Hub copy, mean/std 0.5). Validation, and `transfer predict`/`export`
of the trained run, take timm's eval geometry for them: the centre 224 of the image squashed to
248 (`eval_crop = 224 / 248`, timm's crop_pct 0.9), bicubic. The head is a Dense layer on the
class token (`token_pool` is the model's `tok`; `head="gap"` on a vector is a plain Dense).
Two stages (`stages`; see `transfer/stages.py`):
  1. `head`: 2 epochs, the whole ViT frozen, AdamW at 1e-3;
  2. `top_blocks`: 3 epochs, blocks 9-11 and the final norm unfrozen with the head, AdamW at
     5e-5 (weight decay 0.05) under a cosine schedule, horizontal flips, and `layer_decay=0.75`
     (BEiT/timm semantics: each layer's rate times 0.75^(13 - layer), the head at the full rate,
     block 11 and the final norm at 0.75, block 9 at 0.42; the frozen blocks stay frozen).
Stochastic depth (`drop_path_rate=0.1`, block i of 12 dropping its residual branches with rate
0.1 * i / 11 in training) applies in both stages, also in the frozen blocks (as in timm), so the
backbone's training forward pass is random and its features are not cached: stage 1 runs the
frozen network every step (`--config.drop_path_rate=0 --config.cache_features=true` makes stage 1
a pass over the data plus cheap head epochs).

    transfer weights download timm:vit_base_patch16_224.augreg2_in21k_ft_in1k
    transfer train --config vit_b16_cats_vs_dogs --workdir workdirs/vit_b16_cats_vs_dogs

Data: TFDS `cats_vs_dogs` as in `cats_vs_dogs.py` (80% train / 20% validation).

Expected: not measured here, where neither the data nor the weights can be downloaded (the
project's tests train this config two steps on generated weights and synthetic images). We know
of no published Dogs-vs-Cats figure for these weights; expect validation accuracy above the
ResNet50 recipe's 97-98% (`resnet50_cats_vs_dogs`), as ImageNet-21k ViT-B/16 features transfer
better than ResNet50's on natural images (Steiner et al., "How to train your ViT?", 2021).
"""

from transfer.configs import cats_vs_dogs


def get_config():
  c = cats_vs_dogs.get_config()
  c.model = "vit_b16"
  c.weights = "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k"
  c.head = "gap"
  c.head_dropout = 0.0
  c.image_size = 224
  c.eval_crop = 224 / 248  # timm's crop_pct 0.9 for these weights at 224 (see above)
  c.drop_path_rate = 0.1
  c.cache_features = False  # stochastic depth makes every training forward pass random
  c.optimizer = "adamw"
  c.momentum = 0.9
  c.weight_decay = 0.05
  c.batch_size = 32
  c.num_epochs = 5
  c.trainable = ["^head/"]
  c.stages = [
      dict(name="head", epochs=2, trainable=["^head/"], learning_rate=1e-3),
      dict(name="top_blocks", epochs=3,
           trainable=["^head/", "^block(9|10|11)_", "^final_norm/"], learning_rate=5e-5,
           schedule="cosine", layer_decay=0.75, augment="flip"),
  ]
  return c
