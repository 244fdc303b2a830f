"""Pretrained weights by name: a path, a Hub id, a URL or an official name -> a local file.

`resolve(spec, kind=..., what=...)` accepts, in this order, a local path (returned as it is),
an official name (`OFFICIAL`), an http(s) URL and a Hugging Face Hub id (`owner/name`);
docs/interop.md, "Pretrained weights by name", says where each comes from, how it is checked
(SHA-256) and how downloads behave (verified before they are renamed into place; processes
resolving one name at once share its download through a file lock). Direct downloads live in
`$LSEG_JAX_CACHE` (default `~/.cache/lseg_jax`, under `$XDG_CACHE_HOME` when set);
`HF_HUB_OFFLINE=1` turns their network use off too. Every failure is a `WeightsError` (an
OSError, so the tools print it as one `error: ...` line) naming the spec and what to do.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import re
import socket
import tempfile
from typing import Sequence
import urllib.error
import urllib.parse
import urllib.request

from lseg_jax.errors import UserError

# Seconds without a byte from the server before a download is given up (also the
# connect timeout): offline machines fail within this, never in a retry loop.
TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5.0
KINDS = ("timm_vit", "torchvision_resnet", "clip", "checkpoint")


class WeightsError(UserError, OSError):
  """A name that cannot be resolved, a failed download, or a file whose hash differs (a
  user error: `error: ...` in the tools; also an OSError, for callers that handle that)."""


@dataclasses.dataclass(frozen=True)
class Official:
  """Where one official name's file comes from."""
  kind: str  # the `config.init` field that takes it
  url: str = ""  # a direct download, or:
  hub: str = ""  # a Hugging Face Hub repo and
  filename: str = ""  # its file
  sha256: str = ""  # only where a source states it (OpenAI's URLs, the Hub for LFS files)
  sha256_prefix: str = ""  # torchvision's `name-<first 8+ hex digits>.pth`
  source: str = ""  # evidence that the official code loaded this file (docs/interop.md)


_CLIP = "https://openaipublic.azureedge.net/clip/models/{}/{}"
_AUGREG = "https://storage.googleapis.com/vit_models/augreg/"

# The one table of official names (docs/interop.md holds the evidence for each entry).
OFFICIAL: dict[str, Official] = {
    # lang-seg pins timm==0.4.12, whose default_cfgs load Google's AugReg npz files
    # (ImageNet-21k pretraining, ImageNet-1k fine-tuning at 384 px); today's timm maps
    # the same npz URL to the Hub tag named here, which holds those weights as safetensors.
    "vit_large_patch16_384": Official(
        "timm_vit", hub="timm/vit_large_patch16_384.augreg_in21k_ft_in1k",
        filename="model.safetensors",
        source=_AUGREG + "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1"
        "--imagenet2012-steps_20k-lr_0.01-res_384.npz"),
    "vit_base_patch32_384": Official(
        "timm_vit", hub="timm/vit_base_patch32_384.augreg_in21k_ft_in1k",
        filename="model.safetensors",
        source=_AUGREG + "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0"
        "--imagenet2012-steps_20k-lr_0.03-res_384.npz"),
    # `clip.load(name)` of openai/CLIP (lang-seg pins commit 04f4dc2); the URL's
    # directory is the file's SHA-256, which clip.load itself checks.
    "ViT-B/32": Official(
        "clip", url=_CLIP.format(
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
        sha256="40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
        source="openai/CLIP clip/clip.py _MODELS"),
    "RN50x16": Official(
        "clip", url=_CLIP.format(
            "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
        sha256="52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
        source="openai/CLIP clip/clip.py _MODELS"),
    # torchvision's `resnet101(pretrained=True)` (IMAGENET1K_V1); the file name carries
    # the first 8 hex digits of its SHA-256 (what torch.hub checks).
    "resnet101": Official(
        "torchvision_resnet", url="https://download.pytorch.org/models/resnet101-63fe2227.pth",
        sha256_prefix="63fe2227", source="torchvision models/resnet.py"),
}

# The Hub repo holding the tokenizer files (vocab.json, merges.txt) of each name that openai/CLIP's
# `clip.load` takes, for `config.text.tokenizer` / `--tokenizer` (`lseg_jax.text.load_tokenizer`).
# `clip.tokenize` reads one BPE (bpe_simple_vocab_16e6) for every model, so all entries give the
# same tokenizer; OpenAI published transformers files only for its ViT models, so the ResNet names
# point at the ViT-B/32 repo. Every "clip" name of OFFICIAL has an entry (tests check it).
CLIP_TOKENIZERS: dict[str, str] = {
    **dict.fromkeys(("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32"),
                    "openai/clip-vit-base-patch32"),
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
# The files of a Hub repo a tokenizer is read from (the first group the repo has).
TOKENIZER_FILES = (("vocab.json", "merges.txt", "tokenizer_config.json",
                    "special_tokens_map.json"), ("vocab.json", "merges.txt"))

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Per kind, the files a Hub repo is read for (in order of preference; a folder kind
# needs all files of one group).
_HUB_FILES = {
    "timm_vit": (("model.safetensors",), ("pytorch_model.bin",)),
    "torchvision_resnet": (("model.safetensors",), ("pytorch_model.bin",)),
    "clip": (("config.json", "model.safetensors"), ("config.json", "pytorch_model.bin")),
}
_FOLDER_KINDS = ("clip",)


def cache_dir() -> str:
  """The directory of direct (non-Hub) downloads."""
  if os.environ.get("LSEG_JAX_CACHE"):
    return os.environ["LSEG_JAX_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "lseg_jax")


def offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def names(kind: str | None = None) -> list[str]:
  """The official names (of one `kind`)."""
  return [n for n, e in OFFICIAL.items() if kind is None or e.kind == kind]


def resolve(spec: str | os.PathLike, *, kind: str, what: str) -> str:
  """A local path (a file; a folder for a Hub CLIP repo) holding `spec`'s weights (module
  docstring). `kind` (`KINDS`) chooses the files of a Hub repo and refuses an official
  name of another kind; `what` is how the user wrote it ("config.init.clip")."""
  assert kind in KINDS, kind
  spec = os.fspath(spec)
  if os.path.exists(spec):
    return spec
  label = f"{what}={spec!r}"
  if spec in OFFICIAL:
    entry = OFFICIAL[spec]
    if entry.kind != kind:
      raise WeightsError(f"{label} names {entry.kind} weights; {what} expects {kind} "
                         f"weights: a path, a URL, a Hub id, or one of {names(kind)}")
    if entry.hub:
      return hub_files(entry.hub, ((entry.filename,),), label, sha256=entry.sha256)[0]
    return download_url(entry.url, label, sha256=entry.sha256, sha256_prefix=entry.sha256_prefix)
  if spec.startswith(("http://", "https://")):
    return download_url(spec, label)
  if HUB_ID.fullmatch(spec):
    paths = hub_files(spec, _HUB_FILES.get(kind, (("model.safetensors",),)), label)
    return os.path.dirname(paths[0]) if kind in _FOLDER_KINDS else paths[0]
  known = f", one of {names(kind)}" if names(kind) else ""
  raise FileNotFoundError(
      f"{label} does not exist; expected a local path, an http(s) URL, a Hugging Face "
      f"Hub id (owner/name){known}")


# --- Direct URLs ---
def url_cache_path(url: str) -> str:
  """Where `download_url` keeps `url`'s file: the URL's own file name, in a folder
  named by the URL's hash (two URLs never share a file)."""
  name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
  return os.path.join(cache_dir(), "urls", hashlib.sha256(url.encode()).hexdigest()[:16], name)


def _no_network(label: str, where: str, cause: str) -> WeightsError:
  return WeightsError(
      f"{label}: {where} is not in the cache and the network is off ({cause}): run once "
      "with a network, or pass a local path")


def download_url(url: str, label: str, *, sha256: str = "", sha256_prefix: str = "") -> str:
  """`url`'s file in the cache (downloaded once, verified; see the module docstring).

  `sha256` defaults to a 64-hex-digit component of the URL's path; without either
  the file is kept as the server sent it (its size checked against Content-Length).
  """
  import filelock  # pylint: disable=g-import-not-at-top
  parts = urllib.parse.urlparse(url).path.split("/")
  sha256 = (sha256 or next((p for p in parts if _SHA256.fullmatch(p)), "")).lower()
  dest = url_cache_path(url)
  if os.path.isfile(dest):
    return dest
  if offline():
    raise _no_network(label, url, "HF_HUB_OFFLINE is set")
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  with filelock.FileLock(dest + ".lock"):
    if not os.path.isfile(dest):  # another process may have finished it meanwhile
      _fetch(url, dest, label, sha256, sha256_prefix.lower())
  return dest


def _fetch(url: str, dest: str, label: str, sha256: str, sha256_prefix: str) -> None:
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  name = os.path.basename(dest)
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=os.path.dirname(dest))
  try:
    digest, size = hashlib.sha256(), 0
    with os.fdopen(fd, "wb") as out:
      request = urllib.request.Request(url, headers={"User-Agent": "lseg-jax"})
      try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
          total = int(response.headers.get("Content-Length") or 0) or None
          with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=None) as bar:
            while chunk := response.read(1 << 20):
              out.write(chunk)
              digest.update(chunk)
              size += len(chunk)
              bar.update(len(chunk))
      except urllib.error.HTTPError as e:
        raise WeightsError(f"{label}: {url} answered HTTP {e.code} ({e.reason})") from None
      except urllib.error.URLError as e:
        raise _no_network(label, url, f"cannot reach it: {e.reason}") from None
      except (OSError, http.client.HTTPException, socket.timeout) as e:
        raise WeightsError(f"{label}: the download of {url} broke off after {size} bytes ({e!r}); "
                           "nothing was kept: run again to restart it") from None
    if total is not None and size != total:
      raise WeightsError(f"{label}: the download of {url} stopped at {size} of {total} "
                         "bytes; nothing was kept: run again to restart it")
    got = digest.hexdigest()
    if (sha256 and got != sha256) or not got.startswith(sha256_prefix):
      raise WeightsError(
          f"{label}: {url} has SHA-256 {got}, expected {sha256 or sha256_prefix + '...'}; "
          "the file was not kept (a damaged download or a changed file: try again, or "
          "pass a local path you trust)")
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# --- Hugging Face Hub ---
def hub_cache_dir() -> str | None:
  """huggingface_hub's cache as the environment says now (it reads its variables once,
  at import); None: its default."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.environ["HF_HUB_CACHE"]
  if os.environ.get("HF_HOME"):
    return os.path.join(os.environ["HF_HOME"], "hub")
  return None


def hub_cached(repo: str, groups: Sequence[Sequence[str]]) -> list[str] | None:
  """Local paths of the first group of `repo`'s files that is all in the Hub cache
  (no network); None if no group is."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  for files in groups:
    cached = [huggingface_hub.try_to_load_from_cache(repo, f, cache_dir=hub_cache_dir())
              for f in files]
    if all(isinstance(p, str) for p in cached):
      return cached
  return None


def hub_files(repo: str, groups: Sequence[Sequence[str]], label: str, *,
               sha256: str = "") -> list[str]:
  """Local paths of the first group of files that Hub repo `repo` has: from the cache,
  else downloaded (a `WeightsError` naming `label` if they cannot be)."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  cached = hub_cached(repo, groups)
  if cached:
    return cached
  where = f"Hugging Face Hub repo {repo!r} ({' + '.join(groups[0])})"
  if offline():
    raise _no_network(label, where, "HF_HUB_OFFLINE is set")
  unreachable = hub_unreachable()
  if unreachable:
    raise _no_network(label, where, unreachable)
  missing = []
  for files in groups:
    try:
      return [_hub_download(repo, f, label, sha256 if len(files) == 1 else "") for f in files]
    except huggingface_hub.errors.RemoteEntryNotFoundError:
      missing.append(" + ".join(files))
  raise WeightsError(f"{label}: Hugging Face Hub repo {repo!r} has none of {' or '.join(missing)}")


def hub_unreachable(timeout: float = CONNECT_TIMEOUT_S) -> str | None:
  """Why the Hub (`HF_ENDPOINT`) cannot be reached, by one connect attempt
  (huggingface_hub retries an unreachable host for ~20 s); None if it can."""
  endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
  port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
  try:
    socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    return None
  except OSError as e:
    return f"cannot reach {endpoint.hostname}: {e}"


def _hub_download(repo: str, filename: str, label: str, sha256: str) -> str:
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  where = f"{repo}/{filename}"
  try:
    path = huggingface_hub.hf_hub_download(
        repo, filename, cache_dir=hub_cache_dir(), etag_timeout=TIMEOUT_S,
        endpoint=os.environ.get("HF_ENDPOINT") or None)
  except errors.RemoteEntryNotFoundError:
    raise
  except (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.RevisionNotFoundError) as e:
    raise WeightsError(f"{label}: no Hugging Face Hub repo {repo!r} readable without a "
                       f"login ({type(e).__name__}); check the name") from None
  except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:
    cause = "HF_HUB_OFFLINE is set" if offline() else "the Hub cannot be reached"
    raise _no_network(label, where, cause) from e
  except errors.HfHubHTTPError as e:
    raise WeightsError(f"{label}: downloading {where} failed: {str(e).splitlines()[0]}") from None
  blob = os.path.realpath(path)
  expected = (sha256 or (os.path.basename(blob) if _SHA256.fullmatch(
      os.path.basename(blob)) else "")).lower()
  if expected:
    got = file_sha256(blob)
    if got != expected:
      for p in {path, blob}:
        if os.path.lexists(p):
          os.remove(p)
      raise WeightsError(
          f"{label}: {where} has SHA-256 {got}, expected {expected}; the file was not "
          "kept (a damaged download or a changed file: try again, or pass a local path)")
  return path


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()
