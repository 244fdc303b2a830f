"""The argument layer the command-line tools share.

Every tool that reads a run config takes `--config FILE[:ARG]` and any number of
`--config.KEY=VALUE` overrides of fields of the completed config (`lseg_jax.config`); eval and
predict share the checkpoint arguments (`--checkpoint`, `--step`, `--tokenizer`, `--prompt`,
`--dtype`). Every tool that runs JAX takes the multi-process arguments
(`lseg_jax.distributed.add_arguments`: `--coordinator`, `--num-processes`, `--process-id`,
`--heartbeat-timeout`) and calls `start_jax` before its first computation.

Every tool runs its `main` through `entry_point` (`run`, then exit): an error the user can cause (a
bad value, a missing or damaged file), which the library raises as `lseg_jax.errors.UserError`, ends
in one line "error: ..." and exit code 2; `--verbose` or LSEG_DEBUG=1 shows the traceback instead
(and TensorFlow's C++ warnings, otherwise hidden unless TF_CPP_MIN_LOG_LEVEL is set:
`lseg_jax.cli`). Any other exception is a bug and keeps its traceback (exit code 1). A failed run
exits at once, whatever threads are still running.
"""
from __future__ import annotations

import argparse
import logging as logging_std
import os
import sys
import traceback
from typing import Any, Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

from lseg_jax import checkpoint
from lseg_jax import config as config_lib
from lseg_jax import distributed
from lseg_jax import text
from lseg_jax.errors import UserError
from lseg_jax.models import lseg

CONFIG_PREFIX = "--config."
USER_ERROR_EXIT = 2
VERBOSE_FLAG = "--verbose"
DEBUG_ENV = "LSEG_DEBUG"


def user_error_message(e: BaseException) -> str | None:
  """The one-line message of an error the user caused (`UserError`, or the device
  running out of memory); None for a bug, which keeps its traceback."""
  if isinstance(e, UserError):
    return str(e) or type(e).__name__
  if "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e):
    return ("the device ran out of memory; use a smaller batch size or crop size "
            "(--config.batch_size, --config.data.crop_size), smaller images "
            "(predict: --max-side), or --config.model.dtype=bfloat16 ("
            + str(e).splitlines()[0][:200] + ")")
  return None


def entry_point(main) -> None:
  """What tools/*.py call: `run(main)`, then exit. A failing run (any non-zero code,
  a bug's traceback included) exits at once with os._exit: after an error, the
  threads of a tf.data pipeline can keep the interpreter's teardown waiting forever."""
  try:
    code = run(main)
  except SystemExit as e:
    code = e.code
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 1
  code = int(code or 0)
  sys.stdout.flush()
  sys.stderr.flush()
  if code:
    logging_std.shutdown()
    # A process that finished its work leaves the job in step with the others;
    # otherwise they learn that this one left (both are no-ops for one process).
    distributed.shutdown_finished()
    distributed.leaving()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(0)


def run(main, argv: Sequence[str] | None = None) -> int:
  """Runs a tool's `main(argv)`: a `UserError` (or the device running out of memory)
  prints "error: ..." and returns 2; any other exception keeps its traceback.

  `--verbose` (anywhere in argv) or LSEG_DEBUG=1 lets the traceback through.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  # What follows "--" is another command's (tools/launch.py), its --verbose included.
  end = argv.index("--") if "--" in argv else len(argv)
  verbose = VERBOSE_FLAG in argv[:end] or os.environ.get(DEBUG_ENV, "") not in ("", "0")
  argv = [a for a in argv[:end] if a != VERBOSE_FLAG] + argv[end:]
  try:
    return main(argv)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, UserError):
      # A collective that failed because another process died: the lost process is
      # named instead (the process exits there).
      distributed.await_lost_process(e)
    message = None if verbose else user_error_message(e)
    if message is None:
      raise
    print(f"error: {message}", file=sys.stderr)
    return USER_ERROR_EXIT


def new_parser(doc: str) -> argparse.ArgumentParser:
  """A tool's parser: the module docstring's first line as description, the rest as epilog."""
  return argparse.ArgumentParser(description=doc.split("\n")[0], epilog=doc.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """argv -> (argv without them, [(KEY, VALUE)] of `--config.KEY=VALUE` and
  `--config.KEY VALUE`)."""
  rest, overrides = [], []
  args = iter(argv)
  for arg in args:
    if not arg.startswith(CONFIG_PREFIX):
      rest.append(arg)
      continue
    key, sep, value = arg[len(CONFIG_PREFIX):].partition("=")
    if not sep:
      value = next(args, None)
      if value is None:
        raise UserError(f"{arg} needs a value ({arg}=VALUE)")
    overrides.append((key, value))
  return rest, overrides


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
  """`parser.parse_args` that also collects config overrides into `args.overrides`."""
  rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(rest)
  args.overrides = overrides
  if not hasattr(args, "config"):  # model-only tools (predict): compute fields only
    bad = [k for k, _ in overrides if k.partition(".")[0] != "model"]
    if bad:
      parser.error(f"--config.{bad[0]}: this tool takes only --config.model.KEY=VALUE "
                   "overrides (e.g. --config.model.dtype=bfloat16)")
  return args


def add_config_arg(parser: argparse.ArgumentParser, *, required: bool, help_text: str) -> None:
  parser.add_argument("--config", required=required, metavar="FILE[:ARG]", help=(
      help_text + "; any field can then be overridden with --config.KEY=VALUE"))


def _config_file_error(spec: str, e: BaseException) -> UserError:
  """A one-line UserError for a config file that failed to load, naming the file (and
  the line of a syntax error or of the failing statement in that file)."""
  path = os.path.abspath(spec.partition(":")[0])
  if isinstance(e, flags.IllegalFlagValueError):  # ml_collections wraps ValueErrors
    e = e.__cause__ or e.__context__ or e
  if isinstance(e, SyntaxError):
    return UserError(f"--config {spec!r}: syntax error in {e.filename} line {e.lineno}: {e.msg}")
  if isinstance(e, ValueError):  # get_config's own checks: the message says what is wrong
    return UserError(f"--config {spec!r}: {e}")
  if isinstance(e, AttributeError) and "get_config" in str(e):
    return UserError(f"--config {spec!r} has no get_config(); expected a config file "
                     "that defines get_config(arg=None)")
  lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
           if os.path.abspath(f.filename) == path]
  where = f" (line {lines[-1]})" if lines else ""
  return UserError(f"--config {spec!r} failed to load{where}: {type(e).__name__}: {e}")


def read_config_file(spec: str):
  """configs/NAME.py[:ARG] -> its get_config(ARG), loaded by ml_collections; UserError
  if the file is missing, does not parse, or its get_config fails."""
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    raise UserError(f"--config file {path!r} does not exist; expected configs/NAME.py[:ARGS]")
  values = flags.FlagValues()
  # sys_argv: otherwise the flag reads the process's own --config.KEY overrides; they
  # are applied by lseg_jax.config (which knows the library's defaults and the fields
  # that only the completed config has).
  argv = ["config", f"--config={spec}"]
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=False,
                                  sys_argv=argv)
  try:
    values(argv)
  except Exception as e:  # pylint: disable=broad-except
    raise _config_file_error(spec, e) from e
  return values.config


def load_config(spec: str | None, overrides: Sequence[tuple[str, str]] = (), *,
                base: dict[str, Any] | None = None):
  """The completed, checked config of a config file (or of `base`, e.g. a checkpoint's
  saved config), with command-line overrides applied (UserError if not valid)."""
  raw = read_config_file(spec) if spec else base
  if raw is None:
    raise UserError("no config: give --config FILE[:ARG]")
  try:
    config = config_lib.override(config_lib.complete(raw), overrides)
    config_lib.check_config(config)
  except UserError:
    raise
  except ValueError as e:
    raise UserError(str(e)) from e
  return config


def start_jax(args: argparse.Namespace):
  """Joins the process to its multi-process job (a no-op for one process) before the
  first JAX computation; logs and returns the `distributed.Topology`."""
  try:
    return distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                  heartbeat_timeout=args.heartbeat_timeout)
  except (ValueError, RuntimeError) as e:
    raise UserError(str(e)) from e


def add_checkpoint_args(parser: argparse.ArgumentParser, *, required: bool = True,
                        default: str | None = None) -> None:
  """--checkpoint, --step, --tokenizer, --prompt, --dtype (eval, predict, demo)."""
  parser.add_argument("--checkpoint", required=required, default=default, help=(
      "checkpoint directory (Orbax), or a training work directory"
      + (f" (default: {default})" if default else "")))
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: the latest)")
  parser.add_argument("--tokenizer", default=None, help=(
      "CLIP tokenizer: a folder with vocab.json and merges.txt, a Hugging Face Hub id "
      "(owner/name), an official CLIP name (ViT-B/32, ViT-B/16, RN50x16, ...: the Hub "
      "repo of that model's tokenizer), or byte-level (default: the checkpoint's)"))
  parser.add_argument("--prompt", default=None, help=(
      'label template with one "{}", e.g. "a photo of a {}." (default: the checkpoint\'s '
      'training template, else bare names as LSeg; "" forces bare names)'))
  parser.add_argument("--dtype", default=None, choices=lseg.FIELD_CHOICES["dtype"],
                      help="override the checkpoint's compute dtype")


def load_checkpoint(args):
  """(model, meta, embedder, tokenizer spec, template) for the checkpoint arguments."""
  # The model.FIELD overrides: compute fields of the loaded model (dtype, attention, ...).
  overrides = {key.partition(".")[2]: config_lib.parse_value(value)
               for key, value in args.overrides if key.partition(".")[0] == "model"}
  if args.dtype:
    overrides["dtype"] = args.dtype
  directory = checkpoint.resolve_directory(args.checkpoint)
  model, meta = checkpoint.load_model(directory, args.step, **overrides)
  embedder, tokenizer_spec, template = text.checkpoint_label_embedder(
      model, meta, directory, tokenizer=args.tokenizer, prompt=args.prompt)
  return model, meta, embedder, tokenizer_spec, template


def _drop_library_info(record) -> bool:
  """A logging filter: drops the INFO lines of the libraries (their warnings still show)."""
  return record.levelno >= logging_std.WARNING or not any(
      f in record.pathname for f in ("/orbax/", "/jax/_src/xla_bridge", "/tensorflow_datasets/"))


def setup_logging() -> None:
  """absl INFO logging to stderr for the tools' own progress lines, without the
  libraries' INFO noise (JAX's backend probing, Orbax's per-save lines)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if _drop_library_info not in handler.filters:
    handler.addFilter(_drop_library_info)

