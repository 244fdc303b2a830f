"""Evaluation loops: fixed label sets (pixAcc, mIoU) and zero-shot episodes (mIoU, FB-IoU).

Both consume eval batches of the data contract (`lseg_jax.data`): `image` [B, H, W, 3] normalised,
`label` [B, H, W] (-1 ignore) indexing the pipeline's `label_names`, `label_mask` [B, L], `valid`
[B], `image_size` [B, 2] and, for episodes, `class_index` [B]; and label embeddings [L, D] of
`label_names` (computed once, `lseg_jax.text.LabelEmbedder`).

The inference modes (window=None: single scale, the batch sharded over every host's
devices; a `SlidingWindow` or `ViewProtocol`: each valid example at its original
resolution, crops over this host's devices, confusions summed over hosts at the end) are
those of docs/evaluation.md, "Inference modes"; an episode is scored over its two labels
only, "other" and its class (`episode_rows`; docs/evaluation.md, "Metrics").

Scored names (`scored_class`): the model may score other texts than the label
table, e.g. synonyms or extra names: text_emb [T, D] then has one row per text
and scored_class [T] names the ground-truth class each text counts as; a pixel's
prediction is scored_class[argmax over the T texts] (`lseg_jax.openvocab`).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Iterable, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from lseg_jax import apply as apply_lib
from lseg_jax import inference
from lseg_jax import labels as labels_lib
from lseg_jax import metrics
from lseg_jax import sharding
from lseg_jax.labels import IGNORE_INDEX, OTHER_LABEL


def pad_batch(batch: dict[str, np.ndarray], multiple: int, pad_value: float = -1.0
              ) -> dict[str, np.ndarray]:
  """Pads image/label sides at the bottom/right up to multiples of `multiple`.

  image [B, H, W, 3] with `pad_value`, label [B, H, W] with ignore (-1).
  """
  h, w = batch["image"].shape[1:3]
  ph, pw = -h % multiple, -w % multiple
  if not ph and not pw:
    return batch
  out = dict(batch)
  out["image"] = np.pad(batch["image"], ((0, 0), (0, ph), (0, pw), (0, 0)),
                        constant_values=pad_value)
  out["label"] = np.pad(batch["label"], ((0, 0), (0, ph), (0, pw)), constant_values=IGNORE_INDEX)
  return out


def episode_rows(class_index: np.ndarray) -> np.ndarray:
  """int [B] episode classes -> int32 [B, 2]: the rows of ["other", *classes] an
  episode is scored over, "other" (0) then its class (1 + class_index)."""
  ci = np.asarray(class_index, np.int32).reshape(-1)
  return np.stack([np.zeros_like(ci), 1 + ci], axis=1)


def episode_label(label, class_index):
  """Union-table label -> binary label (1 = episode class, 0 = other, -1 kept).

  label: int [B, H, W] indexing ["other", *classes]; class_index [B].
  Works on numpy and jax arrays.
  """
  xp = jnp if isinstance(label, jax.Array) else np
  fg = (1 + class_index).reshape(-1, 1, 1)
  return xp.where(label < 0, IGNORE_INDEX, (label == fg).astype(xp.int32))


def _check_episode_masks(batch) -> None:
  """Every valid episode's label mask must keep exactly "other" and its class: those
  two are the labels the episode is scored over."""
  mask = np.asarray(batch["label_mask"], bool)
  expected = np.zeros_like(mask)
  rows = episode_rows(batch["class_index"])
  np.put_along_axis(expected, np.clip(rows, 0, mask.shape[1] - 1), True, axis=1)
  bad = np.flatnonzero(np.asarray(batch["valid"], bool) & np.any(mask != expected, axis=1))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"episode {i} of the batch has label_mask candidates "
                     f"{np.flatnonzero(mask[i]).tolist()}; expected exactly {rows[i].tolist()} "
                     f"(\"other\" and 1 + class_index {int(batch['class_index'][i])})")


def _check_table(label_names: Sequence[str], episodic: bool, text_emb, scored_class=None):
  rows = len(label_names) if scored_class is None else len(scored_class)
  if text_emb.ndim != 2 or text_emb.shape[0] != rows:
    raise ValueError(f"text_emb has shape {tuple(text_emb.shape)}; expected "
                     f"[{rows}, D] for the {rows} label names or scored texts")
  if scored_class is not None and (episodic or not len(scored_class) or np.min(
      scored_class) < 0 or np.max(scored_class) >= len(label_names)):
    raise ValueError(f"scored_class must map texts to classes in [0, {len(label_names)}) "
                     "of a fixed label set")
  if episodic and (len(label_names) < 2 or label_names[0] != OTHER_LABEL):
    raise ValueError(f"episode label table must be ['{OTHER_LABEL}', *classes]; got "
                     f"{list(label_names)[:5]}...")


class Evaluator:
  """Accumulates one dataset's metrics from eval batches of an LSeg `model` (eval mode).

  label_names: the pipeline's label table; text_emb [L, D] their embeddings, or [T, D] with
  scored_class int [T] the class each row counts as (module docstring); episodic: HSNet
  episodes or a fixed label set; window: None (single scale), a `SlidingWindow` or a
  `ViewProtocol`. The batch (single scale) or the crops (`crops_per_device` per device and
  call) are split over every device of `mesh`; default: every process's devices (single
  scale), this process's (windows).
  """

  def __init__(self, model, label_names: Sequence[str], text_emb, *, episodic: bool,
               window: inference.SlidingWindow | inference.ViewProtocol | None = None,
               mesh: jax.sharding.Mesh | None = None, crops_per_device: int = 2,
               scored_class: np.ndarray | None = None):
    _check_table(label_names, episodic, text_emb, scored_class)
    self._scored = None if scored_class is None else jnp.asarray(scored_class, jnp.int32)
    self.label_names = list(label_names)
    self.episodic = episodic
    self.window = window
    self.size_multiple = model.size_multiple
    self.num_examples = 0
    if episodic:
      self.meter = metrics.FewShotMeter(len(label_names) - 1)
    else:
      self.meter = metrics.SegmentationMeter(len(label_names))
    if window is None:
      self.mesh = sharding.make_mesh({"data": -1, "fsdp": 1}) if mesh is None else mesh
      self._data = sharding.batch_sharding(self.mesh)
      replicated = sharding.replicated(self.mesh)
      apply, state = apply_lib.model_apply(model)
      self._forward = apply_lib.forward(apply, self.mesh)
      # Arrays already on this mesh (a sharded train state) stay where they are.
      self._state = jax.tree.map(
          lambda x: x if _on_mesh(x, self.mesh) else jax.device_put(_host(x), replicated), state)
      if not episodic:
        self._text = jax.device_put(_host(jnp.asarray(text_emb, jnp.float32)), replicated)
      if scored_class is not None:
        self._scored = jax.device_put(np.asarray(scored_class, np.int32), replicated)
    else:
      self._infer = inference.SlidingWindowInference.for_model(
          model, window, mesh=mesh, crops_per_device=crops_per_device)
      self.mesh = self._infer.runner.mesh
      if not episodic:
        self._text = jnp.asarray(text_emb, jnp.float32)
    if episodic:
      # Host copy: each batch gathers its episodes' rows [B, 2, D] from it.
      self._table = np.asarray(metrics.to_host(text_emb), np.float32)

  def update(self, batch: dict[str, np.ndarray]) -> None:
    """Adds one per-host numpy eval batch (data contract)."""
    for key in ("image", "label", "label_mask", "valid"):
      if key not in batch:
        raise ValueError(f"eval batch lacks {key!r}; got keys {sorted(batch)}")
    if self.episodic:
      if "class_index" not in batch:
        raise ValueError("episode batches need 'class_index'; got keys " + str(sorted(batch)))
      _check_episode_masks(batch)
    if self.window is None:
      self._update_single(batch)
    else:
      self._update_multi(batch)

  def _update_single(self, batch):
    batch = pad_batch(batch, self.size_multiple)
    b = batch["image"].shape[0]
    local = len(self.mesh.local_devices)
    if b % local:
      raise ValueError(f"per-host eval batch size {b} is not a multiple of this host's "
                       f"{local} devices; choose a batch size divisible by {local}")
    def global_array(x):
      return jax.make_array_from_process_local_data(self._data, np.asarray(x))

    if self.episodic:
      text = global_array(self._table[self._rows(batch)])
      arrays = {k: global_array(batch[k]) for k in ("image", "label", "valid", "class_index")}
      logits = self._forward(self._state, arrays["image"], text, None)
      conf = _episode_batch_confusion(logits, arrays["label"], arrays["valid"],
                                      arrays["class_index"],
                                      num_classes=len(self.label_names) - 1)
      # Episode counts are per host; the confusion is already global.
      self.meter.add(conf, batch["class_index"], batch["valid"])
    else:
      arrays = {k: global_array(batch[k]) for k in ("image", "label", "label_mask", "valid")}
      mask = arrays["label_mask"] if self._scored is None else None
      logits = self._forward(self._state, arrays["image"], self._text, mask)
      conf = _batch_confusion(logits, arrays["label"], arrays["valid"], self._scored,
                              num_labels=len(self.label_names))
      self.meter.add(conf)
    self.num_examples += int(np.sum(batch["valid"]))

  def _rows(self, batch) -> np.ndarray:
    """[B, 2] table rows of the batch's episodes; padding examples take row 0 twice
    (whatever their class_index, they are not counted)."""
    return np.where(np.asarray(batch["valid"], bool)[:, None],
                    episode_rows(batch["class_index"]), 0)

  def _update_multi(self, batch):
    rows = self._rows(batch) if self.episodic else None
    items = []
    for i in np.flatnonzero(batch["valid"]):
      h, w = (batch["image_size"][i] if "image_size" in batch else batch["label"].shape[1:3])
      label = batch["label"][i, :h, :w]
      ci = int(batch["class_index"][i]) if self.episodic else None
      labels = rows[i] if self.episodic else (
          batch["label_mask"][i] if self._scored is None else None)
      items.append((batch["image"][i, :h, :w], labels, (label, ci)))
    table = self._table if self.episodic else self._text
    reduce = functools.partial(_scored_argmax, scored=self._scored)
    for pred, (label, ci) in self._infer.stream(items, table, reduce=reduce):
      if self.episodic:
        # Scores over ["other", class]: the argmax is the binary prediction.
        ci_arr = np.array([ci])
        bl = episode_label(label[None], ci_arr)
        # This host's counts; summed over hosts in result().
        self.meter.add(metrics.episode_confusion_np(pred[None], bl, ci_arr,
                                                    len(self.label_names) - 1), ci_arr)
      else:
        self.meter.add(metrics.confusion_matrix_np(pred[None], label[None], len(self.label_names)))
      self.num_examples += 1

  def running(self) -> dict[str, float]:
    """This host's running metrics (for progress bars)."""
    r = self.meter.result()
    return {k: r[k] for k in (("mIoU", "FB-IoU") if self.episodic else ("pixAcc", "mIoU"))}

  def result(self) -> dict[str, Any]:
    """The final report (all hosts): metrics, per-class IoU and counts."""
    conf, num_examples = self.meter.conf, self.num_examples
    episodes = self.meter.num_episodes if self.episodic else None
    if jax.process_count() > 1:
      # Single scale: the confusion is already the global sum; multi scale and
      # the example/episode counts are per host.
      if self.window is not None:
        conf = _sum_over_hosts(conf)
      num_examples = int(_sum_over_hosts(np.array([num_examples]))[0])
      if self.episodic:
        episodes = _sum_over_hosts(episodes)
    report = {
        "protocol": "episodes" if self.episodic else "fixed",
        "mode": ("single_scale" if self.window is None else "multi_scale"
                 if isinstance(self.window, inference.SlidingWindow) else "views"),
        "window": None if self.window is None else self.window.to_dict(),
        "num_examples": num_examples,
    }
    if self.episodic:
      r, classes = metrics.fewshot_iou(conf), self.label_names[1:]
      report["metrics"] = {"mIoU": r["mIoU"], "FB-IoU": r["FB-IoU"]}
      report["per_class_iou"] = dict(zip(classes, map(float, r["iou"])))
      report["per_class_episodes"] = dict(zip(classes, map(int, episodes)))
    else:
      r = metrics.miou_pixacc(conf)
      report["metrics"] = {"pixAcc": r["pixAcc"], "mIoU": r["mIoU"],
                           "mIoU_present": r["mIoU_present"]}
      report["per_class_iou"] = dict(zip(self.label_names, map(float, r["iou"])))
      report["pixels"] = {"labeled": r["labeled"], "correct": r["correct"]}
    return report


def _host(x):
  """A process-local array as host data when the mesh spans processes: every process
  holds the same copy, and a device array cannot move to another host's devices."""
  if jax.process_count() > 1 and isinstance(x, jax.Array) and x.is_fully_addressable:
    return np.asarray(x)
  return x


def _on_mesh(x, mesh) -> bool:
  return (isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding)
          and x.sharding.mesh == mesh)


def _sum_over_hosts(x: np.ndarray) -> np.ndarray:
  """Sum of an int64 array over processes, exact (JAX without x64 moves int32:
  the value travels as two 31-bit halves)."""
  x = np.asarray(x, np.int64)
  if np.any(x < 0):
    raise ValueError("expected non-negative counts")
  parts = np.stack([x >> 31, x & (2 ** 31 - 1)]).astype(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(parts), np.int64).sum(0)
  return (gathered[0] << 31) + gathered[1]


@jax.jit
def _scored_argmax(scores, scored=None):
  """Predictions of scores [..., T]: the argmax, mapped through scored_class [T] if given."""
  pred = jnp.argmax(scores, axis=-1).astype(jnp.int32)
  return pred if scored is None else scored[pred]


@functools.partial(jax.jit, static_argnames=("num_labels",))
def _batch_confusion(logits, label, valid, scored=None, *, num_labels):
  """The global confusion of a batch's predictions (the argmax of the forward's logits,
  mapped through `scored` [T] if given)."""
  return metrics.confusion_matrix(_scored_argmax(logits, scored), label, num_labels, valid=valid)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _episode_batch_confusion(logits, label, valid, class_index, *, num_classes):
  """The global episode confusion of a batch: logits [B, H, W, 2] over ["other", class];
  their argmax is the binary prediction (a tie goes to "other", as the argmax over the
  masked table gave it: "other" is its first row)."""
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return metrics.episode_confusion(pred, episode_label(label, class_index), class_index,
                                   num_classes, valid=valid)


def evaluate(evaluator: Evaluator, batches: Iterable[dict[str, np.ndarray]], *,
             num_batches: int | None = None, progress: bool = True) -> dict[str, Any]:
  """Runs `evaluator` over `batches`, with a tqdm bar (process 0) showing running metrics."""
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=num_batches, unit="batch", dynamic_ncols=True)
  for batch in batches:
    evaluator.update(batch)
    if bar is not None:
      bar.update(1)
      bar.set_postfix({k: f"{100 * v:.2f}" for k, v in evaluator.running().items()})
  if bar is not None:
    bar.close()
  return evaluator.result()


# --- One evaluation of a config: used by periodic evaluation and by tools/eval.py ---
@dataclasses.dataclass
class Evaluation:
  """One entry of `config.evals` (see `lseg_jax.config.evals`): a data split scored
  with the protocol its source implies (fixed labels or episodes)."""
  name: str  # metrics are logged as "eval/..." for "val", else "eval_<name>/..."
  data: Any  # the data config of this evaluation (eval_split, eval_resize, ...)
  batch_size: int  # global (split over processes)
  num_batches: int | None = None  # None: the whole split
  every_steps: int | None = None  # every_steps, at_end: when training runs it
  at_end: bool = True
  window: inference.SlidingWindow | None = None  # None: single scale
  background_text: str | None = None  # the text embedded for an episode table's "other"
  crops_per_device: int = 2

  @classmethod
  def from_config(cls, config) -> list["Evaluation"]:
    """The evaluations a completed config declares (`lseg_jax.config.evals`)."""
    from lseg_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    return [cls(name, ev.data, int(ev.batch_size), ev.num_batches, ev.every_steps,
                bool(ev.at_end)) for name, ev in config_lib.evals(config).items()]

  def iterator(self):
    from lseg_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    per_host = self.batch_size // jax.process_count()
    if per_host < 1 or self.batch_size % jax.process_count():
      raise ValueError(f"eval batch size {self.batch_size} does not split evenly over "
                       f"{jax.process_count()} processes")
    return input_pipeline.make_eval_iterator(self.data, batch_size=per_host)

  def run(self, model, embed: Callable[[list[str]], Any], *,
          mesh: jax.sharding.Mesh | None = None, progress: bool = False) -> dict[str, Any]:
    """Scores `model` (eval mode; its arrays may be a sharded train state) on the split.

    embed: label texts -> [L, D] label embeddings.
    Returns the `Evaluator.result()` report plus dataset, split, fold, eval_resize,
    background_text, num_labels, skipped_examples.
    """
    it = self.iterator()
    episodic = it.episodic
    names = labels_lib.text_names(it.label_names, episodic, self.background_text)
    scored = None if episodic else _scored_names(self.data)
    if scored is not None:  # a source that scores other names (PAS-20b), as they are
      names, scored = scored
    evaluator = Evaluator(model, it.label_names, embed(names), episodic=episodic,
                          window=self.window, mesh=mesh if self.window is None else None,
                          crops_per_device=self.crops_per_device, scored_class=scored)
    batches, num_batches = it, it.num_batches
    if self.num_batches is not None:
      batches = itertools.islice(it, self.num_batches)
      num_batches = min(num_batches or self.num_batches, self.num_batches)
    report = evaluate(evaluator, batches, num_batches=num_batches, progress=progress)
    report.update({
        "eval": self.name, "dataset": self.data.name, "split": self.data.eval_split,
        "fold": self.data.fold, "eval_resize": self.data.eval_resize,
        "background_text": names[0] if episodic else None,
        "num_labels": len(it.label_names), "skipped_examples": it.num_skipped,
    })
    if self.num_batches is not None:
      report["max_batches"] = self.num_batches
    return report

  def scalars(self, report: dict[str, Any]) -> dict[str, float]:
    """The report's summary metrics as logged scalars ("eval/miou", ...)."""
    keys = {"mIoU": "miou", "pixAcc": "pixacc", "FB-IoU": "fbiou"}
    prefix = "eval" if self.name == "val" else f"eval_{self.name}"
    return {f"{prefix}/{keys[k]}": float(v) for k, v in report["metrics"].items() if k in keys}


def _scored_names(data) -> tuple[list[str], np.ndarray] | None:
  """(scored_names, scored_class) of a single-source data config whose source scores
  other texts than its label names (`registry.Source`); None otherwise."""
  from lseg_jax.data import source_specs  # pylint: disable=g-import-not-at-top
  components, _ = source_specs.build_components(data, eval_split=True)
  source = components[0].source
  names, classes = list(source.scored_names), np.asarray(source.scored_class)
  if len(components) > 1 or (names == list(source.label_names)
                             and np.array_equal(classes, np.arange(len(names)))):
    return None
  return names, classes


def format_table(report: dict[str, Any], max_rows: int | None = None) -> str:
  """The report as a text table: per-class IoU (%) then the summary metrics."""
  per_class = report["per_class_iou"]
  width = max([len(n) for n in per_class] + [12])
  lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
  items = list(per_class.items())
  for name, iou in items[:max_rows] if max_rows else items:
    lines.append(f"{name:<{width}}  {100 * iou:7.2f}")
  if max_rows and len(items) > max_rows:
    lines.append(f"... ({len(items) - max_rows} more in the JSON report)")
  lines.append("-" * (width + 9))
  for key, value in report["metrics"].items():
    lines.append(f"{key:<{width}}  {100 * value:7.2f}")
  lines.append(f"{'examples':<{width}}  {report['num_examples']:7d}")
  return "\n".join(lines)
