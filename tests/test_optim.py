"""The paper's optimizer: schedule, torch-SGD equivalence, frozen text tower, lr multipliers."""
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax import optim
from lseg_jax import sharding
from lseg_jax.models import lseg


def _cfg(**overrides):
  cfg = optim.default_optim_config()
  cfg.update(overrides)
  return cfg


def _tiny_abstract():
  return nnx.eval_shape(lambda: lseg.LSeg(
      lseg.LSegConfig(backbone="tiny_vit32", text_vocab_size=64), rngs=nnx.Rngs(0)))


def test_poly_schedule_and_batch_scaling():
  cfg = _cfg()
  assert optim.base_learning_rate(cfg, 16) == pytest.approx(0.004)
  assert optim.base_learning_rate(cfg, 64) == pytest.approx(0.016)
  assert optim.base_learning_rate(_cfg(lr_scale_batch=None), 64) == pytest.approx(0.004)
  schedule = optim.lr_schedule(0.016, 100)
  for t in (0, 1, 37, 99, 100):
    assert float(schedule(t)) == pytest.approx(0.016 * (1 - t / 100) ** 0.9, rel=1e-5, abs=1e-9)
  warm = optim.lr_schedule(1.0, 100, warmup_steps=10)
  assert float(warm(5)) == pytest.approx(0.5)
  assert float(warm(10)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="warmup_steps=100"):
    optim.lr_schedule(1.0, 100, warmup_steps=100)


# torch.optim imports triton, which crashes once TensorFlow is loaded in the same
# process (as other tests do): the torch reference runs in its own interpreter.
_TORCH_SGD = """
import sys
import numpy as np
import torch
data = np.load(sys.argv[1])
total, base = int(data["total"]), float(data["base"])
p = {k: torch.nn.Parameter(torch.tensor(data[k])) for k in ("pretrained", "scratch")}
opt = torch.optim.SGD([{"params": [p["pretrained"]], "lr": base},
                       {"params": [p["scratch"]], "lr": base * 10}],
                      lr=base, momentum=0.9, weight_decay=1e-4)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda x: pow(1.0 - x / total, 0.9))
for i in range(int(data["steps"])):
  for k in p:
    p[k].grad = torch.tensor(data[f"grad{i}_{k}"])
  opt.step()
  sched.step()
np.savez(sys.argv[2], **{k: v.detach().numpy() for k, v in p.items()})
"""


def test_update_matches_torch_sgd_param_groups(tmp_path):
  pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  params = {"pretrained": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
            "scratch": {"w": rng.normal(size=(5,)).astype(np.float32)}}
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
           for _ in range(4)]
  total = 10
  tx, _ = optim.make_optimizer(_cfg(base_lr=0.1), params, total_steps=total,
                               global_batch_size=32)
  state = tx.init(params)
  ours = params
  for g in grads:
    updates, state = tx.update(g, state, ours)
    ours = jax.tree.map(lambda p, u: p + u, ours, updates)

  # The official recipe: SGD param groups (scratch at 10x), LambdaLR poly decay, with
  # lang-seg's lr = base_lr / 16 * batch.
  arrays = {k: v["w"] for k, v in params.items()}
  arrays.update({f"grad{i}_{k}": g[k]["w"] for i, g in enumerate(grads) for k in g})
  np.savez(tmp_path / "in.npz", total=total, base=0.1 / 16 * 32, steps=len(grads), **arrays)
  subprocess.run([sys.executable, "-c", _TORCH_SGD, str(tmp_path / "in.npz"),
                  str(tmp_path / "out.npz")], check=True, capture_output=True)
  want = np.load(tmp_path / "out.npz")
  for k in params:
    got = np.asarray(ours[k]["w"])
    assert np.max(np.abs(got - want[k])) / np.max(np.abs(want[k])) < 1e-6, k


def test_frozen_text_tower_is_not_in_the_optimizer():
  model = _tiny_abstract()
  _, params, frozen, rest = optim.partition(model, ("clip_pretrained/.*",))
  param_names = sharding.names(params)
  assert param_names and not any(n.startswith("clip_pretrained/") for n in param_names)
  assert all(n.startswith("clip_pretrained/") for n in sharding.names(frozen))
  assert len(sharding.names(frozen)) == len(sharding.names(nnx.state(model.clip_pretrained)))
  assert all("mean" in n or "var" in n or "num_batches" in n for n in sharding.names(rest))
  tx, _ = optim.make_optimizer(optim.default_optim_config(), params, total_steps=10,
                               global_batch_size=16)
  opt_state = jax.eval_shape(tx.init, params)
  assert not any("clip_pretrained" in n for n in sharding.names(opt_state))


def test_lr_multipliers_and_frozen_on_the_update():
  """One step with gradient 1 everywhere: the update is -lr * mult per parameter, and the
  text tower (not in the optimizer) cannot change."""
  model = _tiny_abstract()
  _, params, _, _ = optim.partition(model, ("clip_pretrained/.*",))
  params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), params)
  cfg = _cfg(base_lr=0.01, momentum=0.9, weight_decay=0.0)
  tx, schedule = optim.make_optimizer(cfg, params, total_steps=100, global_batch_size=16)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  lr = float(schedule(0))
  assert lr == pytest.approx(0.01)
  seen = set()
  for name, u in zip(sharding.names(updates), jax.tree.leaves(updates)):
    mult = 10.0 if name.startswith("scratch/") else 1.0
    assert name.split("/")[0] in ("pretrained", "scratch"), name
    np.testing.assert_allclose(np.asarray(u), -lr * mult, rtol=1e-6, err_msg=name)
    seen.add(name.split("/")[0])
  assert seen == {"pretrained", "scratch"}


def test_weight_decay_is_added_to_the_gradient_with_mask():
  params = {"a": {"kernel": jnp.full((2,), 2.0)}, "b": {"bias": jnp.full((2,), 2.0)}}
  cfg = _cfg(base_lr=1.0, lr_scale_batch=None, momentum=0.0, weight_decay=0.5,
             lr_mults=(), no_decay=(".*/bias",))
  tx, _ = optim.make_optimizer(cfg, params, total_steps=10, global_batch_size=1)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["a"]["kernel"], -1.0)  # -(0 + 0.5 * 2)
  np.testing.assert_allclose(updates["b"]["bias"], 0.0)


def test_gradient_clipping_acts_on_raw_gradients():
  params = {"w": jnp.zeros((2,))}
  cfg = _cfg(base_lr=1.0, lr_scale_batch=None, momentum=0.0, weight_decay=0.0, lr_mults=(),
             grad_clip_norm=1.0)
  tx, _ = optim.make_optimizer(cfg, params, total_steps=10, global_batch_size=1)
  updates, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)


def test_bad_rules_fail_clearly():
  params = {"w": jnp.zeros((2,))}
  with pytest.raises(ValueError, match="invalid regex"):
    optim.lr_multipliers(params, (("scratch/(", 10.0),))
  with pytest.raises(ValueError, match="freeze parameters with optim.frozen"):
    optim.lr_multipliers(params, (("w", 0),))
  with pytest.raises(ValueError, match="single string"):
    optim.trainable_filter("clip_pretrained/.*")
  with pytest.raises(ValueError, match=r"\(regex, value\) pair"):
    optim.lr_multipliers(params, ("scratch",))
