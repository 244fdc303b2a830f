"""Which evaluations a run of `tools/eval.py` performs: a config's evaluations
(`evaluate.Evaluation.from_config`) with a command line's data and protocol choices laid
over them, and the config of a bare dataset name (`--data NAME`)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax

from lseg_jax import evaluate
from lseg_jax import inference
from lseg_jax.data import input_pipeline
from lseg_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Choices:
  """What the command line sets; None (False) keeps the config's value.

  Attributes:
    name: run only the evaluation of this name.
    single_report: the results go to one report, so one evaluation is expected.
    eval_resize, split, fold, shot, data_dir: laid over each evaluation's data config.
    multiscale, flip, scales, base_size, crop_size: the sliding window (any of the
      first three selects it; sizes default to the data's).
    keep_eval_resize: keep the data's eval_resize under the sliding window (else
      whole images: "none").
    batch_size: per process; None: the evaluation's, or 2 per local device for a
      bare dataset (`from_data_name`).
    num_batches, background_text, crops_per_device: as `evaluate.Evaluation`'s.
  """
  name: str | None = None
  single_report: bool = False
  eval_resize: str | None = None
  split: str | None = None
  fold: int | None = None
  shot: int | None = None
  data_dir: str | None = None
  multiscale: bool = False
  flip: bool = False
  scales: Sequence[float] | None = None
  base_size: int | None = None
  crop_size: int | None = None
  keep_eval_resize: bool = False
  batch_size: int | None = None
  from_data_name: bool = False
  num_batches: int | None = None
  background_text: str | None = None
  crops_per_device: int = 2


def data_only_config(name: str) -> dict:
  """The config of a bare dataset name: the source's default evaluation."""
  # Episodes: HSNet's protocol, query and mask resized to 480 x 480 and scored there.
  # Fixed labels: 480 center crops, PyTorch-Encoding's "val" mode that the official
  # training loop validates with (the sliding window switches to whole images).
  resize = "square" if input_pipeline.is_episodic({"name": name}) else "center_crop"
  return {"data": {"name": name, "eval_resize": resize}}


def sliding_window(choices: Choices, data_cfg) -> inference.SlidingWindow | None:
  """The multi-scale protocol the choices ask for; None for single scale."""
  if not (choices.multiscale or choices.flip or choices.scales):
    return None
  scales = choices.scales or (inference.OFFICIAL_SCALES if choices.multiscale else (1.0,))
  return inference.SlidingWindow(
      scales=tuple(scales), flip=choices.flip,
      base_size=choices.base_size or data_cfg.base_size,
      crop_size=choices.crop_size or data_cfg.crop_size)


def _named(evals, choices: Choices, config):
  if choices.name is not None:
    evals = [ev for ev in evals if ev.name == choices.name]
    if not evals:
      names = [ev.name for ev in evaluate.Evaluation.from_config(config)]
      raise UserError(f"--eval {choices.name!r} is not among the config's "
                      f"evaluations {names}")
  if choices.single_report and len(evals) > 1:
    raise UserError(f"--out names one report but the config has {len(evals)} "
                    f"evaluations {[ev.name for ev in evals]}; add --eval NAME")
  return evals


def select_evaluations(config, choices: Choices) -> list[evaluate.Evaluation]:
  """The config's evaluations with `choices` laid over them.

  Raises:
    UserError: no evaluation has the chosen name, or one report is asked of several.
  """
  evals = _named(evaluate.Evaluation.from_config(config), choices, config)
  for ev in evals:
    data = ev.data
    with data.unlocked():
      for field, value in (("eval_resize", choices.eval_resize),
                           ("eval_split", choices.split), ("data_dir", choices.data_dir)):
        if value:
          data[field] = value
      if choices.fold is not None:
        data.fold = choices.fold
      if choices.shot is not None:
        data.shot = choices.shot
      ev.window = sliding_window(choices, data)
      if ev.window is not None and not (choices.keep_eval_resize or choices.eval_resize):
        data.eval_resize = "none"
        data.eval_pad_to = None
    if choices.batch_size:
      ev.batch_size = choices.batch_size * jax.process_count()
    elif choices.from_data_name:
      ev.batch_size = 2 * jax.local_device_count() * jax.process_count()
    ev.num_batches = choices.num_batches
    ev.background_text = choices.background_text
    ev.crops_per_device = choices.crops_per_device
  return evals


__all__ = ["Choices", "data_only_config", "select_evaluations", "sliding_window"]
