"""The Vision Transformer weight files: torchvision, timm (Hugging Face Hub), Google's AugReg
`.npz` and DINOv2's own `.pth`, each with its publisher's own preprocessing and eval geometry.

Records only; `transfer.weights.sources` merges them into the one registry and answers every
question about them. Where each value comes from:

* torchvision (`torchvision/models/vision_transformer.py`, 0.28): the `ViT_*_Weights` enums'
  `url` (the 8 hex digits before `.pth` are the file's sha256 prefix, torch.hub's check) and
  `transforms`: `ImageClassification(crop_size=224)` for IMAGENET1K_V1 (resize 256, bilinear;
  ViT-L/16: `resize_size=242`); SWAG end-to-end fine-tunes at their training size (B/16: 384,
  L/16: 512, resize = crop, bicubic); SWAG linear-probe heads at 224/224, bicubic. All ImageNet
  mean/std.
* timm (`timm/models/vision_transformer.py` `default_cfgs`, 1.0.31): the weights live only on the
  Hugging Face Hub (`hf_hub_id='timm/'`), as `model.safetensors`, with no published hash. AugReg
  tags: mean/std 0.5 ([-1, 1], our `tf` mode), bicubic, `crop_pct` 0.9 at 224 (short side
  floor(224 / 0.9) = 248) and 1.0 at 384. DINOv2 tags: ImageNet mean/std, 518 at crop_pct 1.0,
  bicubic, no classifier (`num_classes=0`).
* Google's AugReg `.npz` (the `url` of timm's `augreg_in21k_ft_in1k` cfgs, gs://vit_models):
  google-research/vision_transformer's `vit_jax/input_pipeline.py` evaluates by resizing the
  whole image to the model's resolution (`tf.image.resize(im, [crop_size, crop_size])`, bilinear,
  no crop) and scaling `(im - 127.5) / 127.5`: our `tf` mode, squashed. The resolution is the
  file's `res_224` / `res_384`. No hash is published (the bucket's listing has md5s, the repo
  none).
* DINOv2 (`facebookresearch/dinov2`: `hubconf.py` / `dinov2/hub/backbones.py` URLs;
  `dinov2/data/transforms.py` `make_classification_eval_transform`, its linear evaluation):
  short side 256 bicubic, center 224, ImageNet mean/std. Backbones only, no hash published.
"""

from __future__ import annotations

import math

from transfer.weights.record import NO_HASH, TORCHVISION_URL, WeightSource

_HUB = "https://huggingface.co/timm"
_AUGREG = "https://storage.googleapis.com/vit_models/augreg"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"


def _torchvision(name: str, arch: str, file: str, resize_size: int, input_size: int = 224,
                 interpolation: str = "bilinear") -> WeightSource:
  """torchvision's `<file>.pth` (`<name>-<sha256 prefix>`), id `torchvision:<name>`."""
  return WeightSource(id=f"torchvision:{name}", arch=arch, url=f"{TORCHVISION_URL}/{file}.pth",
                      hash_kind="sha256_prefix", hash=file.rsplit("-", 1)[1],
                      format="torch_pth", include_top=True, preprocess="torch",
                      resize_size=resize_size, input_size=input_size,
                      interpolation=interpolation)


def _timm(tag: str, arch: str, size: int, crop_pct: float, preprocess: str,
          include_top: bool = True) -> WeightSource:
  """timm's `<arch>.<tag>` on the Hugging Face Hub, cached as `<tag>.safetensors` (every Hub
  file is called `model.safetensors`); timm's eval geometry, bicubic."""
  return WeightSource(id=f"timm:{tag}", arch=arch,
                      url=f"{_HUB}/{tag}/resolve/main/model.safetensors", hash_kind=NO_HASH,
                      hash="", format="safetensors", include_top=include_top,
                      preprocess=preprocess, resize_size=math.floor(size / crop_pct),
                      input_size=size, interpolation="bicubic", file=f"{tag}.safetensors")


def _augreg(timm_arch: str, arch: str, file: str) -> WeightSource:
  """Google's AugReg `<file>.npz` (ImageNet-21k, fine-tuned on ImageNet-1k at its `res_`),
  id `augreg:<timm's architecture name>` (the tag `<that>.augreg_in21k_ft_in1k` is its copy)."""
  size = int(file.rsplit("res_", 1)[1])
  return WeightSource(id=f"augreg:{timm_arch}", arch=arch, url=f"{_AUGREG}/{file}.npz",
                      hash_kind=NO_HASH, hash="", format="npz", include_top=True,
                      preprocess="tf", resize_size=None, input_size=size)


def _dinov2(size: str, registers: bool) -> WeightSource:
  """DINOv2's own `dinov2_vit<size>14[_reg4]_pretrain.pth`, id `dinov2:vit<size>14[_reg4]`."""
  reg = "_reg4" if registers else ""
  return WeightSource(id=f"dinov2:vit{size}14{reg}", arch=f"dinov2_{size}14{reg}",
                      url=f"{_DINOV2}/dinov2_vit{size}14/dinov2_vit{size}14{reg}_pretrain.pth",
                      hash_kind=NO_HASH, hash="", format="torch_pth", include_top=False,
                      preprocess="torch", resize_size=256, input_size=224,
                      interpolation="bicubic")


_IN1K = "imagenet2012-steps_20k"
SOURCES: tuple[WeightSource, ...] = (
    _torchvision("vit_b_16", "vit_b16", "vit_b_16-c867db91", 256),
    _torchvision("vit_b_16_swag", "vit_b16", "vit_b_16_swag-9ac1b537", 384, 384, "bicubic"),
    _torchvision("vit_b_16_swag_linear", "vit_b16", "vit_b_16_lc_swag-4e70ced5", 224, 224,
                 "bicubic"),
    _torchvision("vit_b_32", "vit_b32", "vit_b_32-d86f8d99", 256),
    _torchvision("vit_l_16", "vit_l16", "vit_l_16-852ce7e3", 242),
    _torchvision("vit_l_16_swag", "vit_l16", "vit_l_16_swag-4f3808c9", 512, 512, "bicubic"),
    _torchvision("vit_l_16_swag_linear", "vit_l16", "vit_l_16_lc_swag-4d563306", 224, 224,
                 "bicubic"),
    _timm("vit_small_patch16_224.augreg_in21k_ft_in1k", "vit_s16", 224, 0.9, "tf"),
    _timm("vit_small_patch16_384.augreg_in21k_ft_in1k", "vit_s16", 384, 1.0, "tf"),
    _timm("vit_base_patch16_224.augreg2_in21k_ft_in1k", "vit_b16", 224, 0.9, "tf"),
    _timm("vit_base_patch16_224.augreg_in21k_ft_in1k", "vit_b16", 224, 0.9, "tf"),
    _timm("vit_base_patch16_384.augreg_in21k_ft_in1k", "vit_b16", 384, 1.0, "tf"),
    _timm("vit_base_patch32_224.augreg_in21k_ft_in1k", "vit_b32", 224, 0.9, "tf"),
    _timm("vit_base_patch32_384.augreg_in21k_ft_in1k", "vit_b32", 384, 1.0, "tf"),
    _timm("vit_large_patch16_224.augreg_in21k_ft_in1k", "vit_l16", 224, 0.9, "tf"),
    _timm("vit_large_patch16_384.augreg_in21k_ft_in1k", "vit_l16", 384, 1.0, "tf"),
    *(_timm(f"vit_{name}_patch14{reg}_dinov2.lvd142m", f"dinov2_{size}14{reg}", 518, 1.0,
            "torch", include_top=False)
      for name, size in (("small", "s"), ("base", "b"), ("large", "l"))
      for reg in ("", "_reg4")),
    _augreg("vit_small_patch16_224", "vit_s16",
            f"S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--{_IN1K}-lr_0.03-res_224"),
    _augreg("vit_small_patch16_384", "vit_s16",
            f"S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--{_IN1K}-lr_0.03-res_384"),
    _augreg("vit_base_patch16_224", "vit_b16",
            f"B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--{_IN1K}-lr_0.01-res_224"),
    _augreg("vit_base_patch16_384", "vit_b16",
            f"B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--{_IN1K}-lr_0.01-res_384"),
    _augreg("vit_base_patch32_224", "vit_b32",
            f"B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0--{_IN1K}-lr_0.03-res_224"),
    _augreg("vit_base_patch32_384", "vit_b32",
            f"B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0--{_IN1K}-lr_0.03-res_384"),
    _augreg("vit_large_patch16_224", "vit_l16",
            f"L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--{_IN1K}-lr_0.01-res_224"),
    _augreg("vit_large_patch16_384", "vit_l16",
            f"L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--{_IN1K}-lr_0.01-res_384"),
    *(_dinov2(size, registers) for size in "sbl" for registers in (False, True)),
)
