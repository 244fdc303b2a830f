"""The open-vocabulary benchmark suite (A-847 ... PAS-21) under one named protocol.

A protocol is plain data (configs/openvocab.py): a `ViewProtocol` or `SlidingWindow`, prompt
templates and a synonym rule. A benchmark is a fixed-label source; its `scored_names` are the texts
the model scores, `scored_class` the ground-truth class each counts as (PAS-20b: 39 extra names
scored as background). Scoring is the one evaluator's (`evaluate.Evaluator(scored_class=...)`) at
the ground truth's resolution. Every process runs every benchmark on its own images; process 0
writes each report as soon as it is done (atomically), then the suite's JSON and Markdown. A rerun
reuses the finished reports (process 0 decides, every process follows).
"""
from __future__ import annotations

import json
import posixpath
from typing import Any, Callable, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from lseg_jax import evaluate
from lseg_jax import inference
from lseg_jax import text as text_lib
from lseg_jax import train_utils
from lseg_jax.data import input_pipeline
from lseg_jax.data import registry
from lseg_jax.errors import UserError

SYNONYMS = ("join", "max", "mean")
VIEW_FIELDS = ("resize", "size", "max_size", "crop_size", "overlap", "global_view",
               "activation", "pad_value")
SLIDING_FIELDS = ("scales", "base_size", "crop_size", "stride_rate", "flip")


def synonyms_of(name: str) -> list[str]:
  """"person, people" -> ["person", "people"]."""
  return [s.strip() for s in name.split(",") if s.strip()] or [name]


def scored_table(source) -> tuple[list[str], np.ndarray]:
  """(scored names, int32 class of each) of a source (`registry.Source`)."""
  return list(source.scored_names), np.asarray(source.scored_class, np.int32)


def scored_texts(names: Sequence[str], classes: np.ndarray, synonyms: str
                 ) -> tuple[list[list[str]], np.ndarray]:
  """Rows of texts the model scores and the class of each row.

  Each row is embedded as one vector (the ensemble of its texts): "join" keeps each
  name whole, "max" makes each synonym a row of its own (the argmax over rows, mapped
  to classes, is the argmax over classes of their synonyms' maximum), "mean" makes each
  name a row ensembled over its synonyms.
  """
  if synonyms not in SYNONYMS:
    raise UserError(f"synonyms={synonyms!r}; expected one of {SYNONYMS}")
  if synonyms == "join":
    return [[n] for n in names], np.asarray(classes, np.int32)
  if synonyms == "mean":
    return [synonyms_of(n) for n in names], np.asarray(classes, np.int32)
  rows = [(s, c) for n, c in zip(names, classes) for s in synonyms_of(n)]
  return [[s] for s, _ in rows], np.array([c for _, c in rows], np.int32)


def embed_rows(embed: Callable, rows: Sequence[Sequence[str]],
               templates: Sequence[str] | None) -> jax.Array:
  """float32 [len(rows), D]: each row's texts under every template, ensembled.

  embed(texts, template) -> [N, D] (`text.LabelEmbedder`). With one text per row and
  templates None (the embedder's own prompt) the rows are embedded as they are, as the
  other evaluations do; else each row is the normalised mean of the normalised
  embeddings of its texts under each template (CLIP's prompt ensembling).
  """
  unique, index = [], {}
  for r in rows:
    for t in r:
      if text_lib.clean_text(t) not in index:
        index[text_lib.clean_text(t)] = len(unique)
        unique.append(t)
  if templates is None and all(len(r) == 1 for r in rows):
    return embed(unique, None)[np.array([index[text_lib.clean_text(r[0])] for r in rows])]
  total = 0
  for template in (templates or [None]):
    e = jnp.asarray(embed(unique, template), jnp.float32)
    total = total + e / jnp.linalg.norm(e, axis=-1, keepdims=True)
  out = jnp.stack([jnp.mean(total[np.array([index[text_lib.clean_text(t)] for t in r])], 0)
                   for r in rows])
  return out / jnp.linalg.norm(out, axis=-1, keepdims=True)


def protocol_window(protocol) -> inference.ViewProtocol | inference.SlidingWindow:
  """The inference protocol of a suite protocol config (configs/openvocab.py)."""
  if protocol["kind"] == "views":
    return inference.ViewProtocol(**{k: protocol[k] for k in VIEW_FIELDS})
  if protocol["kind"] == "sliding":
    return inference.SlidingWindow(**{k: (tuple(protocol[k]) if k == "scales" else protocol[k])
                                      for k in SLIDING_FIELDS})
  raise UserError(f"protocol kind {protocol['kind']!r}; expected 'views' or 'sliding'")


def check_benchmarks(names: Sequence[str], suite: dict[str, str]) -> list[str]:
  """The benchmark names, each a suite member or a registered fixed-label source."""
  known = set(registry.available_sources())
  for name in names:
    if name not in suite and (name not in known or registry.is_episodic(name)):
      raise UserError(f"benchmark {name!r} is not in the suite {list(suite)} nor a "
                      "registered fixed-label source")
  return list(names)


write_json = train_utils.write_json  # the one whole-file writer, also of the metric file


def _finished(path: str, protocol: dict[str, Any]) -> dict | None:
  """The saved report of a benchmark finished under this protocol, synonyms included
  (process 0 reads; every process learns whether there is one)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  report = None
  if jax.process_index() == 0 and tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      report = json.load(f)
    if report.get("protocol_config") != json.loads(json.dumps(protocol)):
      report = None
  done = np.int32(report is not None)
  if jax.process_count() > 1:
    done = multihost_utils.broadcast_one_to_all(done)
  return (report or {}) if int(done) else None


def evaluate_benchmark(model, embed: Callable, name: str, protocol, *, data_dir: str,
                       synonyms: str, batch_size: int, crops_per_device: int = 2,
                       progress: bool = False) -> dict[str, Any]:
  """One benchmark's report (`Evaluator.result()` + the texts it scored)."""
  try:
    source = registry.get_source(name, "validation", data_dir=data_dir)
  except (FileNotFoundError, ValueError) as e:  # missing data: the source says what is where
    raise UserError(f"benchmark {name!r}: {e}") from e
  names, classes = scored_table(source)
  rows, row_class = scored_texts(names, classes, synonyms)
  templates = None if protocol["templates"] is None else list(protocol["templates"])
  data = input_pipeline.default_data_config()
  data.update(name=name, data_dir=data_dir, eval_resize="none")
  ev = evaluate.Evaluation(name, data, batch_size * jax.process_count())
  it = ev.iterator()
  evaluator = evaluate.Evaluator(model, it.label_names, embed_rows(embed, rows, templates),
                                 episodic=False, window=protocol_window(protocol),
                                 crops_per_device=crops_per_device, scored_class=row_class)
  report = evaluate.evaluate(evaluator, it, num_batches=it.num_batches, progress=progress)
  report.update({"benchmark": name, "protocol_name": protocol["name"],
                 "protocol_config": {**protocol.to_dict(), "synonyms": synonyms},
                 "templates": templates, "synonyms": synonyms, "num_labels": len(names),
                 "num_classes": len(it.label_names), "num_texts": len(rows),
                 "skipped_examples": it.num_skipped})
  return report


def run_suite(model, embed: Callable, protocol, *, data_dir: str, out_dir: str,
              benchmarks: Sequence[str] | None = None, synonyms: str | None = None,
              batch_size: int | None = None, crops_per_device: int = 2,
              progress: bool = False, info: dict[str, Any] | None = None) -> dict[str, Any]:
  """Evaluates every benchmark under `protocol`; writes (process 0) out_dir/NAME.json per
  benchmark, out_dir/suite.json and out_dir/suite.md. Returns the suite report.

  protocol: a config of configs/openvocab.py (its `name`, `benchmarks` display names,
    the protocol's fields). synonyms: overrides the protocol's rule. info: fields added
    to every report (checkpoint, tokenizer, ...).
  """
  suite = dict(protocol["benchmarks"])
  names = check_benchmarks(benchmarks or list(suite), suite)
  synonyms = synonyms or protocol["synonyms"]
  batch_size = batch_size or jax.local_device_count()
  rows = {}
  for name in names:
    path = posixpath.join(str(out_dir), f"{name}.json")
    report = _finished(path, {**protocol.to_dict(), "synonyms": synonyms})
    if report is None:
      report = evaluate_benchmark(model, embed, name, protocol, data_dir=data_dir,
                                  synonyms=synonyms, batch_size=batch_size,
                                  crops_per_device=crops_per_device, progress=progress)
      report.update(info or {})
      if jax.process_index() == 0:
        write_json(path, report)
    rows[name] = {"benchmark": suite.get(name, name), "classes": report.get("num_classes"),
                  "images": report.get("num_examples"),
                  "mIoU": report.get("metrics", {}).get("mIoU")}
  summary = {"suite": "openvocab", "protocol": protocol["name"],
             "protocol_config": protocol.to_dict(), "synonyms": synonyms, "benchmarks": rows,
             **(info or {})}
  if jax.process_index() == 0:
    write_json(posixpath.join(str(out_dir), "suite.json"), summary)
    write_json(posixpath.join(str(out_dir), "suite.md"), None, markdown(summary))
  return summary


def markdown(summary: dict[str, Any]) -> str:
  """The suite report as a Markdown table (mIoU in %)."""
  lines = ["| benchmark | classes | images | mIoU | protocol |", "|---|---|---|---|---|"]
  for row in summary["benchmarks"].values():
    lines.append(f"| {row['benchmark']} | {row['classes']} | {row['images']} | "
                 f"{100 * row['mIoU']:.2f} | {summary['protocol']} |")
  return "\n".join(lines) + "\n"
