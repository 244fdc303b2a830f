r"""Interactive segmentation in the browser: upload an image, type labels, see the result.

  pip install -e ".[demo]"
  python tools/demo.py [--checkpoint DIR] [--host 127.0.0.1] [--port 7860]

then open http://127.0.0.1:7860. A Gradio page over `lseg_jax.predict` (the code
tools/predict.py runs) for any checkpoint tools/predict.py reads; without --checkpoint the
built-in default's run, runs/synthetic_tiny (`python tools/run_default.py`; the page picks
it up as soon as it exists). The model loads once; requests wait in a queue (--queue-size)
and run one at a time; nothing is fetched from the network. What the page takes and
shows: README, "Demo".
"""
from __future__ import annotations

import argparse
import atexit
import base64
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
from PIL import Image

from lseg_jax import predict
from lseg_jax.cli import common
from lseg_jax.data import synthetic

DEFAULT_CHECKPOINT = os.path.join("runs", "synthetic_tiny")
MAKE_DEFAULT_COMMAND = "python tools/run_default.py --workdir runs/synthetic_tiny"
# Request output folders are removed after this long (Gradio has copied the files
# into its own cache by the time a request returns).
KEEP_OUTPUTS_S = 600
# Gradio deletes its cached uploads and outputs older than this, this often (s).
GRADIO_CACHE_TTL_S = 3600
# Label sets whose embeddings stay cached (least recently used dropped first).
MAX_CACHED_LABEL_SETS = 256
# Default labels: the checkpoint's training labels, when there are at most this many.
MAX_DEFAULT_LABELS = 30

# (seed, height, width, labels) of the generated example scenes
# (`lseg_jax.data.synthetic`, the built-in default's classes).
EXAMPLE_SCENES = (
    (29, 240, 320, "background, red disc, green square, blue triangle, yellow stripes, "
                   "purple checker"),
    (20, 240, 320, "background, red disc, green square, blue triangle"),
    (26, 256, 256, "background, red disc, green square, blue triangle, yellow stripes, "
                   "purple checker"),
)

log = logging.getLogger("lseg_jax.demo")


def build_parser() -> argparse.ArgumentParser:
  p = common.new_parser(__doc__)
  common.add_checkpoint_args(p, required=False, default=None)
  p.add_argument("--host", default="127.0.0.1",
                 help="address to serve on (0.0.0.0: every interface of this machine)")
  p.add_argument("--port", type=int, default=7860, help="port to serve on")
  p.add_argument("--max-side", type=int, default=1024,
                 help="shrink images whose long side is longer to this many pixels")
  p.add_argument("--max-file-size", default="100mb",
                 help='largest upload, e.g. "100mb" (Gradio size syntax)')
  p.add_argument("--queue-size", type=int, default=32,
                 help="requests that may wait; more are turned away with a message")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  p = build_parser()
  args = common.parse(p, argv)
  if not 0 <= args.port <= 65535:
    p.error(f"--port {args.port} must be in [0, 65535]")
  if args.max_side < 32:
    p.error(f"--max-side {args.max_side} must be at least 32")
  if args.queue_size < 1:
    p.error(f"--queue-size {args.queue_size} must be at least 1")
  return args


@dataclasses.dataclass
class Result:
  """One request's outputs (file paths are in the request's own folder)."""
  overlay: str        # PNG: the image with colours and the legend (tools/predict.py's)
  colour_map: str     # PNG: the label map in the legend's colours
  label_map: str      # PNG: label indices
  report: str         # JSON
  rows: list[list[Any]]
  status: str
  warnings: list[str]


class DemoBackend:
  """The demo without its web page (`parse_args`' arguments): loads the model once,
  segments requests."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    self.segmenter = None
    self.meta: dict[str, Any] = {}
    self.tokenizer_spec = None
    self._load_lock = threading.Lock()
    self.out_root = tempfile.mkdtemp(prefix="lseg-demo-")
    self.examples_dir = os.path.join(self.out_root, "examples")

  # --- The model, loaded once.
  def missing(self) -> str | None:
    """The message for a missing default checkpoint; None once a model is loaded
    or loadable."""
    if (self.segmenter is not None or self.args.checkpoint is not None
        or os.path.isdir(self.checkpoint)):
      return None
    return (f"No checkpoint to run: the built-in default's run {self.checkpoint!r} does not "
            f"exist yet. Make it with `{MAKE_DEFAULT_COMMAND}` (about 2 minutes on a CPU; the "
            "page picks it up without a restart), or start the demo with `--checkpoint DIR` "
            "(a run of tools/train.py or a checkpoint from tools/convert.py import).")

  def load(self) -> bool:
    """Loads the model unless loaded; False while the default checkpoint is missing,
    ValueError saying why it cannot be loaded."""
    with self._load_lock:
      if self.segmenter is not None:
        return True
      if self.missing():
        return False
      args = argparse.Namespace(**{**vars(self.args), "checkpoint": self.checkpoint})
      start = time.perf_counter()
      try:
        model, meta, embedder, tokenizer_spec, _ = common.load_checkpoint(args)
      except (FileNotFoundError, ValueError) as e:
        message = f"cannot load checkpoint {self.checkpoint!r}: {e}"
        if self.args.checkpoint is None:
          message += f" (if `{MAKE_DEFAULT_COMMAND}` is still running, wait for it to finish)"
        raise ValueError(message) from None
      embedder.max_cached = MAX_CACHED_LABEL_SETS
      self.meta, self.tokenizer_spec = meta, tokenizer_spec
      self.segmenter = predict.Segmenter(model, embedder, window=predict.default_window(meta))
      log.info("loaded %s (%s, text width %d) in %.1f s", self.checkpoint, model.cfg.backbone,
               model.text_dim, time.perf_counter() - start)
      return True

  def default_labels(self) -> str:
    names = self.meta.get("label_names") or []
    return ", ".join(names) if 0 < len(names) <= MAX_DEFAULT_LABELS else ""

  def default_template(self) -> str | None:
    return None if self.segmenter is None else self.segmenter.embedder.template

  def describe(self) -> str:
    """One line about the loaded checkpoint, for the page."""
    if self.segmenter is None:
      return self.missing() or f"Checkpoint `{self.checkpoint}` loads on the first request."
    cfg = self.segmenter.model.cfg
    template = self.default_template()
    return (f"Checkpoint `{self.checkpoint}`: backbone `{cfg.backbone}`, "
            f"label embeddings of width {self.segmenter.model.text_dim}, default prompt "
            + (f"`{template}`" if template else "none (bare label names)") + ".")

  def write_examples(self) -> list[list[Any]]:
    """[[image path, labels], ...]: generated scenes of the built-in default's classes."""
    os.makedirs(self.examples_dir, exist_ok=True)
    out = []
    for seed, h, w, labels in EXAMPLE_SCENES:
      path = os.path.join(self.examples_dir, f"scene_{seed}.png")
      image, _ = synthetic.generate_scene(np.random.default_rng(seed), h, w)
      Image.fromarray(image).save(path)
      out.append([path, labels])
    return out

  # --- One request.
  def segment(self, image_source, image_name: str, labels_text: str, template: str | None,
              protocol: str, alpha: float) -> Result:
    """Segments one uploaded image (a path, bytes or binary file; `image_name` as the user
    knows it) into `predict.parse_labels(labels_text)`; template None or blank: the
    checkpoint's. Every user error is a ValueError with the message."""
    start = time.perf_counter()
    if not self.load():
      raise ValueError(self.missing())
    if alpha is None or not 0 <= float(alpha) <= 1:
      raise ValueError(f"opacity {alpha!r} must be in [0, 1]")
    labels = predict.parse_labels(labels_text or "")
    template = (template or "").strip() or None
    if template is not None and template.count("{}") != 1:
      raise ValueError(f"prompt template {template!r} must contain exactly one {{}}, where "
                       'each label goes, e.g. "a photo of a {}."')
    if image_source is None:
      raise ValueError("no image: upload one, paste one, take one with the webcam or pick "
                       "an example")
    source = predict.load_image(image_source, name=repr(image_name), max_side=self.args.max_side)
    image = source.image
    warnings = list(source.warnings)

    result = self.segmenter(image, labels, template=template, protocol=protocol)
    warnings += result.warnings

    base = os.path.join(self._request_folder(), f"{_safe_stem(image_name)}_lseg")
    paths = result.save(base, alpha=float(alpha), image=image_name,
                        checkpoint=os.path.abspath(self.checkpoint),
                        tokenizer=self.tokenizer_spec, **source.report_fields(),
                        warnings=warnings)
    Image.fromarray(result.colour_map()).save(base + "_colours.png")

    seconds = time.perf_counter() - start
    h, w = image.shape[:2]
    status = [f"Segmented a {w}x{h} image into {len(labels)} labels ({protocol}, prompt "
              + (f"`{result.template}`" if result.template else "none")
              + f") in {seconds:.2f} s."]
    if source.conversion:
      status.append(f"Note: {source.conversion}.")
    status += [f"**Warning:** {m}." for m in warnings]
    log.info("segmented %r (%dx%d, %d labels, %s) in %.2f s", image_name, w, h, len(labels),
             protocol, seconds)
    return Result(overlay=paths["overlay"], colour_map=base + "_colours.png",
                  label_map=paths["labels"], report=paths["json"], rows=result.area_rows(),
                  status="\n\n".join(status), warnings=warnings)

  def _request_folder(self) -> str:
    now = time.time()
    for name in os.listdir(self.out_root):
      path = os.path.join(self.out_root, name)
      if name.startswith("req-") and now - os.path.getmtime(path) > KEEP_OUTPUTS_S:
        shutil.rmtree(path, ignore_errors=True)
    return tempfile.mkdtemp(prefix="req-", dir=self.out_root)

  def close(self) -> None:
    shutil.rmtree(self.out_root, ignore_errors=True)


def _safe_stem(name: str) -> str:
  stem = os.path.splitext(os.path.basename(name or "image"))[0]
  stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._")
  return stem[:64] or "image"


# --- The web page ---
@dataclasses.dataclass
class _Upload:
  source: Any  # path or bytes
  name: str


def _image_file_component(gr):
  """The Gradio image input (a `gr.Image` subclass) that yields `_Upload`s."""

  class ImageFile(gr.Image):
    """gr.Image that hands over the uploaded file untouched: `lseg_jax.predict`
    reads it (Gradio's own conversion would clip 16-bit images and fail on
    files that are not images before a message can be shown)."""
    is_template = True  # Drawn by the frontend's Image component.

    def preprocess(self, payload):
      if payload is None:
        return None
      name = payload.orig_name or os.path.basename(payload.path or "") or "image"
      if payload.path is None and payload.url and payload.url.startswith("data:"):
        return _Upload(base64.b64decode(payload.url.split(",", 1)[1]), name)
      return _Upload(payload.path, name)

  return ImageFile


def _segment_handler(backend: DemoBackend, gr, pd):
  """The page's Segment callback: `backend.segment`, its refusals as `gr.Error`s."""

  def run(upload, labels_text, template, protocol, alpha):
    try:
      out = backend.segment(None if upload is None else upload.source,
                            None if upload is None else upload.name,
                            labels_text, template, protocol, alpha)
    except ValueError as e:
      log.info("request refused: %s", e)
      raise gr.Error(str(e), duration=None, print_exception=False) from None
    for message in out.warnings:
      gr.Warning(message)
    table = pd.DataFrame(out.rows, columns=["#", "label", "colour", "area %", "pixels"])
    styled = table.style.apply(
        lambda col: [f"background-color: {c}; color: {_text_colour(c)}" for c in col],
        subset=["colour"]).format({"area %": "{:.2f}"})
    return (out.overlay, out.colour_map, styled, [out.overlay, out.label_map, out.report],
            out.status)

  return run


def build_app(backend: DemoBackend):
  """The Gradio Blocks page of `backend`."""
  # Before Gradio is imported: no analytics or version checks (no network).
  os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
  os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
  # Gradio (and its pandas) is an optional dependency: imported here only.
  # pylint: disable=g-import-not-at-top
  import gradio as gr
  import pandas as pd
  # pylint: enable=g-import-not-at-top

  ImageFile = _image_file_component(gr)  # pylint: disable=invalid-name
  run = _segment_handler(backend, gr, pd)

  template = backend.default_template()
  with gr.Blocks(title="LSeg: language-driven segmentation", analytics_enabled=False,
                 delete_cache=(GRADIO_CACHE_TTL_S, GRADIO_CACHE_TTL_S)) as app:
    gr.Markdown("# LSeg: language-driven semantic segmentation\n"
                "Upload an image, name the things to find, and every pixel gets the "
                "label whose text it matches best.")
    banner = gr.Markdown(backend.describe(), elem_id="checkpoint")
    with gr.Row():
      with gr.Column(scale=1):
        image = ImageFile(label="Image", sources=["upload", "clipboard", "webcam"],
                          type="filepath", image_mode=None, elem_id="image")
        labels = gr.Textbox(label="Labels, separated by commas (\\, for a comma inside a label)",
                            value=backend.default_labels(),
                            placeholder="dog, grass, other", elem_id="labels", max_lines=3)
        prompt = gr.Textbox(
            value="", label="Prompt template (optional)", elem_id="prompt", max_lines=1,
            placeholder=(f"blank: {template}" if template else
                         'blank: bare labels; e.g. "a photo of a {}."'),
            info='One {} where each label goes; "{}" alone forces bare labels.')
        protocol = gr.Radio(list(predict.PROTOCOLS), value=predict.SINGLE_SCALE,
                            label="Protocol", elem_id="protocol",
                            info="multi-scale + flip: the paper's test protocol, "
                                 "many times slower")
        alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity", elem_id="alpha")
        button = gr.Button("Segment", variant="primary", elem_id="segment")
        gr.Examples(backend.write_examples(), inputs=[image, labels], label="Examples")
      with gr.Column(scale=1):
        status = gr.Markdown(elem_id="status")
        overlay = gr.Image(label="Overlay and legend (label, area %)", type="filepath",
                           format="png", interactive=False, elem_id="overlay")
        colour_map = gr.Image(label="Label map", type="filepath", format="png",
                              interactive=False, elem_id="label_map")
        table = gr.Dataframe(label="Area per label", interactive=False, elem_id="areas")
        files = gr.File(label="Downloads: overlay PNG, label-index PNG, JSON",
                        file_count="multiple", interactive=False, elem_id="downloads")
    outputs = [overlay, colour_map, table, files, status]
    inputs = [image, labels, prompt, protocol, alpha]
    # One event for the button and Enter in the labels box: one queue, one at a time.
    gr.on([button.click, labels.submit], run, inputs, outputs, api_name="segment",
          concurrency_limit=1)
    # The banner follows the checkpoint (e.g. once run_default.py has made it).
    app.load(backend.describe, None, banner, api_visibility="private", queue=False)
  return app


def _text_colour(hex_colour: str) -> str:
  r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
  return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"


def launch(args: argparse.Namespace, *, block: bool = True):
  """Loads the model, builds the page and serves it; returns (app, backend).

  block=False returns once the server runs (tests); `app.close()` stops it.
  """
  start = time.perf_counter()
  backend = DemoBackend(args)
  try:
    if not backend.load():
      print(f"warning: {backend.missing()}", file=sys.stderr)
  except ValueError as e:
    if args.checkpoint is not None:
      raise common.UserError(f"{e}") from None
    print(f"warning: {e}", file=sys.stderr)  # the default run, still being made
  app = build_app(backend)
  app.queue(default_concurrency_limit=1, max_size=args.queue_size)
  # The app is closed by the caller or at exit; the outputs folder with it.
  atexit.register(backend.close)
  app.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
             prevent_thread_lock=True, show_error=True, quiet=True, footer_links=[],
             allowed_paths=[backend.examples_dir], max_file_size=args.max_file_size,
             enable_monitoring=False, ssr_mode=False, mcp_server=False, pwa=False)
  print(f"LSeg demo ready in {time.perf_counter() - start:.1f} s: {app.local_url}", flush=True)
  if block:
    try:
      app.block_thread()
    finally:
      app.close()
      backend.close()
  return app, backend


def main(argv=None) -> int:
  args = parse_args(argv)
  common.setup_logging()
  logging.getLogger("lseg_jax.demo").setLevel(logging.INFO)
  logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup probes.
  launch(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
