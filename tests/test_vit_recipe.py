"""The fine-tuning recipe of the Vision Transformers: layer-wise learning-rate decay (`layer_decay`,
checked against timm's own param groups and through an optimizer step), stochastic depth
(`drop_path_rate`, through the real training loop: deterministic, exact on resume, the same on 1
and 2 devices), the config keys of a ViT's options and their checks, and a trained run rebuilt
with the options it was trained with."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import final_params, flatten, preempt_and_resume, tiny_config
from transfer import checkpoint, metrics, models, optim, runs, train
from transfer import main as cli_main
from transfer.configs import default
from transfer.errors import UserError

# Our model -> the same-shaped timm VisionTransformer (keyword arguments) and the input side.
TIMM_TWINS = {
    "vit_b16_tiny": (dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2), 32),
    "dinov2_s14_reg4_tiny": (dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2,
                              reg_tokens=4, no_embed_class=True, init_values=1e-5), 28),
    "vit_s16": (dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6), 224),
}


def param_shapes(name, size, head="gap"):
  model = models.get(name, head=head, num_classes=1)
  return jax.eval_shape(lambda: models.init_params(model, size))


def timm_lr_scales(name, decay):
  """timm's `param_groups_layer_decay` on the same-shaped timm model: {param name: lr_scale}."""
  pytest.importorskip("torch")
  from torch_models import import_torchvision
  import_torchvision()  # timm imports torchvision: first, beside this CPU torch
  from timm.models.vision_transformer import VisionTransformer
  from timm.optim import param_groups_layer_decay
  kwargs, _ = TIMM_TWINS[name]
  net = VisionTransformer(num_classes=1, **kwargs)
  named = {id(p): n for n, p in net.named_parameters()}
  groups = param_groups_layer_decay(net, weight_decay=0.0, layer_decay=decay)
  return {named[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}


def ours_by_timm_name(name, multipliers):
  """Our per-layer multipliers under timm's parameter names (`blocks.0.attn.qkv.weight`)."""
  prefixes = {**models.spec(name).port.torch_names, "head": "head"}
  by_layer = {}
  for path, mult in zip(optim.param_paths(multipliers), jax.tree_util.tree_leaves(multipliers)):
    by_layer.setdefault(prefixes[path.split("/")[0]], set()).add(mult)
  assert all(len(m) == 1 for m in by_layer.values())  # one rate per layer
  return {prefix: m.pop() for prefix, m in by_layer.items()}


def run_config(model, **overrides):
  c = default.get_config()
  c.model, c.trainable, c.optimizer = model, [".*"], "sgd"
  for k, v in overrides.items():
    c[k] = v
  return c


# --- layer_decay ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TIMM_TWINS))
@pytest.mark.parametrize("decay", [0.75, 0.65])
def test_layer_decay_multipliers_are_timms_param_groups(name, decay):
  params = param_shapes(name, TIMM_TWINS[name][1])
  opt = optim.make_optimizer(params, run_config(name, layer_decay=decay), 10)
  ours = ours_by_timm_name(name, opt.multipliers)
  theirs = timm_lr_scales(name, decay)
  matched = {}
  for param, scale in theirs.items():
    prefix = max((p for p in ours if param == p or param.startswith(p + ".")), key=len)
    matched[param] = ours[prefix]
  assert set(ours) <= {max((p for p in ours if t == p or t.startswith(p + ".")), key=len)
                       for t in theirs}  # every layer of ours is one of timm's
  assert matched == theirs  # exactly: the same powers of the same float
  depth = TIMM_TWINS[name][0]["depth"]
  assert ours["head"] == 1.0 and ours["patch_embed.proj"] == decay ** (depth + 1)
  assert ours["norm"] == ours[f"blocks.{depth - 1}.mlp.fc2"] == decay  # with the last block


def test_an_sgd_step_scales_each_layer_by_decay_and_lr_mults_frozen_stays_frozen():
  """One SGD step (momentum 0.9: the first step is -lr * g, and momentum is state) on a gradient
  of ones: each parameter moves by -lr times its layer's scale, times its lr_mults multiple
  (they multiply, as timm's lr_scale multiplies a group's rate); frozen parameters do not move
  and hold no optimizer state."""
  name, lr, decay = "vit_b16_tiny", 0.1, 0.5
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), param_shapes(name, 32))
  config = run_config(name, learning_rate=lr, momentum=0.9, layer_decay=decay,
                      trainable=["^head/", "^block1_", "^final_norm/"],
                      lr_mults={"^block1_mlp_": 0.1})
  tx, labels = optim.make_optimizer(params, config, 10)
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  # depth 2: the head at 1, block1 and final_norm at decay, block0 at decay^2 (frozen here).
  want = {"head": 1.0, "final_norm": decay, "block1_norm1": decay, "block1_attn_qkv": decay,
          "block1_attn_proj": decay, "block1_norm2": decay, "block1_mlp_fc1": decay * 0.1,
          "block1_mlp_fc2": decay * 0.1}
  for path, update in flatten(jax.device_get(updates)).items():
    np.testing.assert_allclose(update, -lr * want.get(path.split("/")[0], 0.0), rtol=1e-6,
                               err_msg=path)
  trained, _ = optim.count_params(params, labels)
  state_sizes = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim)
  assert state_sizes == trained  # the momentum of the trained params only


def test_layer_decay_one_is_off_and_keeps_the_labels():
  params = param_shapes("vit_b16_tiny", 32)
  off = optim.make_optimizer(params, run_config("vit_b16_tiny"), 10)
  assert set(jax.tree_util.tree_leaves(off.labels)) == {optim.TRAINABLE}


def test_layer_decay_from_keywords_finds_the_architecture_of_the_params():
  params = param_shapes("vit_b16_tiny", 32)
  by_config = optim.make_optimizer(params, run_config("vit_b16_tiny", layer_decay=0.75), 10)
  by_keywords = optim.make_optimizer(params, trainable=[".*"], optimizer="sgd", layer_decay=0.75)
  assert by_keywords.labels == by_config.labels


def test_layer_decay_on_a_cnn_is_one_line_from_the_python_api():
  params = param_shapes("vgg16_tiny", 32)
  with pytest.raises(UserError, match=r"^layer_decay=0.5 scales each transformer block's rate; "
                                      r"vgg16\S* has no blocks"):
    optim.make_optimizer(params, trainable=[".*"], layer_decay=0.5)


# --- config keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["--config.model=resnet50_tiny", "--config.token_pool=gap"],
     "token_pool='gap' is an option of the transformer models; resnet50_tiny has no token_pool"),
    (["--config.model=vgg16_tiny", "--config.drop_path_rate=0.1"],
     "drop_path_rate=0.1 is an option of the transformer models; vgg16_tiny has no "
     "drop_path_rate"),
    (["--config.model=vgg16_tiny", "--config.attention=cudnn"],
     "attention='cudnn' is an option of the transformer models"),
    (["--config.model=resnet50_tiny", "--config.layer_decay=0.75"],
     "layer_decay=0.75 scales each transformer block's rate; resnet50_tiny has no blocks"),
    (["--config.model=vgg16_tiny", "--config.stages=[{'steps': 1}, "
      "{'steps': 1, 'layer_decay': 0.5}]"],
     "stages[1].layer_decay=0.5 scales each transformer block's rate; vgg16_tiny has no"),
    (["--config.model=vit_b16_tiny", "--config.layer_decay=0"],
     "layer_decay=0.0 is out of range: must be in (0, 1]"),
    (["--config.model=vit_b16_tiny", "--config.layer_decay=1.5"],
     "layer_decay=1.5 is out of range: must be in (0, 1]"),
    (["--config.model=vit_b16_tiny", "--config.drop_path_rate=1"],
     "drop_path_rate=1.0 is out of range: must be in [0, 1)"),
    (["--config.model=vit_b16_tiny", "--config.token_pool=cls"],
     "token_pool='cls' is not valid: must be one of auto, tok, gap, tok_gap, none"),
    (["--config.model=vit_b16_tiny", "--config.attention=flash"],
     "attention='flash' is not valid: must be one of auto, xla, cudnn"),
])
def test_bad_vit_options_are_one_line_before_anything_runs(overrides, message, monkeypatch,
                                                           capsys):
  ran = []
  monkeypatch.setattr(train, "main", lambda *a, **k: ran.append(a))
  with pytest.raises(SystemExit) as e:
    cli_main.main(["train", *overrides])
  assert e.value.code == 2 and not ran
  err = capsys.readouterr().err
  assert err.startswith(f"transfer: error: {message}") and err.count("\n") == 1


def test_vit_options_at_their_defaults_are_fine_on_a_cnn():
  from transfer import configs
  config = configs.validate(tiny_config(model="resnet50_tiny", head="gap"))
  assert runs.model_options(config) == {}
  assert runs.build_model(config, 2)[0].arch == "resnet50_tiny"


# --- a trained run keeps its options --------------------------------------------------------------


def vit_run(**overrides):
  """vit_b16_tiny, every layer training, SGD, 3 steps of 8 images at 32 px, stochastic depth 0.5,
  no head dropout: the head is a plain Dense on the pooled features."""
  base = dict(model="vit_b16_tiny", head="gap", head_dropout=0.0, trainable=[".*"],
              optimizer="sgd", learning_rate=0.05, num_steps=3, log_every_steps=1,
              eval_every_steps=3, checkpoint_every_steps=3, drop_path_rate=0.5)
  return tiny_config(**{**base, **overrides})


def test_a_token_pool_run_is_rebuilt_with_it_by_eval_and_old_records_get_the_default(tmp_path,
                                                                                      capsys):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(vit_run(token_pool="tok_gap", num_steps=2), workdir)
  variables, meta = checkpoint.load_trained_variables(workdir)
  run = meta["run"]
  assert (run["token_pool"], run["drop_path_rate"], run["attention"]) == ("tok_gap", 0.5, "xla")
  assert variables["params"]["head"]["logits"]["kernel"].shape == (64, 1)  # class token + mean
  model = runs.model_from_meta(run)
  assert (model.token_pool, model.drop_path_rate) == ("tok_gap", 0.5)
  capsys.readouterr()
  assert cli_main.run(["eval", "--workdir", workdir, "--json"]) == 0, capsys.readouterr().err
  old = {k: v for k, v in run.items() if k not in ("token_pool", "drop_path_rate", "attention",
                                                   "layer_decay")}
  assert runs.model_from_meta(old).token_pool == "tok"  # recorded before the keys existed
  with pytest.raises(UserError, match="token_pool"):  # resuming it as another pool: refused
    train.train_and_evaluate(vit_run(token_pool="gap", num_steps=4), workdir)


# --- stochastic depth -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted stochastic-depth run on the default 4 devices, and its params."""
  workdir = tmp_path_factory.mktemp("drop_path") / "ref"
  train.train_and_evaluate(vit_run(), str(workdir))
  return workdir, final_params(workdir)[0]


def train_losses(workdir):
  return [r["train_loss"] for r in metrics.read_metrics(str(workdir)) if "train_loss" in r]


def test_drop_path_changes_the_training_loss(reference, tmp_path):
  train.train_and_evaluate(vit_run(drop_path_rate=0.0), str(tmp_path / "plain"))
  dropped, plain = train_losses(reference[0]), train_losses(tmp_path / "plain")
  assert len(dropped) == len(plain) == 3
  assert dropped[0] != plain[0]  # the same params at step 1: only the dropped branches differ


def test_drop_path_with_the_same_seed_gives_bit_identical_params(reference, tmp_path):
  train.train_and_evaluate(vit_run(), str(tmp_path / "again"))
  again = final_params(tmp_path / "again")[0]
  for path, value in flatten(reference[1]).items():
    np.testing.assert_array_equal(flatten(again)[path], value, err_msg=path)


def test_drop_path_resumes_exactly(reference, tmp_path, monkeypatch):
  preempt_and_resume(vit_run, tmp_path / "run", 1, monkeypatch)
  got = final_params(tmp_path / "run")[0]
  for path, value in flatten(reference[1]).items():  # bitwise: same program, data and keys
    np.testing.assert_array_equal(flatten(got)[path], value, err_msg=path)


def test_drop_path_masks_do_not_depend_on_the_device_count(tmp_path):
  """Masks are keyed by each example's global index: 1 and 2 devices drop the same branches, so
  the params agree up to the order the gradient mean is summed in."""
  trained = []
  for n in (1, 2):
    train.train_and_evaluate(vit_run(), str(tmp_path / f"on{n}"), devices=jax.devices()[:n])
    trained.append(flatten(final_params(tmp_path / f"on{n}")[0]))
  plain = tmp_path / "plain"
  train.train_and_evaluate(vit_run(drop_path_rate=0.0), str(plain), devices=jax.devices()[:1])
  other = flatten(final_params(plain)[0])
  moved = max(float(np.abs(other[p] - v).max()) for p, v in trained[0].items())
  for path, value in trained[0].items():
    np.testing.assert_allclose(trained[1][path], value, rtol=0, atol=1e-3 * moved, err_msg=path)


def test_stochastic_depth_keeps_a_frozen_backbone_from_being_cached():
  """Frozen blocks drop branches in training too (as in timm), so their features are random:
  caching them once would train the head on other inputs than the uncached run."""
  from transfer import configs, features
  config = configs.validate(vit_run(trainable=["^head/"], augment="none", cache_features=True))
  labels = optim.make_optimizer(param_shapes("vit_b16_tiny", 32), config, 10).labels
  assert features.cache_features_reason(config, labels) == (
      "drop_path_rate=0.5 drops the backbone's branches at random")
  config.drop_path_rate = 0.0
  assert features.cache_features_reason(config, labels) is None
