"""Every config key with its default. Other configs start from this one and change a few fields.

The only place a default lives: `transfer.configs.validate` fills a key a config lacks from here,
and the code reads `config.KEY` directly. What each key may hold and whether it is part of a
run's identity is in `_schema.py` beside it.

Not meant to be run as is (it trains VGG16 from ImageNet weights on synthetic data); see
`quickstart.py` for the offline demo and `cats_vs_dogs.py` for the blog recipe.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # Model.
  c.model = "vgg16"
  c.variant = "auto"                # ResNet form: auto (what the weights need) | keras | torchvision
  c.weights = "keras:vgg16_notop"   # registry id, file path, or "none" (random init)
  c.head = "flatten_dense"          # imagenet | flatten_dense | gap | none
  c.head_hidden = 256
  c.head_dropout = 0.6
  c.num_classes = -1                # -1: the dataset's class count (2 classes -> 1 sigmoid logit)
  c.token_pool = "auto"             # ViT features: auto (the model's: tok) | tok | gap | tok_gap | none
  c.drop_path_rate = 0.0            # ViT stochastic depth: the last block's rate, linear over depth
  c.attention = "auto"              # ViT attention: auto (cuDNN on NVIDIA in half, else XLA) | xla | cudnn
  c.binary_sigmoid = True           # two classes train one sigmoid logit with binary cross-entropy
  c.init_from = ""                  # another run's workdir: start from its params, fresh optimizer
  # Data.
  c.dataset = "synthetic"           # tfds:NAME | folder:PATH | synthetic
  c.data_dir = ""                   # TFDS data_dir ("" = TFDS default)
  c.train_split = "train"
  c.val_split = "validation"
  c.val_fraction = 0.2              # held out when the dataset has no validation split
  c.labels_from = "folders"         # folder labels: folders (PATH/cat/x.jpg) | filename (cat.0.jpg)
  c.image_size = 224
  c.augment = "flip"                # none | flip | crop_flip | inception_crop | randaugment
  c.randaugment_n = 2               # randaugment: ops per image (timm's rand-mM-nN)
  c.randaugment_m = 9               # randaugment: magnitude, 0-10
  c.eval_crop = 1.0                 # center-crop fraction at eval (1.0 = plain resize)
  c.train_crop = 0.875              # crop_flip: random crop of this fraction of the stored side
  c.cache_images = ""               # "" | memory | disk: keep decoded, resized uint8 images
  c.cache_dir = ""                  # disk image cache ("" = a per-user temp dir)
  c.data_workers = 0                # decode workers (0 = min(16, cpus))
  c.data_worker_kind = "thread"     # thread | process: processes scale decoding past ~4 cores
  c.strict_data = False             # corrupt files: skip with a warning (False) or fail (True)
  c.synthetic = ml_collections.ConfigDict(
      {"num_classes": 2, "train_size": 512, "val_size": 128, "base_size": 64})
  # Optimisation.
  c.batch_size = 32                 # global, over all devices and processes
  c.num_epochs = 10
  c.num_steps = -1                  # > 0 overrides num_epochs
  c.optimizer = "adam"              # adam | adamw | sgd | rmsprop
  c.learning_rate = 1e-4
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.schedule = "constant"           # constant | cosine | warmup_cosine | one_cycle
  c.warmup_steps = 0
  c.pct_start = 0.25                # one_cycle: fraction of the steps warming up (fastai's 0.25)
  c.div_factor = 25.0               # one_cycle: starts at learning_rate / div_factor
  c.final_div_factor = 1e4          # one_cycle: ends at learning_rate / (div_factor * this)
  c.cycle_momentum = True           # one_cycle: momentum (Adam's b1) max -> base -> max
  c.max_momentum = 0.95
  c.base_momentum = 0.85
  c.grad_clip_norm = 0.0
  # Regularisation (the train step; see README "Regularisation and augmentation").
  c.label_smoothing = 0.0           # targets y*(1-ls) + ls/C (one sigmoid logit: + ls/2)
  c.mixup_alpha = 0.0               # > 0: mixup, lambda ~ Beta(alpha, alpha) per batch
  c.cutmix_alpha = 0.0              # > 0: cutmix; both > 0: one of the two per batch, p=0.5 each
  c.ema_decay = 0.0                 # > 0: keep an EMA of the params (eval reports both, predict uses it)
  c.train_bn = False                # BatchNorm layers train (batch statistics) even inside frozen blocks
  c.trainable = ["^head/"]          # regexes over param paths ("block5_conv1/kernel"); rest frozen
  c.lr_mults = ml_collections.ConfigDict()  # {"pattern": multiplier}, e.g. {"^block5": 0.1}
  c.layer_decay = 1.0               # ViT layer-wise lr decay: x decay^(depth+1-layer); 1.0 = off
  # Stages, each a fresh optimizer over its own trainable set, run one after the other: a list of
  # dicts with any of transfer.stages.STAGE_KEYS (epochs or steps, trainable, learning_rate,
  # lr_mults, schedule, train_bn, augment, ...); keys a stage omits are the ones above.
  c.stages = []
  # Execution.
  c.dtype = "auto"                  # compute: auto (bf16 on GPU/TPU, f32 on CPU) | float32 | bfloat16
  c.conv = "auto"                   # conv algorithm: auto (winograd on CPU, xla on GPU/TPU) | xla | winograd
  c.parallel = "shard_map"          # shard_map | pmap
  c.cache_features = False          # run the frozen backbone once, train the head on its output
  c.seed = 0
  c.log_every_steps = 20
  c.eval_every_steps = -1           # -1: at the end of every epoch
  c.checkpoint_every_steps = -1     # -1: at the end of every epoch
  c.keep_checkpoints = 2            # latest K
  c.keep_best_checkpoints = 1       # best N by validation accuracy
  c.prefetch = 2
  c.epoch_images = 512              # bench: one epoch's images in the cache_features comparison
  return c
