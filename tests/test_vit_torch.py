"""ViT and DINOv2 parity with their real writers, through the user's path.

Each publisher's own code writes the file and computes the reference: timm (`timm.create_model`
with random weights, saved as `.safetensors` and `.pth`), torchvision's `VisionTransformer`, an
AugReg-layout `.npz` read by timm's own npz loader, and DINOv2-layout state dicts (with
non-trivial LayerScale, with and without registers) read by timm's DINOv2 converter. Every
LayerNorm gets random scales and shifts, so a mis-ported norm cannot hide. `transfer predict`
must give the framework's probabilities, with the framework's own eval transform, and
`create_model(M, weights=FILE, num_classes=0)` its pooled features. Position embeddings trained
at another resolution are resampled as each framework does it (AugReg at 384, torchvision at
384, DINOv2 at 224 from its 518 grid).

The models are the registered tiny variants (`vit_b16_tiny`: B/16's layout at width 32 with 2 blocks;
`dinov2_s14_tiny`, `dinov2_s14_reg4_tiny`), built on the reference side with the same hyper-parameters.
"""

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

import transfer  # noqa: E402
from helpers import cli_probabilities  # noqa: E402
from torch_models import import_torchvision  # noqa: E402

TINY = dict(embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def timm():
  import_torchvision()
  return pytest.importorskip("timm")


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
  """A 300 x 260 photo-like image (smooth gradients and noise), so resize filters matter."""
  rng = np.random.default_rng(7)
  y, x = np.mgrid[0:260, 0:300]
  base = np.stack([x / 300.0, y / 260.0, (x + y) / 560.0], axis=-1) * 200
  pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
  path = tmp_path_factory.mktemp("photo") / "photo.png"
  Image.fromarray(pixels).save(path)
  return str(path)


def randomize(module, seed: int = 0):
  """Random weights everywhere, LayerNorm and LayerScale included (scales around 1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("gamma"):
        p.copy_(0.5 + 0.5 * noise.abs())  # LayerScale far from timm's 1e-5 init
      elif p.ndim == 1 and ("norm" in name or ".ln" in name or name.startswith("ln")):
        p.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.2 * noise)
      else:
        p.copy_(0.05 * noise)
  return module.eval()


def save(state, path):
  """A state dict as `.safetensors` or `.pth`, by `path`'s suffix."""
  state = {k: v.detach().contiguous() for k, v in state.items()}
  if str(path).endswith(".safetensors"):
    from safetensors.torch import save_file
    save_file(state, str(path))
  else:
    torch.save(state, str(path))
  return str(path)


def timm_probabilities(timm, model, image_path):
  """timm's own eval transform (the model's pretrained cfg) and softmax, as a timm user runs it."""
  config = timm.data.resolve_data_config({}, model=model)
  x = timm.data.create_transform(**config)(Image.open(image_path).convert("RGB"))[None]
  with torch.no_grad():
    return torch.softmax(model(x), dim=-1).numpy()


def nhwc(x):
  return np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))


def features(name, path, x, **kw):
  model, variables = transfer.create_model(name, weights=path, num_classes=0, **kw)
  return np.asarray(model.apply(variables, nhwc(x)))


def timm_features(model, x):
  with torch.no_grad():
    return model.forward_head(model.forward_features(x), pre_logits=True).numpy()


# -- timm ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_augreg_file_predicts_as_timm(timm, tmp_path, photo_path, capsys, suffix):
  net = randomize(timm.create_model("vit_base_patch16_224.augreg2_in21k_ft_in1k",
                                    pretrained=False, **TINY))
  path = save(net.state_dict(), tmp_path / f"augreg{suffix}")
  ours = cli_probabilities(["predict", "--model", "vit_b16_tiny", "--weights", path, photo_path],
                           capsys)
  np.testing.assert_allclose(ours, timm_probabilities(timm, net, photo_path), atol=1e-4)


def test_timm_features_and_resampling_to_384(timm, tmp_path):
  net = randomize(timm.create_model("vit_base_patch16_224", pretrained=False, **TINY))
  path = save(net.state_dict(), tmp_path / "augreg.safetensors")
  x = torch.randn(2, 3, 224, 224)
  np.testing.assert_allclose(features("vit_b16_tiny", path, x), timm_features(net, x),
                             rtol=1e-4, atol=1e-5)
  # timm at 384 loads the 224 file through its own filter (resample_abs_pos_embed).
  big = timm.create_model("vit_base_patch16_384", pretrained=False, num_classes=1000, **TINY)
  big.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(
      dict(net.state_dict()), big))
  x = torch.randn(2, 3, 384, 384)
  np.testing.assert_allclose(features("vit_b16_tiny", path, x, image_size=384),
                             timm_features(big.eval(), x), rtol=1e-4, atol=1e-5)


# -- torchvision --------------------------------------------------------------------------------

def _torchvision_vit(image_size=224):
  tv = import_torchvision()
  from torchvision.models.vision_transformer import VisionTransformer
  return tv, VisionTransformer(image_size=image_size, patch_size=16, num_layers=2, num_heads=2,
                               hidden_dim=32, mlp_dim=128)


def test_torchvision_file_predicts_as_torchvision(tmp_path, photo_path, capsys):
  tv, net = _torchvision_vit()
  net = randomize(net)
  path = save(net.state_dict(), tmp_path / "vit.pth")
  ours = cli_probabilities(["predict", "--model", "vit_b16_tiny", "--weights", path, photo_path],
                           capsys)
  # torchvision's own transform of its IMAGENET1K_V1 ViT weights: resize 256, crop 224, bilinear.
  transform = tv.models.ViT_B_16_Weights.IMAGENET1K_V1.transforms()
  x = transform(Image.open(photo_path).convert("RGB"))[None]
  with torch.no_grad():
    ref = torch.softmax(net(x), dim=-1).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_torchvision_features_and_interpolate_embeddings_to_384(tmp_path):
  tv, net = _torchvision_vit()
  net = randomize(net)
  path = save(net.state_dict(), tmp_path / "vit.pth")
  from torchvision.models.vision_transformer import interpolate_embeddings
  _, big = _torchvision_vit(384)
  big.load_state_dict(interpolate_embeddings(384, 16, dict(net.state_dict())))
  big.eval()
  for size, ref in ((224, net), (384, big)):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():  # torchvision's classifier input: the final-normed class token
      tokens = ref.encoder(torch.cat([ref.class_token.expand(2, -1, -1),
                                      ref._process_input(x)], dim=1))
    np.testing.assert_allclose(features("vit_b16_tiny", path, x, image_size=size),
                               tokens[:, 0].numpy(), rtol=1e-4, atol=1e-5)


# -- Google's AugReg .npz -----------------------------------------------------------------------

def augreg_npz(path, seed=0, width=32, depth=2, heads=2, patch=16, grid=14, classes=1000):
  """Random arrays under the vision_transformer / big_vision Flax names and layouts."""
  rng = np.random.default_rng(seed)
  r = lambda *shape, scale=0.05: (rng.standard_normal(shape) * scale).astype(np.float32)
  norm = lambda prefix: {f"{prefix}/scale": 1 + r(width, scale=0.2),
                         f"{prefix}/bias": r(width, scale=0.2)}
  hd = width // heads
  arrays = {"embedding/kernel": r(patch, patch, 3, width), "embedding/bias": r(width),
            "cls": r(1, 1, width),
            "Transformer/posembed_input/pos_embedding": r(1, 1 + grid * grid, width),
            **norm("Transformer/encoder_norm"),
            "head/kernel": r(width, classes), "head/bias": r(classes)}
  for i in range(depth):
    b = f"Transformer/encoderblock_{i}"
    arrays.update({**norm(f"{b}/LayerNorm_0"), **norm(f"{b}/LayerNorm_2"),
                   f"{b}/MlpBlock_3/Dense_0/kernel": r(width, 4 * width),
                   f"{b}/MlpBlock_3/Dense_0/bias": r(4 * width),
                   f"{b}/MlpBlock_3/Dense_1/kernel": r(4 * width, width),
                   f"{b}/MlpBlock_3/Dense_1/bias": r(width),
                   f"{b}/MultiHeadDotProductAttention_1/out/kernel": r(heads, hd, width),
                   f"{b}/MultiHeadDotProductAttention_1/out/bias": r(width)})
    for part in ("query", "key", "value"):
      arrays[f"{b}/MultiHeadDotProductAttention_1/{part}/kernel"] = r(width, heads, hd)
      arrays[f"{b}/MultiHeadDotProductAttention_1/{part}/bias"] = r(heads, hd)
  np.savez(path, **arrays)
  return str(path)


def test_augreg_npz_matches_timms_npz_loader(timm, tmp_path, photo_path, capsys):
  path = augreg_npz(tmp_path / "S_16-i21k-augreg.npz")
  net = timm.create_model("vit_base_patch16_224.augreg_in21k_ft_in1k", pretrained=False, **TINY)
  timm.models.vision_transformer._load_weights(net, path)
  net.eval()
  x = torch.randn(2, 3, 224, 224)
  np.testing.assert_allclose(features("vit_b16_tiny", path, x), timm_features(net, x),
                             rtol=1e-4, atol=1e-5)
  # Recognised by structure under any name, with AugReg's [-1, 1] input.
  renamed = tmp_path / "weights.bin"
  renamed.write_bytes(open(path, "rb").read())
  ours = cli_probabilities(["predict", "--model", "vit_b16_tiny", "--weights", str(renamed),
                            photo_path], capsys)
  source = transfer.weights.sources.resolve(str(renamed))
  assert source.arch == "vit_b16_tiny" and source.preprocess == "tf"
  # Google's eval: the whole image squashed to the file's 224 (bilinear), then [-1, 1].
  assert (source.resize_size, source.input_size) == (None, 224)
  pixels = Image.open(photo_path).convert("RGB").resize((224, 224), Image.BILINEAR)
  x = torch.from_numpy(np.asarray(pixels, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)
  with torch.no_grad():
    ref = torch.softmax(net(x), dim=-1).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4)


# -- DINOv2 -------------------------------------------------------------------------------------

def dinov2_state(timm, registers: bool, seed=0):
  """A DINOv2-layout state dict (as `dinov2_vits14_pretrain.pth` holds it: `mask_token`, the
  class token's position row inside `pos_embed`, `register_tokens`), at DINOv2's 518 grid."""
  name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
  net = randomize(timm.create_model(name, pretrained=False, **TINY), seed)
  state = dict(net.state_dict())
  rng = torch.Generator().manual_seed(seed + 1)
  state["mask_token"] = torch.randn(1, 32, generator=rng)
  if registers:  # timm folded the class token's position row into cls_token; DINOv2 does not.
    cls_pos = 0.05 * torch.randn(1, 1, 32, generator=rng)
    state["register_tokens"] = state.pop("reg_token")
    state["cls_token"] = state["cls_token"] - cls_pos
    state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
  return state


def dinov2_interpolated(state, size, patch=14):
  """DINOv2's own `interpolate_pos_encoding` for models without registers: bicubic with
  `scale_factor=(grid + 0.1) / 37`, no antialias."""
  import torch.nn.functional as F
  pos = state["pos_embed"]
  old = int(round((pos.shape[1] - 1) ** 0.5))
  grid = size // patch
  scale = (grid + 0.1) / old
  patches = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
  patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic",
                          antialias=False)
  assert patches.shape[-1] == grid
  return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_file_at_224_matches_dinov2(timm, tmp_path, registers):
  state = dinov2_state(timm, registers)
  path = save(state, tmp_path / "dinov2.pth")
  name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
  ref = timm.create_model(name, pretrained=False, img_size=224, **TINY)
  ref_state = dict(state)
  if not registers:  # DINOv2 interpolates at run time; timm's filter then leaves it as is
    ref_state["pos_embed"] = dinov2_interpolated(state, 224)
  # timm's DINOv2 converter (mask_token dropped, registers renamed and the class row folded);
  # with registers DINOv2 interpolates as timm does (antialias, no offset).
  ref.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(ref_state, ref))
  ref.eval()
  x = torch.randn(2, 3, 224, 224)
  ours = features("dinov2_s14_reg4_tiny" if registers else "dinov2_s14_tiny", path, x)
  np.testing.assert_allclose(ours, timm_features(ref, x), rtol=1e-4, atol=1e-5)
  # DINOv2's linear-probe input: the class token and the mean of the patch tokens.
  model, variables = transfer.create_model("dinov2_s14_reg4_tiny" if registers else "dinov2_s14_tiny",
                                           weights=path, num_classes=0)
  probe = model.clone(token_pool="tok_gap").apply(variables, nhwc(x))
  with torch.no_grad():
    tokens = ref.forward_features(x)
  want = torch.cat([tokens[:, 0], tokens[:, ref.num_prefix_tokens:].mean(1)], dim=-1)
  np.testing.assert_allclose(np.asarray(probe), want.numpy(), rtol=1e-4, atol=1e-5)


def test_dinov2_files_are_recognised_by_structure(timm, tmp_path):
  for registers, arch in ((False, "dinov2_s14_tiny"), (True, "dinov2_s14_reg4_tiny")):
    path = save(dinov2_state(timm, registers), tmp_path / f"r{registers}.bin")
    source = transfer.weights.sources.resolve(path)
    assert source.arch == arch and source.preprocess == "torch" and source.input_size == 224


@pytest.mark.parametrize("arch,name", [("vit_b16_tiny", "vit_base_patch16_224"),
                                       ("dinov2_s14_reg4_tiny", "vit_small_patch14_reg4_dinov2")])
def test_export_writes_a_state_dict_timm_loads_strictly(timm, arch, name):
  from transfer import models
  from transfer.weights import export
  model, variables = transfer.create_model(arch, include_top=True)
  net = timm.create_model(name, pretrained=False, img_size=224, num_classes=1000, **TINY).eval()
  state = export.torch_state_dict(variables["params"], models.spec(arch))
  if "reg4" in arch:  # timm's DINOv2 with registers folds the class token's position row in
    state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
    state["pos_embed"] = state["pos_embed"][:, 1:]
  net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                      strict=True)
  x = torch.randn(2, 3, 224, 224)
  with torch.no_grad():
    ref = net(x).numpy()
  np.testing.assert_allclose(np.asarray(model.apply(variables, nhwc(x))), ref,
                             rtol=1e-4, atol=1e-5)


def test_weights_info_names_our_layer_for_each_of_the_files(tmp_path, capsys):
  """`transfer weights info` on another publisher's file: each of its layers beside ours."""
  from transfer import main as cli
  _, net = _torchvision_vit()
  paths = {"torchvision": save(net.state_dict(), tmp_path / "vit.pth"),
           "npz": augreg_npz(tmp_path / "augreg.npz")}
  for kind, path in paths.items():
    capsys.readouterr()
    assert cli.run(["weights", "info", path]) == 0
    out = capsys.readouterr().out
    assert "arch: vit_b16_tiny" in out
    qkv = ("encoder.layers.encoder_layer_1.self_attention (block1_attn_qkv)"
           if kind == "torchvision" else
           "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key (block1_attn_qkv)")
    assert qkv in out, out
