"""Tokenizer (vs a reference of OpenAI's clip.tokenize) and the label-embedding cache."""
import functools
import html
import json
from pathlib import Path

import ftfy
from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest
import regex

from lseg_jax import text
from lseg_jax.models import clip_text

CLIP_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "clip_tokenizer"
needs_clip_vocab = pytest.mark.skipif(
    not (CLIP_TOKENIZER / "merges.txt").is_file(), reason="CLIP tokenizer files not available")


# ---------------------------------------------------------------------------
# A reference of OpenAI's `clip.tokenize` (its simple_tokenizer algorithm),
# with the vocabulary built from the merges alone, as OpenAI builds it.
# ---------------------------------------------------------------------------
def byte_to_unicode():
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {b: chr(b) for b in printable}, 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


class ReferenceTokenizer:

  PATTERN = regex.compile(
      r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
      r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

  def __init__(self, merges):
    self.bytes = byte_to_unicode()
    symbols = list(self.bytes.values())
    symbols += [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    self.ids = {s: i for i, s in enumerate(symbols)}
    self.ranks = {tuple(m): i for i, m in enumerate(merges)}

  @functools.lru_cache(maxsize=None)
  def bpe(self, word):
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
      pairs = {(a, b) for a, b in zip(parts, parts[1:])}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return parts

  def encode(self, s):
    s = html.unescape(html.unescape(ftfy.fix_text(s))).strip()
    s = regex.sub(r"\s+", " ", s).strip().lower()
    ids = []
    for word in self.PATTERN.findall(s):
      word = "".join(self.bytes[b] for b in word.encode("utf-8"))
      ids += [self.ids[p] for p in self.bpe(word)]
    return ids

  def tokenize(self, labels, context_length=77):
    start, end = self.ids["<|startoftext|>"], self.ids["<|endoftext|>"]
    out = np.zeros((len(labels), context_length), np.int32)
    for i, label in enumerate(labels):
      ids = [start] + self.encode(label) + [end]
      if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = end
      out[i, :len(ids)] = ids
    return out


def read_merges(folder):
  lines = Path(folder, "merges.txt").read_text(encoding="utf-8").split("\n")
  # OpenAI keeps the first 49152 - 256 - 2 merges; the header line is skipped.
  return [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1] if line]


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
  """A CLIP-format vocabulary with a handful of merges, written in the test."""
  merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"),
            ("t", "re"), ("tre", "e</w>")]
  ref = ReferenceTokenizer(merges)
  folder = tmp_path_factory.mktemp("tiny_vocab")
  (folder / "vocab.json").write_text(json.dumps(ref.ids, ensure_ascii=False), encoding="utf-8")
  (folder / "merges.txt").write_text(
      "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
  return folder, ref


@pytest.fixture(scope="module")
def clip_vocab():
  if not (CLIP_TOKENIZER / "merges.txt").is_file():
    pytest.skip("CLIP tokenizer files not available")
  return text.load_tokenizer(CLIP_TOKENIZER), ReferenceTokenizer(read_merges(CLIP_TOKENIZER))


LABELS = [
    "wall", "building", "sky", "floor", "tree", "person", "chest of drawers", "tv-monitor",
    "pottedplant", "traffic light", "a photo of a cat.", "Hello,  World!!", "don't",
    "café crème", "naïve Ünïcödé", "&amp; ampersand", "route 66 and 2024", "🐱 cat",
    "ＦＵＬＬＷＩＤＴＨ", "tab\tand\nnewline", "ALL CAPS", "x-ray/ct scan (2)",
]


def test_tiny_vocab_matches_reference(tiny_vocab):
  folder, ref = tiny_vocab
  tok = text.load_tokenizer(folder)
  labels = ["cat", "dog cat", "tree", "cow", "Catdog!", "a tree, a dog."]
  got = text.tokenize(labels, tok)
  np.testing.assert_array_equal(got, ref.tokenize(labels))
  assert got.dtype == np.int32 and got.shape == (6, 77)
  cat, start, end = ref.ids["cat</w>"], ref.ids["<|startoftext|>"], ref.ids["<|endoftext|>"]
  assert list(got[0, :4]) == [start, cat, end, 0]
  # An unmerged word falls back to its bytes.
  assert list(got[3, 1:4]) == [ref.ids["c"], ref.ids["o"], ref.ids["w</w>"]]


def test_clip_vocab_matches_reference(clip_vocab):
  tok, ref = clip_vocab
  np.testing.assert_array_equal(text.tokenize(LABELS, tok), ref.tokenize(LABELS))
  # ftfy straightens the curly apostrophe, so this equals "don't" (and is a duplicate of it).
  np.testing.assert_array_equal(text.tokenize(["don’t"], tok), ref.tokenize(["don't"]))


@needs_clip_vocab
def test_known_clip_token_ids():
  tok = text.load_tokenizer(CLIP_TOKENIZER)
  got = text.tokenize(["a photo of a cat.", "dog"], tok)
  # clip.tokenize("a photo of a cat.") / ("dog") with OpenAI's released vocabulary.
  assert list(got[0, :9]) == [49406, 320, 1125, 539, 320, 2368, 269, 49407, 0]
  assert list(got[1, :4]) == [49406, 1929, 49407, 0]


def test_long_label_is_truncated_with_warning(clip_vocab):
  tok, ref = clip_vocab
  long = " ".join(["cat"] * 100)
  with pytest.warns(UserWarning, match="cat cat cat"):
    got = text.tokenize([long, "dog"], tok)
  np.testing.assert_array_equal(got, ref.tokenize([long, "dog"]))
  assert got[0, -1] == 49407 and got[0, 0] == 49406
  with pytest.warns(UserWarning, match="context length 8"):
    short = text.tokenize([long], tok, context_length=8)
  assert list(short[0]) == [49406] + [2368] * 6 + [49407]


@pytest.mark.parametrize("labels, match", [
    ([], "empty"),
    (["cat", "  "], "label 1 is blank"),
    (["cat", ""], "label 1 is blank"),
    (["cat", "dog", "cat"], "duplicate labels: 'cat' \\(index 0\\) and 'cat' \\(index 2\\)"),
    (["Cat", "cat "], "duplicate labels"),
    ("cat", "single string 'cat'"),
    (["cat", 3], "label 1 is 3"),
])
def test_bad_label_sets(tiny_vocab, labels, match):
  tok = text.load_tokenizer(tiny_vocab[0])
  with pytest.raises(ValueError, match=match):
    text.tokenize(labels, tok)


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="merges.txt"):
    (tmp_path / "vocab.json").write_text("{}")
    text.load_tokenizer(tmp_path)


def test_label_embedder_caches_per_label_set(tiny_vocab):
  folder, _ = tiny_vocab
  tok = text.load_tokenizer(folder)
  cfg = clip_text.decode_variant("tiny", vocab_size=len(json.loads(
      (folder / "vocab.json").read_text(encoding="utf-8"))))
  tower = clip_text.CLIPTextTransformer(cfg, rngs=nnx.Rngs(0))
  embedder = text.LabelEmbedder(tower, tok)

  a = embedder(["cat", "dog", "tree"])
  assert a.shape == (3, cfg.embed_dim) and a.dtype == jnp.float32
  assert embedder.num_computed == 1
  assert embedder(("cat", "dog", "tree")) is a  # same set, any sequence type: cached
  assert embedder.num_computed == 1
  b = embedder(["dog", "cat"])
  assert embedder.num_computed == 2 and len(embedder) == 2
  # Same embeddings as the tower on the tokens, label by label.
  want = nnx.jit(lambda m, t: m(t))(tower, jnp.asarray(text.tokenize(["cat", "dog", "tree"], tok)))
  np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(b, a[jnp.array([1, 0])], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="duplicate"):
    embedder(["cat", "cat"])


def test_label_embedder_runs_the_tower_once_per_set(tiny_vocab):
  folder, _ = tiny_vocab
  tok = text.load_tokenizer(folder)
  tower = clip_text.CLIPTextTransformer(
      clip_text.decode_variant("tiny", vocab_size=600), rngs=nnx.Rngs(0))
  embedder = text.LabelEmbedder(tower, tok)
  runs = []
  encode = embedder._encode  # pylint: disable=protected-access

  def counting_encode(state, tokens):
    runs.append(tokens.shape)
    return encode(state, tokens)

  embedder._encode = counting_encode  # pylint: disable=protected-access
  for _ in range(3):
    embedder(["cat", "dog"])
  assert runs == [(2, 77)] and embedder.num_computed == 1
  embedder(["tree", "dog"])
  embedder(["cat", "dog"])
  assert runs == [(2, 77), (2, 77)] and embedder.num_computed == 2


def test_label_embedder_template(tiny_vocab):
  folder, _ = tiny_vocab
  tok = text.load_tokenizer(folder)
  tower = clip_text.CLIPTextTransformer(
      clip_text.decode_variant("tiny", vocab_size=600), rngs=nnx.Rngs(0))
  embedder = text.LabelEmbedder(tower, tok, template="a photo of a {}.")
  assert embedder.prompts(["cat"]) == ["a photo of a cat."]
  tokens = text.tokenize(["a photo of a cat.", "a photo of a dog."], tok)
  want = nnx.jit(lambda m, t: m(t))(tower, jnp.asarray(tokens))
  np.testing.assert_allclose(embedder(["cat", "dog"]), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="exactly one"):
    text.LabelEmbedder(tower, tok, template="a photo")


def test_label_embedder_per_call_template_and_lru():
  tok = text.byte_level_tokenizer()
  tower = clip_text.CLIPTextTransformer(
      clip_text.decode_variant("tiny", vocab_size=text.BYTE_LEVEL_VOCAB_SIZE), rngs=nnx.Rngs(0))
  embedder = text.LabelEmbedder(tower, tok, template="a {}.", max_cached=2)
  bare = embedder(["cat", "dog"], "")
  np.testing.assert_array_equal(bare, text.LabelEmbedder(tower, tok)(["cat", "dog"]))
  assert embedder.prompts(["cat"], "") == ["cat"]
  assert embedder.prompts(["cat"], "the {}") == ["the cat"]
  assert embedder.prompts(["cat"]) == ["a cat."]
  templated = embedder(["cat", "dog"])
  assert not np.allclose(bare, templated)
  assert embedder.num_computed == 2 and len(embedder) == 2
  embedder(["cat", "dog"], "")  # hit: now the most recently used
  embedder(["cat", "dog"], "the {}")  # a third set evicts the least recently used ("a {}.")
  assert len(embedder) == 2 and embedder.num_computed == 3
  embedder(["cat", "dog"], "")
  assert embedder.num_computed == 3
  embedder(["cat", "dog"])
  assert embedder.num_computed == 4
  with pytest.raises(ValueError, match="exactly one"):
    embedder(["cat"], "no slot")
  assert text.token_counts(["cat", "a b"], tok) == [5, 4]  # start + one per byte + end
