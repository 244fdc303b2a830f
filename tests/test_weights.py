"""Pretrained weights by name (`lseg_jax.weights`), against a fake Hub and file server.

A thread serves, on 127.0.0.1, enough of the Hugging Face Hub's file API for
`huggingface_hub.hf_hub_download` (HF_ENDPOINT points at it) and plain URLs, all holding
tiny random weights in the real formats; it counts requests, and can cut a response off
half-way or serve other bytes than it announces. Nothing touches the real network.
"""
import collections
import hashlib
import http.server
import io
import json
import os
from pathlib import Path
import re
import subprocess
import sys
import threading
import time

from flax import nnx
import numpy as np
import pytest

from lseg_jax import errors, init, text, weights
from lseg_jax.cli import common as cli_common
from lseg_jax.convert import clip_openai, mapping, timm_vit, torchvision_resnet
from lseg_jax.models import lseg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VIT_REPO = weights.OFFICIAL["vit_base_patch32_384"].hub


class FakeServer:
  """Files by URL path; `hub[(repo, filename)]` served under /{repo}/resolve/{rev}/."""

  def __init__(self):
    self.files: dict[str, bytes] = {}
    self.hub: dict[tuple[str, str], bytes] = {}
    self.cut: set[str] = set()        # paths whose body stops half-way (connection closed)
    self.corrupt: set[str] = set()    # paths served with other bytes of the same size
    self.requests = collections.Counter()
    self.delay_s = 0.0                # before each body: lets concurrent clients overlap
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def _lookup(self):
        path = self.path.split("?")[0]
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
        if m:
          if not any(repo == m.group(1) for repo, _ in server.hub):
            return path, None, {"X-Error-Code": "RepoNotFound"}
          data = server.hub.get((m.group(1), m.group(2)))
          sha = hashlib.sha256(data).hexdigest() if data is not None else None
          return path, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"',
                              "X-Error-Code": "EntryNotFound"} if data is None else {
                                  "X-Repo-Commit": COMMIT, "ETag": f'"{sha}"'}
        return path, server.files.get(path), {}

      def _reply(self, body: bool):
        path, data, headers = self._lookup()
        server.requests[(self.command, path)] += 1
        if data is None:
          self.send_response(404)
          for k, v in headers.items():
            if k != "ETag":
              self.send_header(k, v)
          self.send_header("Content-Length", "0")
          self.end_headers()
          return
        self.send_response(200)
        for k, v in headers.items():
          self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
          return
        time.sleep(server.delay_s)
        if path in server.corrupt:
          data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        if path in server.cut:
          self.wfile.write(data[:len(data) // 2])
          self.wfile.flush()
          self.close_connection = True
          return
        self.wfile.write(data)

      def do_HEAD(self):  # noqa: N802
        self._reply(body=False)

      def do_GET(self):  # noqa: N802
        self._reply(body=True)

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def gets(self, path: str) -> int:
    return self.requests[("GET", path)]


def _safetensors_bytes(tensors) -> bytes:
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  return save({k: np.array(v) for k, v in tensors.items()})


def _torch_bytes(tensors) -> bytes:
  torch = pytest.importorskip("torch")
  buffer = io.BytesIO()
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, buffer)
  return buffer.getvalue()


@pytest.fixture(scope="module")
def source():
  """A tiny LSeg whose weights the server holds (text tower sized for "byte-level")."""
  cfg = lseg.LSegConfig(backbone="tiny_vit32", text_vocab_size=text.BYTE_LEVEL_VOCAB_SIZE)
  return lseg.LSeg(cfg, rngs=nnx.Rngs(7))


@pytest.fixture
def server(source, tmp_path, monkeypatch):
  """The fake server with the tiny weights; caches and HF_ENDPOINT point at tmp_path."""
  srv = FakeServer()
  vit = _safetensors_bytes(timm_vit.export_timm_vit(source.pretrained.model))
  srv.hub[(VIT_REPO, "model.safetensors")] = vit
  clip = _torch_bytes(clip_openai.export_openai_clip_text(source.clip_pretrained))
  sha = hashlib.sha256(clip).hexdigest()
  srv.files[f"/clip/models/{sha}/ViT-B-32.pt"] = clip
  monkeypatch.setitem(weights.OFFICIAL, "ViT-B/32", weights.Official(
      "clip", url=f"{srv.url}/clip/models/{sha}/ViT-B-32.pt", sha256=sha))
  monkeypatch.setenv("HF_ENDPOINT", srv.url)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setenv("LSEG_JAX_CACHE", str(tmp_path / "lseg_cache"))
  srv.clip_path = f"/clip/models/{sha}/ViT-B-32.pt"
  yield srv
  srv.httpd.shutdown()


def _flat(module, prefix):
  return {prefix + k: np.asarray(v) for k, v in mapping.flatten_params(module).items()}


def _no_partial_files(folder) -> bool:
  return not [f for _, _, fs in os.walk(folder) for f in fs
              if f.endswith((".part", ".incomplete"))]


def _want(source):
  return {**_flat(source.pretrained.model, "pretrained/model/"),
          **_flat(source.clip_pretrained, "clip_pretrained/")}


def test_official_names_give_the_served_weights_and_then_the_cache(server, source):
  """`timm_vit=vit_base_patch32_384` (fake Hub) and `clip=ViT-B/32` (direct URL with its
  SHA-256) fill the model with exactly the served weights; a second call sends no
  request at all."""
  abstract = nnx.eval_shape(lambda: lseg.LSeg(source.cfg, rngs=nnx.Rngs(0)))
  names = {"timm_vit": "vit_base_patch32_384", "clip": "ViT-B/32"}
  want = _want(source)
  for attempt in range(2):
    got = init.pretrained_weights(names, abstract)
    assert set(got) == set(want)
    for k, v in want.items():
      np.testing.assert_array_equal(got[k], v, err_msg=k)
    if attempt == 0:
      before = dict(server.requests)
  assert dict(server.requests) == before  # the caches answered
  hub_path = f"/{VIT_REPO}/resolve/main/model.safetensors"
  assert server.gets(hub_path) == 1 and server.gets(server.clip_path) == 1


@pytest.mark.slow
def test_training_starts_from_weights_given_by_name(server, source, data_dir, tmp_path):
  """A training run with `config.init.*` set to official names starts from the served
  weights (the image backbone is frozen here too, so it still equals the file)."""
  from lseg_jax import train  # pylint: disable=g-import-not-at-top
  from test_train import make_config  # pylint: disable=g-import-not-at-top
  config = make_config(data_dir, **{"total_steps": 1, "checkpoint_every_steps": 0,
                                    "mesh.data": 1, "mesh.fsdp": 1})
  config.init.timm_vit = "vit_base_patch32_384"
  config.init.clip = "ViT-B/32"
  config.optim.frozen = ("clip_pretrained/.*", "pretrained/.*")
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  state = summary["state"]
  got = {**mapping.flatten_params(state["params"]), **mapping.flatten_params(state["frozen"])}
  for k, v in _want(source).items():
    np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)


def test_hub_id_url_and_torchvision_name(server, tmp_path, monkeypatch):
  """A Hub id, a plain URL, and a torchvision-style name (hash prefix in the file name)."""
  path = weights.resolve(VIT_REPO, kind="timm_vit", what="config.init.timm_vit")
  assert os.path.isfile(path) and path.endswith("model.safetensors")
  assert weights.file_sha256(path) == hashlib.sha256(
      server.hub[(VIT_REPO, "model.safetensors")]).hexdigest()

  cfg = lseg.LSegConfig(backbone="tiny_resnet", text_vocab_size=64)
  model = lseg.LSeg(cfg, rngs=nnx.Rngs(3))
  data = _torch_bytes(torchvision_resnet.export_torchvision_resnet(model.pretrained.model))
  digest = hashlib.sha256(data).hexdigest()
  server.files[f"/models/resnet_tiny-{digest[:8]}.pth"] = data
  monkeypatch.setitem(weights.OFFICIAL, "resnet101", weights.Official(
      "torchvision_resnet", url=f"{server.url}/models/resnet_tiny-{digest[:8]}.pth",
      sha256_prefix=digest[:8]))
  abstract = nnx.eval_shape(lambda: lseg.LSeg(cfg, rngs=nnx.Rngs(0)))
  got = init.pretrained_weights({"torchvision_resnet": "resnet101"}, abstract)
  want = _flat(model.pretrained.model, "pretrained/model/")
  assert set(got) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)

  server.files["/any/file.safetensors"] = server.hub[(VIT_REPO, "model.safetensors")]
  url = server.url + "/any/file.safetensors"
  assert weights.file_sha256(weights.resolve(url, kind="timm_vit", what="x")) == digest_of(
      server.hub[(VIT_REPO, "model.safetensors")])
  assert weights.resolve(url, kind="timm_vit", what="x") == weights.url_cache_path(url)
  assert server.gets("/any/file.safetensors") == 1


def digest_of(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def test_hash_mismatch_is_an_error_and_nothing_is_kept(server, tmp_path, monkeypatch):
  server.corrupt.add(server.clip_path)
  with pytest.raises(weights.WeightsError, match=r"config.init.clip='ViT-B/32': .* has "
                     r"SHA-256 [0-9a-f]{64}, expected [0-9a-f]{64}; the file was not kept"):
    weights.resolve("ViT-B/32", kind="clip", what="config.init.clip")
  assert not os.path.exists(weights.url_cache_path(weights.OFFICIAL["ViT-B/32"].url))
  assert _no_partial_files(tmp_path / "lseg_cache")

  # The Hub states an LFS file's SHA-256 (its ETag); a file that differs is deleted.
  hub_path = f"/{VIT_REPO}/resolve/main/model.safetensors"
  server.corrupt.add(hub_path)
  with pytest.raises(weights.WeightsError, match="model.safetensors has SHA-256"):
    weights.resolve("vit_base_patch32_384", kind="timm_vit", what="config.init.timm_vit")
  blobs = [f for _, _, fs in os.walk(tmp_path / "hf") for f in fs
           if re.fullmatch(r"[0-9a-f]{64}", f)]
  assert blobs == []
  server.corrupt.clear()
  assert os.path.isfile(weights.resolve("vit_base_patch32_384", kind="timm_vit", what="x"))


def test_cut_off_download_leaves_nothing_and_the_next_try_succeeds(server, tmp_path):
  server.cut.add(server.clip_path)
  with pytest.raises(weights.WeightsError, match="nothing was kept: run again"):
    weights.resolve("ViT-B/32", kind="clip", what="config.init.clip")
  assert not os.path.exists(weights.url_cache_path(weights.OFFICIAL["ViT-B/32"].url))
  assert _no_partial_files(tmp_path / "lseg_cache")
  server.cut.clear()
  path = weights.resolve("ViT-B/32", kind="clip", what="config.init.clip")
  assert weights.file_sha256(path) == weights.OFFICIAL["ViT-B/32"].sha256


def test_offline_with_an_empty_cache_fails_fast_naming_the_fix(server, monkeypatch):
  for offline_env in ("HF_HUB_OFFLINE", None):
    if offline_env:
      monkeypatch.setenv(offline_env, "1")
    else:  # no variable set, but nothing listens at the endpoint
      monkeypatch.delenv("HF_HUB_OFFLINE")
      server.httpd.shutdown()
      server.httpd.server_close()
    for name, field in (("ViT-B/32", "clip"), ("vit_base_patch32_384", "timm_vit")):
      start = time.monotonic()
      with pytest.raises(weights.WeightsError, match=(
          rf"config.init.{field}='{re.escape(name)}': .* is not in the cache and the network "
          r"is off \(.*\): run once with a network, or pass a local path")):
        weights.resolve(name, kind=field, what=f"config.init.{field}")
      assert time.monotonic() - start < 10


def test_unknown_names_and_wrong_kinds(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(FileNotFoundError, match=r"config.init.clip='/no/such.pt' does not "
                     r"exist; expected a local path, .*'ViT-B/32'"):
    weights.resolve("/no/such.pt", kind="clip", what="config.init.clip")
  with pytest.raises(weights.WeightsError, match=r"config.init.clip='resnet101' names "
                     "torchvision_resnet weights; config.init.clip expects clip weights"):
    weights.resolve("resnet101", kind="clip", what="config.init.clip")
  local = tmp_path / "vit.safetensors"
  local.write_bytes(b"x")
  assert weights.resolve(str(local), kind="timm_vit", what="x") == str(local)


_RACE_SCRIPT = """
import sys
from lseg_jax import weights
print(weights.resolve(sys.argv[1], kind="clip", what="test"))
"""


def test_two_processes_at_once_download_once(server, tmp_path):
  """Two processes resolve the same URL at the same moment: one download, one file."""
  url = server.url + server.clip_path
  server.delay_s = 1.0
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  procs = [subprocess.Popen([sys.executable, "-c", _RACE_SCRIPT, url], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
  paths = {o[0].strip() for o in outs}
  assert paths == {weights.url_cache_path(url)}
  assert server.gets(server.clip_path) == 1
  assert weights.file_sha256(paths.pop()) == weights.OFFICIAL["ViT-B/32"].sha256


@pytest.mark.parametrize("name,arg", [
    ("ade20k", "variant=vitl16"), ("ade20k", "variant=vitb32"), ("ade20k", "variant=rn50x16"),
    ("fewshot", "dataset=pascal,fold=1"), ("fewshot", "dataset=fss,backbone=clip_vitl16_384"),
    ("mix7", None)])
def test_paper_configs_name_official_weights_of_their_backbone(name, arg):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  given = {k: v for k, v in config.init.items() if v}
  image, text_variant = lseg.BACKBONES[config.model.backbone]
  image_field = "torchvision_resnet" if image.startswith("resnet") else "timm_vit"
  assert set(given) == {image_field, "clip"}
  for field, spec in given.items():
    assert weights.OFFICIAL[spec].kind == field
  assert given["clip"].replace("ViT-", "") == text_variant  # "ViT-B/32" -> "B/32"
  assert given[image_field] == {"L/16": "vit_large_patch16_384", "B/32": "vit_base_patch32_384",
                                "resnet101": "resnet101"}[image]
  # runlocal and the built-in default download nothing.
  local = importlib.import_module(f"configs.{name}").get_config(
      ",".join(filter(None, [arg, "runlocal"])))
  assert not any(local.init.values())
  assert not any(importlib.import_module("configs.synthetic_tiny").get_config().init.values())


@pytest.mark.slow
def test_convert_import_and_export_take_urls_and_names(server, source, tmp_path, capsys):
  """`tools/convert.py import URL` (a lang-seg layout file on the server) and
  `export --clip-weights ViT-B/32`; a bad URL is one error line."""
  from lseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from lseg_jax.cli import convert  # pylint: disable=g-import-not-at-top
  from lseg_jax.convert import langseg  # pylint: disable=g-import-not-at-top
  data = _safetensors_bytes(langseg.export_langseg(source))
  server.files[f"/ckpt/{digest_of(data)}/lseg_tiny.safetensors"] = data
  url = f"{server.url}/ckpt/{digest_of(data)}/lseg_tiny.safetensors"
  assert convert.main(["import", url, str(tmp_path / "ckpt")]) == 0, capsys.readouterr().err
  model, _ = checkpoint.load_model(str(tmp_path / "ckpt"))
  want = _flat(source, "")
  got = _flat(model, "")
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)

  # The served ViT-B-32.pt holds the text tower only: export resolves the name to the
  # downloaded file and reads it, which then lacks the image tower export adds.
  pytest.importorskip("torch")
  capsys.readouterr()
  assert cli_common.run(convert.main, ["export", str(tmp_path / "ckpt"),
                                       str(tmp_path / "out.pt"),
                                       "--clip-weights", "ViT-B/32"]) == 2
  err = capsys.readouterr().err
  assert weights.url_cache_path(weights.OFFICIAL["ViT-B/32"].url) in err
  assert "has no image tower" in err and server.gets(server.clip_path) == 1
  assert cli_common.run(convert.main,
                        ["import", server.url + "/ckpt/missing.pt", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err
  assert "error: SRC='" in err and "answered HTTP 404" in err and len(err.splitlines()) == 1


def test_hub_clip_id_gives_a_folder_and_missing_files_are_named(server):
  """A transformers CLIP repo id resolves to the snapshot folder holding config.json and
  model.safetensors (what `config.init.clip` reads as a Hugging Face folder)."""
  server.hub[("lseg-tests/clip-tiny", "config.json")] = b'{"model_type": "clip"}'
  server.hub[("lseg-tests/clip-tiny", "model.safetensors")] = server.hub[
      (VIT_REPO, "model.safetensors")]
  folder = weights.resolve("lseg-tests/clip-tiny", kind="clip", what="config.init.clip")
  assert os.path.isdir(folder)
  assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
  server.hub[("lseg-tests/config-only", "config.json")] = b"{}"
  with pytest.raises(weights.WeightsError, match=r"config.init.timm_vit='lseg-tests/config-only'"
                     r": Hugging Face Hub repo 'lseg-tests/config-only' has none of "
                     r"model.safetensors or pytorch_model.bin"):
    weights.resolve("lseg-tests/config-only", kind="timm_vit", what="config.init.timm_vit")
  with pytest.raises(weights.WeightsError, match="no Hugging Face Hub repo 'nobody/nothing'"):
    weights.resolve("nobody/nothing", kind="timm_vit", what="config.init.timm_vit")


# ---------------------------------------------------------------------------
# Tokenizers by name (`text.load_tokenizer`): the same kinds of names as the weights.
# ---------------------------------------------------------------------------
CLIP_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "clip_tokenizer"
TOKENIZER_LABELS = ["a photo of a cat.", "dog", "traffic light", "naïve café", "RN50x16"]


@pytest.fixture
def tokenizer_hub(tmp_path, monkeypatch):
  """A fake Hub whose CLIP repos (every repo of `weights.CLIP_TOKENIZERS`) hold the real
  CLIP tokenizer files; HF_HOME and HF_ENDPOINT point at tmp_path and the server."""
  if not (CLIP_TOKENIZER / "merges.txt").is_file():
    pytest.skip("CLIP tokenizer files not available")
  srv = FakeServer()
  for repo in set(weights.CLIP_TOKENIZERS.values()):
    for f in weights.TOKENIZER_FILES[0]:
      srv.hub[(repo, f)] = (CLIP_TOKENIZER / f).read_bytes()
  monkeypatch.setenv("HF_ENDPOINT", srv.url)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    monkeypatch.delenv(var, raising=False)
  yield srv
  srv.httpd.shutdown()
  srv.httpd.server_close()


def test_every_official_clip_name_has_a_tokenizer():
  assert set(weights.names("clip")) <= set(weights.CLIP_TOKENIZERS)
  assert all(weights.HUB_ID.fullmatch(r) for r in weights.CLIP_TOKENIZERS.values())


def test_tokenizer_by_official_name_and_hub_id_tokenizes_as_the_local_folder(
    tokenizer_hub, tmp_path, monkeypatch):
  want = text.tokenize(TOKENIZER_LABELS, text.load_tokenizer(CLIP_TOKENIZER))
  assert want[0, 1] == 320  # "a" in OpenAI's vocabulary: the real BPE, not a toy one
  for name in ("ViT-B/32", "RN50x16", "ViT-B/16", "openai/clip-vit-base-patch32"):
    np.testing.assert_array_equal(
        text.tokenize(TOKENIZER_LABELS, text.load_tokenizer(name)), want, err_msg=name)
  # One download per file and repo, into HF_HOME; RN50x16 shares ViT-B/32's repo.
  for repo in ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16"):
    for f in weights.TOKENIZER_FILES[0]:
      assert tokenizer_hub.gets(f"/{repo}/resolve/main/{f}") == 1, (repo, f)
  assert tokenizer_hub.gets("/openai/clip-vit-large-patch14/resolve/main/vocab.json") == 0
  assert list((tmp_path / "hf" / "hub").glob("models--openai--clip-vit-base-patch32/"
                                             "snapshots/*/merges.txt"))
  # Cached: offline now, with the server gone, every name still loads.
  tokenizer_hub.httpd.shutdown()
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  for name in ("ViT-B/32", "RN50", "openai/clip-vit-base-patch32"):
    np.testing.assert_array_equal(
        text.tokenize(TOKENIZER_LABELS, text.load_tokenizer(name)), want, err_msg=name)


def test_tokenizer_repo_without_config_files_and_missing_repos(tokenizer_hub):
  for f in ("vocab.json", "merges.txt"):
    tokenizer_hub.hub[("lseg-tests/bpe-only", f)] = (CLIP_TOKENIZER / f).read_bytes()
  tokenizer_hub.hub[("lseg-tests/no-bpe", "config.json")] = b"{}"
  want = text.tokenize(TOKENIZER_LABELS, text.load_tokenizer(CLIP_TOKENIZER))
  np.testing.assert_array_equal(
      text.tokenize(TOKENIZER_LABELS, text.load_tokenizer("lseg-tests/bpe-only")), want)
  with pytest.raises(weights.WeightsError, match=r"tokenizer 'lseg-tests/no-bpe': Hugging "
                     r"Face Hub repo 'lseg-tests/no-bpe' has none of .*vocab.json \+ "
                     r"merges.txt; nor is it a local folder"):
    text.load_tokenizer("lseg-tests/no-bpe")
  with pytest.raises(weights.WeightsError, match=r"no Hugging Face Hub repo 'my/tokenizer' "
                     r".*nor is it a local folder"):
    text.load_tokenizer("my/tokenizer")


def test_tokenizer_offline_with_an_empty_cache_fails_fast_naming_the_fix(
    tokenizer_hub, monkeypatch):
  for offline_env in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", None):
    if offline_env:
      monkeypatch.setenv(offline_env, "1")
    else:  # no variable set, but nothing listens at the endpoint
      monkeypatch.delenv("HF_HUB_OFFLINE")
      monkeypatch.delenv("TRANSFORMERS_OFFLINE")
      tokenizer_hub.httpd.shutdown()
      tokenizer_hub.httpd.server_close()
    for name, repo in (("ViT-B/32", "openai/clip-vit-base-patch32"),
                       ("openai/clip-vit-base-patch16", None)):
      start = time.monotonic()
      with pytest.raises(errors.MissingFileError) as info:
        text.load_tokenizer(name)
      assert time.monotonic() - start < 10
      message = str(info.value)
      assert "\n" not in message
      where = f"tokenizer '{name}'" + (f" (Hub repo '{repo}')" if repo else "")
      assert message.startswith(
          f"{where} (vocab.json, merges.txt) is not in the local Hugging Face cache and the "
          "hub cannot be reached (offline); pass --tokenizer FOLDER"), message
    assert not any(tokenizer_hub.requests.values())


def test_unknown_tokenizer_name_names_the_known_ones(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  for name in ("ViT-B-32", "clip", "/no/such/folder"):
    with pytest.raises(errors.UserError, match=(
        rf"tokenizer '{re.escape(name)}' is not a folder, a Hugging Face Hub id "
        r"\(owner/name\) or 'byte-level'; expected one of those or an official CLIP name, "
        r"one of \['RN50', .*'ViT-B/32', 'ViT-B/16', .*\]")):
      text.load_tokenizer(name)
  assert len(text.load_tokenizer(text.BYTE_LEVEL_TOKENIZER)) == text.BYTE_LEVEL_VOCAB_SIZE


def test_predict_tool_takes_an_official_tokenizer_name(tokenizer_hub, tmp_path, capsys):
  """A checkpoint whose meta names "ViT-B/32" predicts with the Hub's tokenizer exactly as
  with the local folder; a bad --tokenizer is one `error:` line; a tokenizer larger than
  the text tower's vocabulary is a user error too."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from lseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from lseg_jax.cli import common, predict  # pylint: disable=g-import-not-at-top
  model = lseg.LSeg(lseg.LSegConfig(backbone="tiny_vit32", text_vocab_size=49408),
                    rngs=nnx.Rngs(3))
  checkpoint.save_model(str(tmp_path / "ckpt"), model, extra_meta={"tokenizer": "ViT-B/32"})
  checkpoint.save_model(str(tmp_path / "byte"), lseg.LSeg(lseg.LSegConfig(
      backbone="tiny_vit32", text_vocab_size=text.BYTE_LEVEL_VOCAB_SIZE), rngs=nnx.Rngs(3)),
                        extra_meta={"tokenizer": "byte-level"})
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
      tmp_path / "img.png")

  def predict_args(ckpt, name, *tokenizer):
    return ["--checkpoint", str(tmp_path / ckpt), "--image", str(tmp_path / "img.png"),
            "--labels", "cat,traffic light", "--out", str(tmp_path / f"{name}.png"),
            "--logits-out", str(tmp_path / f"{name}.npz"), *tokenizer]

  assert common.run(predict.main, predict_args("ckpt", "by_name")) == 0
  assert common.run(predict.main, predict_args(
      "ckpt", "by_folder", "--tokenizer", str(CLIP_TOKENIZER))) == 0
  assert tokenizer_hub.gets("/openai/clip-vit-base-patch32/resolve/main/vocab.json") == 1
  by_name = np.load(tmp_path / "by_name.npz")["logits"]
  np.testing.assert_array_equal(by_name, np.load(tmp_path / "by_folder.npz")["logits"])
  assert json.loads((tmp_path / "by_name.json").read_text())["tokenizer"] == "ViT-B/32"
  capsys.readouterr()
  assert common.run(predict.main, predict_args(
      "ckpt", "bad", "--tokenizer", "ViT-B-32")) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: tokenizer 'ViT-B-32' is not a folder") and "\n" not in err
  assert common.run(predict.main, predict_args(
      "byte", "bad", "--tokenizer", "RN50x16")) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: the tokenizer has 49408 tokens but the text tower's "
                        f"vocabulary has {text.BYTE_LEVEL_VOCAB_SIZE}"), err
