"""Fast checks of the training pieces: loss, metric writer, config checks, init hooks."""
import json

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lseg_jax import checkpoint
from lseg_jax import config as config_lib
from lseg_jax import init
from lseg_jax import losses
from lseg_jax import sharding
from lseg_jax import text
from lseg_jax import train
from lseg_jax import train_utils
from lseg_jax.convert import clip_openai, mapping, timm_vit
from lseg_jax.models import lseg
from lseg_jax.models import resize


def test_cross_entropy_matches_torch_ignore_index():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
  labels = rng.integers(-1, 4, size=(2, 5, 6)).astype(np.int32)
  loss, count = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  want = torch.nn.CrossEntropyLoss(ignore_index=-1)(
      torch.tensor(logits).permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.long))
  assert float(loss) == pytest.approx(float(want), rel=1e-6)
  assert int(count) == int((labels >= 0).sum())


def test_masked_labels_get_no_probability_and_finite_gradients():
  logits = jnp.array([[[[2.0, 1.0, 0.5]]], [[[0.3, 0.2, 0.1]]]])  # [2, 1, 1, 3]
  mask = jnp.array([[True, False, True], [False, False, True]])
  labels = jnp.array([[[0]], [[-1]]])  # the ignored pixel's label 0 is masked

  def f(x):
    x = jnp.where(mask[:, None, None, :], x, -jnp.inf)
    return losses.cross_entropy(x, labels)[0]
  loss, grad = jax.value_and_grad(f)(logits)
  want = -jax.nn.log_softmax(jnp.array([2.0, 0.5]))[0]
  assert float(loss) == pytest.approx(float(want), rel=1e-6)
  assert np.isfinite(np.asarray(grad)).all()
  assert float(grad[0, 0, 0, 1]) == 0.0 and not np.asarray(grad[1]).any()
  assert float(losses.cross_entropy(logits, jnp.full((2, 1, 1), -1))[0]) == 0.0
  correct, valid = losses.pixel_accuracy_counts(logits, jnp.array([[[0]], [[2]]]))
  assert (int(correct), int(valid)) == (1, 2)


def test_upsampled_loss_on_phases_equals_the_full_size_loss():
  """The training loss scores the x2 upsampling's phases; the same logits as the model's
  full-size output, so the same loss, counts and gradient (sums in another order:
  float32 rounding, 1e-6 relative), with masked labels and ignored pixels."""
  rng = np.random.default_rng(0)
  half = jnp.asarray(rng.normal(size=(2, 5, 7, 4)).astype(np.float32))
  labels = jnp.asarray(rng.integers(-1, 4, size=(2, 10, 14)).astype(np.int32))
  mask = jnp.array([[True, True, False, True], [True, True, True, True]])
  labels = jnp.where((labels == 2) & ~mask[:, 2, None, None], -1, labels)

  def full(x):
    logits = resize.upsample2x_align_corners(jnp.where(mask[:, None, None, :], x, 0.0))
    logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
    loss, count = losses.cross_entropy(logits, labels)
    return loss, (count, losses.pixel_accuracy_counts(logits, labels)[0])

  def phased(x):
    loss, count, correct = losses.upsampled_loss_and_accuracy(
        jnp.where(mask[:, None, None, :], x, 0.0), labels, mask)
    return loss, (count, correct)
  (want, (count, correct)), want_grad = jax.value_and_grad(full, has_aux=True)(half)
  (got, (got_count, got_correct)), grad = jax.value_and_grad(phased, has_aux=True)(half)
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  assert (int(got_count), int(got_correct)) == (int(count), int(correct))
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="half size"):
    losses.upsampled_loss_and_accuracy(half, labels[:, :9], mask)


def test_metric_writer_one_object_per_step_and_resume_truncation(tmp_path):
  w = train_utils.MetricWriter(str(tmp_path), resume_step=None)
  w.write(1, {"train/loss": 2.0})
  w.write(2, {"train/loss": 1.5})
  w.write(2, {"eval/miou": 0.25})
  w.write(3, {"train/loss": 1.0})
  w.close()
  lines = [json.loads(x) for x in open(tmp_path / train_utils.METRICS_FILE)]
  assert lines == [{"step": 1, "train/loss": 2.0},
                   {"step": 2, "train/loss": 1.5, "eval/miou": 0.25},
                   {"step": 3, "train/loss": 1.0}]
  train_utils.MetricWriter(str(tmp_path), resume_step=2).close()
  assert [json.loads(x)["step"] for x in open(tmp_path / train_utils.METRICS_FILE)] == [1, 2]


def test_config_and_batch_checks():
  c = ml_collections.ConfigDict(dict(seed=0, batch_size=8, total_steps=0, log_every_steps=1,
                                     eval_every_steps=0, checkpoint_every_steps=0))
  with pytest.raises(ValueError, match="total_steps=0"):
    config_lib.check_config(c)
  with pytest.raises(ValueError, match=r"lacks required fields \['batch_size'\]"):
    config_lib.check_config(ml_collections.ConfigDict(dict(
        seed=0, total_steps=1, log_every_steps=1, eval_every_steps=1,
        checkpoint_every_steps=1)))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  c = ml_collections.ConfigDict(dict(batch_size=12, eval_batch_size=None,
                                     optim=dict(accum_steps=1)))
  with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
    train.check_batch_config(c, mesh)
  c = ml_collections.ConfigDict(dict(batch_size=8, eval_batch_size=8,
                                     optim=dict(accum_steps=2)))
  with pytest.raises(ValueError, match=r"multiple of accum_steps \(2\) x devices \(8\)"):
    train.check_batch_config(c, mesh)


def test_byte_level_tokenizer_gives_distinct_in_vocab_tokens():
  tok = text.load_tokenizer(text.BYTE_LEVEL_TOKENIZER)
  tokens = text.tokenize(["red disc", "green square", "purple checker"], tok)
  assert tokens.shape == (3, 77) and tokens.max() < text.BYTE_LEVEL_VOCAB_SIZE
  assert len({tuple(t) for t in tokens}) == 3


def _tiny(seed):
  return lseg.LSeg(lseg.LSegConfig(backbone="tiny_vit32", text_vocab_size=64),
                   rngs=nnx.Rngs(seed))


def test_pretrained_weights_from_timm_clip_and_checkpoint(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  source, target = _tiny(1), nnx.eval_shape(lambda: _tiny(2))
  vit_file, clip_file = str(tmp_path / "vit.safetensors"), str(tmp_path / "clip.safetensors")
  safetensors_numpy.save_file(timm_vit.export_timm_vit(source.pretrained.model), vit_file)
  safetensors_numpy.save_file(clip_openai.export_openai_clip_text(source.clip_pretrained),
                              clip_file)
  want = {k: np.asarray(v) for k, v in mapping.flatten_params(source).items()}

  got = init.pretrained_weights({"timm_vit": vit_file, "clip": clip_file}, target)
  assert got and all(k.startswith(("pretrained/model/", "clip_pretrained/")) for k in got)
  assert len([k for k in want if k.startswith(("pretrained/model/", "clip_pretrained/"))]
             ) == len(got)
  for k, v in got.items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)

  checkpoint.save_model(str(tmp_path / "ckpt"), source)
  got = init.pretrained_weights({"checkpoint": str(tmp_path / "ckpt")}, target)
  assert set(got) == set(want)
  for k, v in got.items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_init_errors_name_the_problem(tmp_path):
  target = nnx.eval_shape(lambda: _tiny(0))
  with pytest.raises(FileNotFoundError, match="config.init.timm_vit='/nonexistent"):
    init.pretrained_weights({"timm_vit": "/nonexistent/vit.safetensors"}, target)
  with pytest.raises(ValueError, match="unknown fields"):
    init.pretrained_weights({"vit": "x"}, target)
  other = lseg.LSeg(lseg.LSegConfig(backbone="tiny_vit16", text_vocab_size=64),
                    rngs=nnx.Rngs(0))
  checkpoint.save_model(str(tmp_path / "ckpt"), other)
  with pytest.raises(ValueError, match="backbone='tiny_vit16' there, 'tiny_vit32'"):
    init.pretrained_weights({"checkpoint": str(tmp_path / "ckpt")}, target)
