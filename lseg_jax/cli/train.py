r"""Trains LSeg from a config file.

  python tools/train.py --config configs/synthetic_tiny.py --workdir runs/synthetic_tiny
  python tools/train.py --config configs/ade20k.py:variant=vitl16 --workdir ckpts/ade20k_l16 \
      --config.data.data_dir=DATA

Overrides: `--config.KEY=VALUE` for any field of the completed config (see
`lseg_jax.config`; unknown keys are refused). Rerunning a command on the same
--workdir resumes from its latest checkpoint.

Exit codes: 0 finished (total_steps reached, or config.stop_at_step); 75 (EX_TEMPFAIL)
stopped by SIGTERM, 130 by Ctrl-C (SIGINT; printing the command that resumes), each after
saving a checkpoint; 76 another process of the job was lost; 2 a user error (one line on
stderr); 1 anything else. After 75, 130 or 76 rerun the same command (for every process)
to resume: docs/scaling.md, "Preemption and lost processes".
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import jax

from lseg_jax import distributed
from lseg_jax import train
from lseg_jax import train_utils
from lseg_jax.cli import common

# Stopped by SIGTERM before total_steps, with a checkpoint saved: rerun to resume.
EXIT_PREEMPTED = 75


def build_parser() -> argparse.ArgumentParser:
  p = common.new_parser(__doc__)
  common.add_config_arg(p, required=True, help_text="training config file[:arg]")
  p.add_argument("--workdir", required=True, help=(
      "directory for checkpoints and metrics (local, or any path etils.epath reads, "
      "e.g. gs://bucket/run)"))
  distributed.add_arguments(p)
  return p


def check_workdir(workdir: str) -> None:
  """Raises UserError unless `workdir` is a writable folder or can be made one.

  Creates nothing: process 0 makes the folder once the settings have been checked, so a run refused
  for bad settings leaves nothing behind. Remote paths (gs://...) are checked by their first write.
  """
  if "://" in workdir:
    return
  fix = "expected a folder this user can create and write to; pass another --workdir"
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise common.UserError(f"--workdir {workdir!r} is a file; {fix}")
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise common.UserError(f"--workdir {workdir!r} is not writable ({existing!r} is a file); {fix}")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise common.UserError(f"--workdir {workdir!r} is not writable (permission denied on "
                           f"{existing!r}); {fix}")


def resume_command(argv) -> str:
  """The command line that reruns this training (and so resumes it)."""
  script = sys.argv[0] if sys.argv[0].endswith(".py") else os.path.join("tools", "train.py")
  return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def main(argv=None) -> int:
  args = common.parse(build_parser(), argv)
  config = common.load_config(args.config, args.overrides)
  check_workdir(args.workdir)
  common.setup_logging()
  common.start_jax(args)
  summary = train.train_and_evaluate(config, args.workdir)
  distributed.done()
  # Every process exits with the same code (schedulers read each task's).
  if summary.get("interrupted"):
    code = train_utils.INTERRUPTED_EXIT
  else:
    code = EXIT_PREEMPTED if summary.get("terminated") else 0
  if jax.process_index():
    return code
  if summary.get("interrupted"):
    print(f"interrupted: saved step {summary['step']} in {summary['checkpoint_dir']}; "
          f"resume with: {resume_command(argv)}", file=sys.stderr)
    return code
  print(f"finished at step {summary['step']}"
        + (" (stopped early; rerun to resume)" if summary["preempted"] else "")
        + "".join(f", {k} {v:.4f}" for k, v in summary["eval"].items()))
  return code


if __name__ == "__main__":
  common.entry_point(main)
