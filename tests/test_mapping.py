"""The mapping-table machinery on a tiny module, both directions."""
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax import langseg_layout
from lseg_jax.convert import mapping
from lseg_jax.convert.mapping import CONV, TRANSPOSE, MappingError, MappingTable, Rule


class Block(nnx.Module):

  def __init__(self, rngs):
    self.fc = nnx.Linear(8, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)

  def __call__(self, x):
    return self.norm(x + jax.nn.relu(self.fc(x)))


class Tiny(nnx.Module):
  """conv 3x3 (3 -> 4) -> flatten [B, 4*2*2 = 16] -> Linear(16, 8) -> 2 blocks -> qkv."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs)
    self.proj = nnx.Linear(16, 8, rngs=rngs)
    self.blocks = nnx.List([Block(rngs) for _ in range(2)])
    self.qkv = nnx.Linear(8, 24, rngs=rngs)
    self.scale = nnx.Param(jnp.ones((8,)))

  def __call__(self, x):
    """x [B, 4, 4, 3] -> [B, 24]."""
    x = self.conv(x)
    # Flatten in torch's NCHW order so that the torch Linear sees the same vector.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = self.proj(x)
    for block in self.blocks:
      x = block(x)
    return self.qkv(x * self.scale[...])


TABLE = MappingTable(
    rules=(
        Rule("conv/kernel", "conv.weight", CONV),
        Rule("conv/bias", "conv.bias"),
        Rule("proj/kernel", "proj.weight", TRANSPOSE),
        Rule("proj/bias", "proj.bias"),
        Rule("blocks/{i}/fc/kernel", "layers.{i}.fc.weight", TRANSPOSE),
        Rule("blocks/{i}/fc/bias", "layers.{i}.fc.bias"),
        Rule("blocks/{i}/norm/scale", "layers.{i}.norm.weight"),
        Rule("blocks/{i}/norm/bias", "layers.{i}.norm.bias"),
        Rule("qkv/kernel", ("q.weight", "k.weight", "v.weight"),
             mapping.concat(3, 0, then=TRANSPOSE)),
        Rule("qkv/bias", ("q.bias", "k.bias", "v.bias"), mapping.concat(3, 0)),
        Rule("scale", "scale", mapping.reshape((1, 8), (8,))),
    ),
    ignore_torch=(r"aux\..*",),
)


def random_state_dict(seed=0):
  """A state dict in the torch layout of `Tiny`."""
  rng = np.random.default_rng(seed)
  shapes = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "proj.weight": (8, 16),
            "proj.bias": (8,), "scale": (1, 8)}
  for i in range(2):
    shapes.update({f"layers.{i}.fc.weight": (8, 8), f"layers.{i}.fc.bias": (8,),
                   f"layers.{i}.norm.weight": (8,), f"layers.{i}.norm.bias": (8,)})
  for p in "qkv":
    shapes.update({f"{p}.weight": (8, 8), f"{p}.bias": (8,)})
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def abstract_tiny():
  return nnx.state(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))))


def test_flatten_unflatten_roundtrip():
  model = Tiny(nnx.Rngs(0))
  flat = mapping.flatten_params(model)
  assert "blocks/1/norm/scale" in flat and "conv/kernel" in flat
  assert flat["conv/kernel"].shape == (3, 3, 3, 4)
  assert mapping.flatten_params(mapping.unflatten(flat)).keys() == flat.keys()
  # Abstract states flatten to ShapeDtypeStructs.
  assert isinstance(mapping.flatten_params(abstract_tiny())["proj/kernel"], jax.ShapeDtypeStruct)


def test_update_writes_values_and_checks_shapes():
  model = Tiny(nnx.Rngs(0))
  mapping.update(model, {"proj/bias": np.full((8,), 3.0, np.float64)})
  assert model.proj.bias[...].dtype == jnp.float32
  np.testing.assert_array_equal(model.proj.bias[...], 3.0)
  with pytest.raises(ValueError, match="proj/bias"):
    mapping.update(model, {"proj/bias": np.zeros((9,))})
  with pytest.raises(ValueError, match="nope/x"):
    mapping.update(model, {"nope/x": np.zeros((9,))})


def test_import_matches_torch_layout_semantics():
  """Import, then compute the same function as the torch-layout weights do (numpy)."""
  sd = random_state_dict()
  model = mapping.load_module(sd, TABLE, lambda: Tiny(nnx.Rngs(0)))
  x = np.random.default_rng(1).normal(size=(2, 4, 4, 3)).astype(np.float32)
  got = np.asarray(model(jnp.asarray(x)))

  # Reference in the torch layout, written directly with numpy.
  def conv_nchw(x, w, b):  # x [B, C, 4, 4], stride 2, pad 1
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((x.shape[0], w.shape[0], 2, 2), np.float32)
    for i in range(2):
      for j in range(2):
        patch = xp[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
        out[:, :, i, j] = np.einsum("bchw,ochw->bo", patch, w) + b
    return out

  def layer_norm(x, w, b):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * w + b

  h = conv_nchw(np.transpose(x, (0, 3, 1, 2)), sd["conv.weight"], sd["conv.bias"])
  h = h.reshape(2, -1) @ sd["proj.weight"].T + sd["proj.bias"]
  for i in range(2):
    fc = h @ sd[f"layers.{i}.fc.weight"].T + sd[f"layers.{i}.fc.bias"]
    h = layer_norm(h + np.maximum(fc, 0), sd[f"layers.{i}.norm.weight"],
                   sd[f"layers.{i}.norm.bias"])
  h = h * sd["scale"][0]
  want = np.concatenate([h @ sd[f"{p}.weight"].T + sd[f"{p}.bias"] for p in "qkv"], -1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_export_inverts_import():
  sd = random_state_dict()
  params = mapping.torch_to_nnx(sd, TABLE, abstract_tiny())
  back = mapping.nnx_to_torch(params, TABLE)
  assert back.keys() == sd.keys()
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  # Also straight from a module.
  model = Tiny(nnx.Rngs(0))
  mapping.update(model, params)
  assert mapping.nnx_to_torch(model, TABLE).keys() == sd.keys()


def test_load_module_in_place():
  sd = random_state_dict()
  model = Tiny(nnx.Rngs(0))
  assert mapping.load_module(sd, TABLE, model) is model
  np.testing.assert_array_equal(model.blocks[1].fc.kernel[...], sd["layers.1.fc.weight"].T)
  assert isinstance(model.blocks[1].fc.kernel[...], jax.Array)


def test_one_error_lists_unknown_missing_and_misshaped_keys():
  sd = random_state_dict()
  sd["layers.2.fc.weight"] = np.zeros((8, 8), np.float32)  # unknown (no block 2)
  sd["aux.whatever"] = np.zeros(3)  # ignored
  del sd["layers.0.norm.bias"]  # missing
  sd["proj.weight"] = np.zeros((8, 17), np.float32)  # mis-shaped
  sd["conv.weight"] = np.zeros((4, 3, 3), np.float32)  # wrong rank
  with pytest.raises(MappingError) as info:
    mapping.torch_to_nnx(sd, TABLE, abstract_tiny())
  err = info.value
  assert err.unknown == ["layers.2.fc.weight"]
  assert err.missing == ["layers.0.norm.bias"]
  assert len(err.mis_shaped) == 2
  message = str(err)
  for text in ("layers.2.fc.weight", "layers.0.norm.bias", "proj.weight (8, 17)",
               "(16, 8)", "conv.weight (4, 3, 3)"):
    assert text in message, text
  assert "aux.whatever" not in message


def test_unmapped_nnx_params_are_reported():
  table = MappingTable(TABLE.rules[1:])  # no rule for conv/kernel
  with pytest.raises(MappingError, match="conv/kernel"):
    mapping.torch_to_nnx(random_state_dict(), table, abstract_tiny())
  with pytest.raises(MappingError, match="conv/kernel"):
    mapping.nnx_to_torch(Tiny(nnx.Rngs(0)), table)
  # ... unless the table says they have no torch counterpart.
  table = MappingTable(TABLE.rules[1:], ignore_torch=(r"conv\.weight", r"aux\..*"),
                       ignore_nnx=("conv/kernel",))
  params = mapping.torch_to_nnx(random_state_dict(), table, abstract_tiny())
  assert "conv/kernel" not in mapping.flatten_params(params)


def test_prefixed_table():
  sd = {"net." + k: v for k, v in random_state_dict().items()}
  sd["net.aux.x"] = np.zeros(1)

  class Outer(nnx.Module):

    def __init__(self, rngs):
      self.inner = Tiny(rngs)

  outer = Outer(nnx.Rngs(0))
  mapping.load_module(sd, TABLE.prefixed("net.", "inner/"), outer)
  np.testing.assert_array_equal(outer.inner.proj.bias[...], sd["net.proj.bias"])
  back = mapping.nnx_to_torch(outer, TABLE.prefixed("net.", "inner/"))
  assert set(back) == set(sd) - {"net.aux.x"}


def test_placeholders_must_agree():
  with pytest.raises(ValueError, match="placeholders"):
    Rule("blocks/{i}/x", "layers.{j}.x")


def test_table_addition():
  a = MappingTable(TABLE.rules[:2], ignore_torch=("a",))
  b = MappingTable(TABLE.rules[2:], ignore_torch=("b",))
  assert (a + b).rules == TABLE.rules and (a + b).ignore_torch == ("a", "b")


def test_load_state_dict_file_formats(tmp_path):
  sd = random_state_dict()
  from safetensors.numpy import save_file
  save_file(sd, str(tmp_path / "m.safetensors"))
  got = langseg_layout.load_state_dict_file(tmp_path / "m.safetensors")
  assert got.keys() == sd.keys()
  torch = pytest.importorskip("torch")
  tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
  torch.save(tensors, tmp_path / "m.pt")
  torch.save({"state_dict": tensors, "epoch": 3}, tmp_path / "m.ckpt")
  for name in ("m.pt", "m.ckpt"):
    got = langseg_layout.load_state_dict_file(tmp_path / name)
    assert got.keys() == sd.keys()
    np.testing.assert_array_equal(got["proj.weight"], sd["proj.weight"])
  with pytest.raises(FileNotFoundError, match="nothing.pt"):
    langseg_layout.load_state_dict_file(tmp_path / "nothing.pt")


def test_numpy_state_dict_converts_torch_bf16():
  torch = pytest.importorskip("torch")
  out = langseg_layout.numpy_state_dict({"w": torch.ones(2, dtype=torch.bfloat16),
                                         "n": np.zeros(1)})
  assert out["w"].dtype == np.float32 and out["n"].dtype == np.float64


def test_hook_names_are_readable():
  assert re.search("concat3", mapping.concat(3, 0, then=TRANSPOSE).name)
