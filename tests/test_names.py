"""Flat parameter names and regex rules: one convention, no JAX needed."""
import subprocess
import sys

from flax import nnx
import jax
import pytest

from lseg_jax import names


def test_importing_names_imports_no_jax():
  code = "import sys; import lseg_jax.names; assert 'jax' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_key_paths_and_nested_dicts_give_the_same_names():
  model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  from_paths = [names.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert from_paths == ["layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel"]
  assert sorted(names.flatten(state.to_pure_dict())) == from_paths
  assert names.path_name(("layers", 0, "kernel")) == "layers/0/kernel"  # an NNX filter path
  assert names.split_name("layers/0/kernel") == ("layers", 0, "kernel")


def test_rules():
  rules = names.check_rules([["scratch/.*", 10.0], (".*", 1.0)], "lr")
  assert rules == [("scratch/.*", 10.0), (".*", 1.0)]
  assert names.first_match("scratch/head1/kernel", rules) == 10.0
  assert names.first_match("scratch", [("scratch/.*", 1)], "none") == "none"  # full match
  assert names.matches("clip_pretrained/x", names.check_patterns(["clip_pretrained/.*"], "f"))
  with pytest.raises(ValueError, match=r"lr: invalid regex '\('"):
    names.check_rules([("(", 1.0)], "lr")
  with pytest.raises(ValueError, match="single string"):
    names.check_patterns("clip_pretrained/.*", "frozen")
  with pytest.raises(TypeError, match="nested mapping"):
    names.flatten([1, 2])
