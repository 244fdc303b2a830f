"""CLIP text tower: parity with PyTorch references through the OpenAI and HF loaders."""
import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax.convert import clip_hf, clip_openai, mapping
from lseg_jax.models import clip_text

torch = pytest.importorskip("torch")
from lseg_jax.torch_lseg.clip_text import CLIPTextTorch  # noqa: E402  (needs torch)

VOCAB, CONTEXT = 100, 12
TINY = dict(width=32, layers=2, heads=2, embed_dim=16)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def random_tokens(n, context, vocab, seed=0):
  """[n, context] int64: start (vocab-2), random ids, end (vocab-1, the largest), zeros."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((n, context), np.int64)
  for i, length in enumerate(np.linspace(2, context, n).astype(int)):
    tokens[i, :length] = rng.integers(1, vocab - 2, length)
    tokens[i, 0], tokens[i, length - 1] = vocab - 2, vocab - 1
  return tokens


def perturb_(module, seed=0):
  """Random values for every parameter, LayerNorm and biases included, so that a
  wrong mapping of any of them shows."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "ln" in name or "norm" in name:
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if name.endswith("weight")
                else 0.1 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.05 * torch.randn(p.shape, generator=gen))
  return module


def torch_reference(seed=0, **overrides):
  torch.manual_seed(seed)
  kw = dict(TINY, vocab_size=VOCAB, context_length=CONTEXT, **overrides)
  return perturb_(CLIPTextTorch(**kw).eval(), seed)


def torch_encode(ref, tokens):
  with torch.no_grad():
    return ref.encode_text(torch.from_numpy(tokens)).numpy()


def tiny_cfg(**kw):
  return clip_text.decode_variant("tiny", vocab_size=VOCAB, context_length=CONTEXT, **kw)


def test_variants_and_bad_inputs():
  assert clip_text.decode_variant("B/32").width == 512
  assert clip_text.decode_variant("RN50x16").embed_dim == 768
  with pytest.raises(ValueError, match="'B/99'"):
    clip_text.decode_variant("B/99")
  model = clip_text.CLIPTextTransformer(tiny_cfg(), rngs=nnx.Rngs(0))
  assert model(jnp.asarray(random_tokens(3, CONTEXT, VOCAB))).shape == (3, 16)
  with pytest.raises(ValueError, match=r"T <= 12"):
    model(jnp.zeros((2, 13), jnp.int32))
  with pytest.raises(ValueError, match="integer"):
    model(jnp.zeros((2, 5), jnp.float32))


def test_openai_loader_matches_torch_reference(tmp_path):
  ref = torch_reference()
  torch.save(ref.state_dict(), tmp_path / "clip.pt")
  model = clip_openai.load_openai_clip_text(tmp_path / "clip.pt", heads=2)
  assert model.cfg == tiny_cfg()
  tokens = random_tokens(5, CONTEXT, VOCAB)
  want = torch_encode(ref, tokens)
  got = jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32))
  assert got.dtype == jnp.float32
  assert rel_err(got, want) < 1e-5
  # Shorter sequences (T < context) use the first T position embeddings.
  assert rel_err(model(jnp.asarray(tokens[:, :8])), torch_encode(ref, tokens[:, :8])) < 1e-5


def test_openai_loader_torchscript_archive_and_lang_seg_prefix(tmp_path):
  ref = torch_reference(seed=1)
  tokens = random_tokens(4, CONTEXT, VOCAB)
  with pytest.warns(Warning):  # tracing warns about the python-side shape logic
    traced = torch.jit.trace(ref, torch.from_numpy(tokens))
  traced.save(str(tmp_path / "traced.pt"))
  model = clip_text.CLIPTextTransformer(tiny_cfg(), rngs=nnx.Rngs(0))
  clip_openai.load_openai_clip_text(tmp_path / "traced.pt", model)
  assert rel_err(model(jnp.asarray(tokens)), torch_encode(ref, tokens)) < 1e-5

  # lang-seg layout: the whole CLIP model under `clip_pretrained.`, next to other keys.
  sd = {f"net.clip_pretrained.{k}": v for k, v in ref.state_dict().items()}
  sd["net.clip_pretrained.visual.conv1.weight"] = torch.zeros(4, 3, 2, 2)
  sd["net.clip_pretrained.logit_scale"] = torch.tensor(4.6)
  sd["net.scratch.head1.weight"] = torch.zeros(16, 8, 1, 1)
  assert clip_openai.find_prefix(sd) == "net.clip_pretrained."
  model = clip_openai.load_openai_clip_text(sd, heads=2)
  assert rel_err(model(jnp.asarray(tokens)), torch_encode(ref, tokens)) < 1e-5


def test_openai_export_roundtrip_loads_into_torch():
  model = clip_text.CLIPTextTransformer(tiny_cfg(), rngs=nnx.Rngs(3))
  exported = clip_openai.export_openai_clip_text(model, prefix="clip_pretrained.")
  ref = CLIPTextTorch(**TINY, vocab_size=VOCAB, context_length=CONTEXT)
  ref.load_state_dict({k[len("clip_pretrained."):]: torch.from_numpy(np.array(v))
                       for k, v in exported.items()}, strict=True)
  tokens = random_tokens(3, CONTEXT, VOCAB)
  assert rel_err(model(jnp.asarray(tokens)), torch_encode(ref.eval(), tokens)) < 1e-5


def test_openai_loader_lists_bad_keys():
  sd = {k: v.numpy() for k, v in torch_reference().state_dict().items()}
  sd["transformer.resblocks.0.attn.bogus"] = np.zeros(3, np.float32)
  del sd["transformer.resblocks.1.ln_2.bias"]
  sd["ln_final.weight"] = np.zeros((33,), np.float32)
  model = clip_text.CLIPTextTransformer(tiny_cfg(), rngs=nnx.Rngs(0))
  with pytest.raises(mapping.MappingError) as info:
    clip_openai.load_openai_clip_text(sd, model)
  assert info.value.unknown == ["transformer.resblocks.0.attn.bogus"]
  assert info.value.missing == ["transformer.resblocks.1.ln_2.bias"]
  assert "ln_final.weight (33,)" in str(info.value)
  with pytest.raises(ValueError, match="exactly one OpenAI CLIP text tower"):
    clip_openai.load_openai_clip_text({"foo": np.zeros(1)})


def test_openai_half_checkpoint_is_cast_to_float32():
  ref = torch_reference()
  sd = {k: v.half() for k, v in ref.state_dict().items()}
  model = clip_openai.load_openai_clip_text(sd, heads=2)
  assert model.text_projection[...].dtype == jnp.float32
  tokens = random_tokens(3, CONTEXT, VOCAB)
  assert rel_err(model(jnp.asarray(tokens)), torch_encode(ref, tokens)) < 1e-2


@pytest.mark.parametrize("eos_token_id", [2, VOCAB - 1])
def test_hf_loader_matches_transformers(tmp_path, eos_token_id):
  """eos_token_id=2 is transformers' legacy argmax pooling; VOCAB-1 pools at the
  first end token, the largest id here, so both equal our argmax pooling."""
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=CONTEXT, projection_dim=16,
      bos_token_id=VOCAB - 2, eos_token_id=eos_token_id, pad_token_id=0)
  ref = perturb_(transformers.CLIPTextModelWithProjection(config).eval())
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
            str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))

  model = clip_hf.load_hf_clip_text(tmp_path)
  assert model.cfg == tiny_cfg()
  tokens = random_tokens(5, CONTEXT, VOCAB)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(tokens)).text_embeds.numpy()
  assert rel_err(model(jnp.asarray(tokens)), want) < 1e-5

  # Export is the same table reversed: the HF state dict comes back exactly.
  exported = clip_hf.export_hf_clip_text(model)
  hf = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert set(exported) == set(hf) - {"text_model.embeddings.position_ids"}
  for k, v in exported.items():
    np.testing.assert_array_equal(v, hf[k], err_msg=k)


def test_hf_clip_model_folder(tmp_path):
  """A full CLIPModel folder (save_pretrained): the vision tower is ignored."""
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=CONTEXT, eos_token_id=2)
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, image_size=32, patch_size=16)
  ref = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=text, vision_config=vision, projection_dim=16)).eval()
  ref.save_pretrained(tmp_path)
  model = clip_hf.load_hf_clip_text(tmp_path)
  tokens = random_tokens(4, CONTEXT, VOCAB)
  with torch.no_grad():
    want = ref.get_text_features(input_ids=torch.from_numpy(tokens))
  want = getattr(want, "pooler_output", want).numpy()
  assert rel_err(model(jnp.asarray(tokens)), want) < 1e-5


def test_hf_config_checks():
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    clip_hf.text_config_from_hf({"hidden_act": "gelu"})
  with pytest.raises(ValueError, match="intermediate_size=100"):
    clip_hf.text_config_from_hf({"hidden_size": 32, "intermediate_size": 100})
  cfg = clip_hf.text_config_from_hf({})  # transformers defaults: the B/32 text tower
  assert cfg == clip_text.decode_variant("B/32")


def test_bf16_compute_keeps_float32_params_and_output():
  ref = torch_reference()
  model = clip_text.CLIPTextTransformer(tiny_cfg(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  clip_openai.load_openai_clip_text({k: v for k, v in ref.state_dict().items()}, model)
  assert all(v.dtype == jnp.float32 for v in mapping.flatten_params(model).values())
  tokens = random_tokens(3, CONTEXT, VOCAB)
  got = model(jnp.asarray(tokens))
  assert got.dtype == jnp.float32
  assert rel_err(got, torch_encode(ref, tokens)) < 5e-2


@pytest.mark.slow
def test_full_size_b32_parity(tmp_path):
  """The real ViT-B/32 text tower shape (63M params), random weights."""
  torch.manual_seed(0)
  ref = perturb_(CLIPTextTorch(width=512, layers=12, heads=8, embed_dim=512).eval())
  torch.save(ref.state_dict(), tmp_path / "b32.pt")
  model = clip_openai.load_openai_clip_text(tmp_path / "b32.pt")
  assert model.cfg == clip_text.decode_variant("B/32")
  tokens = random_tokens(6, 77, 49408)
  got = jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32))
  assert rel_err(got, torch_encode(ref, tokens)) < 1e-5
