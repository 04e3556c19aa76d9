"""The config `transfer bench` uses unless given `--config`: the blog job at full size.

VGG16 with the blog head (Flatten, Dense 256 relu, Dropout 0.6, Dense 1 sigmoid), conv base frozen,
Adam, batch 32 at 224x224, random weights (timing does not depend on their values) and batches
generated on the device, so nothing is downloaded or decoded:

    transfer bench                                  # train step: table with images/s, MFU
    transfer bench --mode=forward --json            # the forward pass alone, one JSON line
    transfer bench --config.trainable='^head/,^block5'  # block5 trains too
    transfer bench --config.cache_features=true     # + one head epoch on cached features
    transfer bench --mode=input --config.dataset=folder:DIR --config.augment=crop_flip

`dtype="auto"` computes in bfloat16 on GPU/TPU and in float32 on CPU, where XLA runs bfloat16
convolutions through float32 and gains nothing. Expect a train/forward time ratio near 1.0 with
the conv base frozen (the step differentiates only the head). Figures: docs/BENCHMARKS.md.
"""

from transfer.configs import default


def get_config():
  c = default.get_config()
  c.weights = "none"
  c.dataset = "synthetic"
  c.augment = "none"
  c.image_size = 224
  c.batch_size = 32
  c.dtype = "auto"          # bfloat16 on GPU/TPU, float32 on CPU
  return c
