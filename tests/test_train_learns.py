"""The tiny config learns; gradient accumulation averages micro-batch gradients."""
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax import config as config_lib
from lseg_jax import sharding
from lseg_jax import state as state_lib
from lseg_jax import train

pytestmark = pytest.mark.slow


def tiny_config(arg=None):
  """configs/synthetic_tiny.py's config, completed with the library defaults."""
  return config_lib.complete(importlib.import_module("configs.synthetic_tiny").get_config(arg))


def test_tiny_config_learns(tmp_path):
  # The config's own 600 steps: since training resizes with Pillow, 300 steps (the
  # poly schedule squeezed into them) ended at 0.54x the first logged loss, a
  # trajectory away from the 0.5x asked below; the full schedule ends near 0.3x.
  config = tiny_config()
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 0
  config.progress_bar = False
  config.mesh.data = 1  # one device: 8 forced host devices would only share 2 cores
  config.data.data_dir = str(tmp_path / "tfds")
  summary = train.train_and_evaluate(config, str(tmp_path / "work"))
  records = [json.loads(x) for x in open(tmp_path / "work" / train.METRICS_FILE)]
  train_losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(train_losses) == config.total_steps // config.log_every_steps
  # Chance: predicting background everywhere scores mIoU ~0.13 on this data.
  assert train_losses[-1] < 0.5 * train_losses[0], train_losses
  assert summary["eval"]["eval/miou"] > 0.45, (summary["eval"], train_losses)
  assert summary["eval"]["eval/pixacc"] > 0.85, summary["eval"]


def test_gradient_accumulation_averages_micro_batches():
  """Two identical micro-batches give the parameters of one plain step on one of them
  (BatchNorm statistics then differ: they are updated once per micro-batch)."""
  config = tiny_config("runlocal")
  config.model.backbone = "tiny_vit32"
  config.batch_size = 4
  config.mesh.data = 1
  mesh = sharding.make_mesh(config.mesh)
  rng = np.random.default_rng(0)
  half = {"image": rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
          "label": rng.integers(-1, 6, (4, 32, 32)).astype(np.int32),
          "label_mask": np.ones((4, 6), bool)}
  text_emb = jnp.asarray(rng.normal(size=(6, 16)).astype(np.float32))

  spec = state_lib.state_spec(config, mesh)
  plain = jax.jit(train.make_train_step(spec, tuple(config.optim.frozen), 1, mesh))
  state0 = state_lib.init_state(spec, tuple(config.optim.frozen))()
  want, want_m = plain(state0, half, text_emb)

  config.batch_size = 8
  config.optim.accum_steps = 2
  config.optim.base_lr /= 2  # the lr scales with the batch: keep it as above
  spec2 = state_lib.state_spec(config, mesh)
  accum = jax.jit(train.make_train_step(spec2, tuple(config.optim.frozen), 2, mesh))
  # Example i goes to micro-batch i % 2: interleave two copies of `half`.
  doubled = {k: np.repeat(v, 2, axis=0) for k, v in half.items()}
  got, got_m = accum(state0, doubled, text_emb)

  assert float(got_m["loss"]) == pytest.approx(float(want_m["loss"]), rel=1e-6)
  assert int(got_m["valid"]) == 2 * int(want_m["valid"])
  for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"])):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 1e-6 * max(np.max(np.abs(b)), 1e-30)
  assert int(got["rest"]["scratch"]["refinenet1"]["resConfUnit1"]["bn1"][
      "num_batches_tracked"]) == 2
