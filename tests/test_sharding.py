"""Mesh construction and regex rules -> shardings (8 forced host devices)."""
from flax import nnx
import jax
import pytest

from lseg_jax import names
from lseg_jax import optim
from lseg_jax import sharding
from lseg_jax.models import lseg

P = sharding.P


def test_mesh_sizes():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1})
  assert mesh.size == 1 and mesh.devices.flat[0] == jax.devices()[0]


@pytest.mark.parametrize("sizes,match", [
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": 3, "fsdp": 4}, "needs 12 devices"),
    ({"data": -1, "fsdp": 3}, "do not divide"),
    ({"data": 0}, "must be positive"),
    ({"model": 2}, "unknown axes"),
])
def test_mesh_errors(sizes, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(sizes)


def test_fsdp_spec_splits_largest_divisible_axis():
  assert sharding.fsdp_spec((1024, 4096), 4, 0) == P(None, "fsdp")
  assert sharding.fsdp_spec((4096, 1024), 4, 0) == P("fsdp", None)
  assert sharding.fsdp_spec((3, 3, 256, 256), 4, 0) == P(None, None, None, "fsdp")
  assert sharding.fsdp_spec((6, 10), 4, 0) == P()  # nothing divisible
  assert sharding.fsdp_spec((1024, 1024), 4, 2 ** 21) == P()  # below min_size
  assert sharding.fsdp_spec((1024, 1024), 1, 0) == P()


def test_rules_first_match_wins_and_explicit_specs():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  rules = names.check_rules([("a/.*", "replicate"), ("b/kernel", (None, "fsdp")),
                             (".*", "fsdp")], "test")
  assert sharding.partition_spec("a/kernel", (64, 64), rules, mesh, 0) == P()
  assert sharding.partition_spec("b/kernel", (6, 8), rules, mesh, 0) == P(None, "fsdp")
  assert sharding.partition_spec("c/kernel", (64, 32), rules, mesh, 0) == P("fsdp", None)
  with pytest.raises(ValueError, match="size 6 .* over 4 devices"):
    sharding.partition_spec("b/kernel", (8, 6), rules, mesh, 0)
  with pytest.raises(ValueError, match="expected 'fsdp', 'replicate'"):
    sharding.partition_spec("x", (8,), [(".*", "shard")], mesh, 0)
  with pytest.raises(ValueError, match="invalid regex"):
    names.check_rules([("(", "fsdp")], "config.sharding.rules")


def test_tiny_model_shardings():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  model = nnx.eval_shape(lambda: lseg.LSeg(
      lseg.LSegConfig(backbone="tiny_vit32", text_vocab_size=64), rngs=nnx.Rngs(0)))
  _, params, frozen, rest = optim.partition(model, ("clip_pretrained/.*",))
  rules = [("clip_pretrained/.*", "replicate"), (".*", "fsdp")]
  shardings = sharding.tree_shardings(params, mesh, rules, min_size=256)
  specs = dict(zip(sharding.names(params), (s.spec for s in jax.tree.leaves(shardings))))
  # A 3x3 conv kernel [3, 3, 32, 16]: the input-channel axis (largest divisible) is split.
  assert specs["scratch/layer3_rn/kernel"] == P(None, None, "fsdp", None)
  assert specs["pretrained/model/blocks/0/mlp/fc1/kernel"] == P(None, "fsdp")  # [32, 64]
  assert specs["pretrained/model/blocks/0/norm1/scale"] == P()  # 32 elements < min_size
  frozen_specs = [s.spec for s in jax.tree.leaves(
      sharding.tree_shardings(frozen, mesh, rules, min_size=256))]
  assert all(s == P() for s in frozen_specs)
  assert sharding.names(params)[0] == names.path_name(
      jax.tree_util.tree_flatten_with_path(params)[0][0][0])
