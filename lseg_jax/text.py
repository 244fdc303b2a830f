"""CLIP tokenizer and the label-embedding cache.

`tokenize` reproduces OpenAI's `clip.tokenize` (its text cleaning with ftfy, the
CLIP BPE through transformers' `CLIPTokenizer`, start/end tokens, zero padding to
77). The text tower is frozen, so `LabelEmbedder` runs it once per label set and
caches the result: a training or evaluation step only ever sees `[L, D]` arrays.
"""
from __future__ import annotations

import collections
import html
import os
import re
from typing import Any, Sequence
import warnings

from etils import epath
from flax import nnx
import ftfy
import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax import weights
from lseg_jax.errors import MissingFileError, UserError

CONTEXT_LENGTH = 77
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
DEFAULT_TOKENIZER = "openai/clip-vit-base-patch32"
BYTE_LEVEL_TOKENIZER = "byte-level"
# Token ids of the byte-level tokenizer: 256 bytes, the same with CLIP's end-of-word
# mark, start and end of text.
BYTE_LEVEL_VOCAB_SIZE = 2 * 256 + 2


def byte_level_tokenizer():
  """A CLIP tokenizer without merges (every byte of a word is a token, ids <
  `BYTE_LEVEL_VOCAB_SIZE`) and without vocabulary files, for tiny random text towers."""
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  chars = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = chars + [c + "</w>" for c in chars] + [START_TOKEN, END_TOKEN]
  assert len(vocab) == BYTE_LEVEL_VOCAB_SIZE
  return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[])


def load_tokenizer(path_or_name: str | os.PathLike = DEFAULT_TOKENIZER):
  """A transformers `CLIPTokenizer` by name, as `lseg_jax.weights` takes weights.

  path_or_name:
    * a local folder with vocab.json + merges.txt (or a saved tokenizer);
    * "byte-level" (`byte_level_tokenizer`, no files needed);
    * a name `clip.load` takes (`weights.CLIP_TOKENIZERS`: "ViT-B/32", "RN50x16", ...),
      read from the Hub repo that table names;
    * a Hugging Face Hub id (owner/name, e.g. "openai/clip-vit-base-patch32").
  Hub files come from huggingface_hub's cache, else are downloaded unless offline or
  unreachable within seconds (then a `MissingFileError` naming the fix).
  """
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  path = os.fspath(path_or_name)
  if path == BYTE_LEVEL_TOKENIZER:
    return byte_level_tokenizer()
  if os.path.isdir(path):
    missing = [f for f in ("vocab.json", "merges.txt") if not os.path.isfile(os.path.join(path, f))]
    if missing and not os.path.isfile(os.path.join(path, "tokenizer.json")):
      raise MissingFileError(f"tokenizer folder {path!r} lacks {missing}")
    tokenizer = CLIPTokenizer.from_pretrained(path)
  else:
    tokenizer = CLIPTokenizer.from_pretrained(_hub_folder(path))
  for token in (START_TOKEN, END_TOKEN):
    if token not in tokenizer.get_vocab():
      raise UserError(f"tokenizer {path!r} has no {token!r} token; not a CLIP vocabulary")
  return tokenizer


def _hub_folder(name: str) -> str:
  """The local folder of Hub tokenizer `name` (an official CLIP name or a Hub id): the
  cache, else a download if the Hub answers within seconds; no retries."""
  repo = weights.CLIP_TOKENIZERS.get(name, name)
  if not weights.HUB_ID.fullmatch(repo):
    raise UserError(
        f"tokenizer {name!r} is not a folder, a Hugging Face Hub id (owner/name) or "
        f"{BYTE_LEVEL_TOKENIZER!r}; expected one of those or an official CLIP name, one "
        f"of {list(weights.CLIP_TOKENIZERS)}")
  label = f"tokenizer {name!r}" + (f" (Hub repo {repo!r})" if repo != name else "")
  cached = weights.hub_cached(repo, weights.TOKENIZER_FILES)
  if cached:
    return os.path.dirname(cached[0])
  offline = any(os.environ.get(v, "") not in ("", "0")
                for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
  if offline or weights.hub_unreachable(3.0) is not None:
    raise MissingFileError(
        f"{label} (vocab.json, merges.txt) is not in the local Hugging Face cache and the hub "
        "cannot be reached (offline); pass --tokenizer FOLDER with vocab.json and merges.txt "
        f"(byte-level for the tiny test models), or fetch {name!r} once while online")
  try:
    return os.path.dirname(weights.hub_files(repo, weights.TOKENIZER_FILES, label)[0])
  except weights.WeightsError as e:
    if repo == name:  # a mistyped relative folder looks like a Hub id
      raise weights.WeightsError(f"{e}; nor is it a local folder") from None
    raise


def clean_text(text: str) -> str:
  """OpenAI CLIP's text cleaning: ftfy, HTML unescaping, whitespace collapsing, lower case."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return re.sub(r"\s+", " ", text).strip().lower()


def validate_labels(labels: Sequence[str]) -> list[str]:
  """The label set as a list; ValueError for a bare string, an empty set, a blank label,
  or labels equal after cleaning (they would get the same embedding)."""
  if isinstance(labels, (str, bytes)):
    raise ValueError(f"expected a sequence of label names, got the single string {labels!r}")
  labels = list(labels)
  if not labels:
    raise ValueError("the label set is empty; expected at least one label name")
  seen = {}
  for i, label in enumerate(labels):
    if not isinstance(label, str):
      raise ValueError(f"label {i} is {label!r} ({type(label).__name__}); expected a string")
    key = clean_text(label)
    if not key:
      raise ValueError(f"label {i} is blank ({label!r}); expected a non-empty name")
    if key in seen:
      j = seen[key]
      raise ValueError(f"duplicate labels: {labels[j]!r} (index {j}) and {label!r} (index {i})")
    seen[key] = i
  return labels


def tokenize(labels: Sequence[str], tokenizer, context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """Label names -> token ids [N, context_length] int32, as `clip.tokenize`.

  Each row is [start, BPE tokens..., end, 0, ...]. A label too long for the
  context is truncated and its last token set to end-of-text (as
  `clip.tokenize(..., truncate=True)`), with a warning naming the label.
  """
  labels = validate_labels(labels)
  if context_length < 2:
    raise ValueError(f"context_length {context_length} cannot hold start and end tokens")
  start, end = tokenizer.convert_tokens_to_ids([START_TOKEN, END_TOKEN])
  encoded = _encode(labels, tokenizer)
  tokens = np.zeros((len(labels), context_length), np.int32)
  for i, (label, ids) in enumerate(zip(labels, encoded)):
    ids = [start, *ids, end]
    if len(ids) > context_length:
      warnings.warn(f"label {label!r} has {len(ids)} tokens; truncated to the context "
                    f"length {context_length}")
      ids = ids[:context_length - 1] + [end]
    tokens[i, :len(ids)] = ids
  return tokens


def _encode(texts: Sequence[str], tokenizer) -> list[list[int]]:
  """BPE ids of the cleaned texts, without start and end tokens."""
  return tokenizer([clean_text(s) for s in texts], add_special_tokens=False)["input_ids"]


def token_counts(texts: Sequence[str], tokenizer) -> list[int]:
  """Tokens each text takes in the context, start and end tokens included (as
  `tokenize` counts them: a count above the context length is truncated)."""
  return [len(ids) + 2 for ids in _encode(list(texts), tokenizer)]


class LabelEmbedder:
  """Label names -> the text tower's raw (unnormalised) embeddings [L, D], one jitted
  tower call per new (template, labels) key, then served from the cache. The tower's
  weights are read at each cache miss: call `clear()` after changing them.

  `text_model` maps tokens [N, T] int32 -> [N, D] (`CLIPTextTransformer`); `template`
  has one "{}" (None: bare names, as LSeg); `context_length` defaults to the model's;
  `max_cached` bounds the cache, least recently used dropped (None: unbounded).
  """

  def __init__(self, text_model: nnx.Module, tokenizer, template: str | None = None,
               context_length: int | None = None, max_cached: int | None = None):
    _check_template(template)
    if max_cached is not None and max_cached < 1:
      raise ValueError(f"max_cached={max_cached}; expected >= 1 or None")
    if context_length is None:
      context_length = getattr(getattr(text_model, "cfg", None), "context_length", CONTEXT_LENGTH)
    self.vocab_size = getattr(getattr(text_model, "cfg", None), "vocab_size", None)
    if self.vocab_size is not None and len(tokenizer) > self.vocab_size:
      raise UserError(
          f"the tokenizer has {len(tokenizer)} tokens but the text tower's vocabulary has "
          f"{self.vocab_size}: its ids would index past the embedding table; pass the "
          "tokenizer the model was trained with (e.g. --tokenizer)")
    self.text_model = text_model
    self.tokenizer = tokenizer
    self.template = template
    self.context_length = context_length
    self.max_cached = max_cached
    self.num_computed = 0  # tower runs so far (cache misses)
    self._cache: collections.OrderedDict[tuple, jax.Array] = collections.OrderedDict()
    graphdef, _ = nnx.split(text_model)
    self._encode = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))

  def template_for(self, template: str | None) -> str | None:
    """The template of a call: None -> the embedder's; "" -> bare names."""
    if template is None:
      return self.template
    _check_template(template or None)
    return template or None

  def prompts(self, labels: Sequence[str], template: str | None = None) -> list[str]:
    """The texts the tower reads: labels put into the template (see `__call__`)."""
    labels = validate_labels(labels)
    template = self.template_for(template)
    return labels if template is None else [template.format(s) for s in labels]

  def __call__(self, labels: Sequence[str], template: str | None = None) -> jax.Array:
    """labels (L names) -> float32 [L, D]; template None: the embedder's, "": bare names."""
    labels = tuple(validate_labels(labels))
    key = (self.template_for(template), labels)
    if key in self._cache:
      self._cache.move_to_end(key)
    else:
      tokens = tokenize(self.prompts(labels, template), self.tokenizer, self.context_length)
      if self.vocab_size is not None and tokens.max() >= self.vocab_size:
        raise UserError(f"token id {int(tokens.max())} of labels {list(labels)[:5]} is outside "
                         f"the text tower's vocabulary of {self.vocab_size}; pass the "
                         "tokenizer the model was trained with (e.g. --tokenizer)")
      self._cache[key] = self._encode(nnx.state(self.text_model), jnp.asarray(tokens)).astype(
          jnp.float32)
      self.num_computed += 1
      if self.max_cached is not None and len(self._cache) > self.max_cached:
        self._cache.popitem(last=False)
    return self._cache[key]

  def clear(self) -> None:
    self._cache.clear()

  def __len__(self) -> int:
    return len(self._cache)


def _check_template(template: str | None) -> None:
  if template is not None and template.count("{}") != 1:
    raise ValueError(f"template {template!r} must contain exactly one '{{}}'")


def checkpoint_label_embedder(model, meta: dict[str, Any], checkpoint_dir: str, *,
                              tokenizer: str | None = None, prompt: str | None = None):
  """The label embedder a checkpoint was trained with: (embedder, tokenizer spec, template).

  tokenizer (`load_tokenizer`) None: the meta's (a relative folder looked up in
  `checkpoint_dir` first), else `DEFAULT_TOKENIZER`; prompt None: the meta's
  "text_template", "": bare label names."""
  spec = tokenizer or meta.get("tokenizer") or DEFAULT_TOKENIZER
  if not tokenizer and meta.get("tokenizer") and not epath.Path(spec).is_absolute():
    local = epath.Path(checkpoint_dir) / spec
    spec = str(local) if local.is_dir() else spec
  template = meta.get("text_template") if prompt is None else prompt
  template = template or None
  embedder = LabelEmbedder(model.clip_pretrained, load_tokenizer(spec), template=template)
  return embedder, spec, template
