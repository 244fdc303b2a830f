r"""Runs a command as N processes of one JAX job on this machine.

  python tools/launch.py --processes 2 --devices-per-process 4 -- \
      python tools/train.py --config configs/synthetic_tiny.py --workdir runs/tiny_2x4
  python tools/launch.py --processes 8 --platform gpu -- python tools/train.py ...

Each process gets LSEG_COORDINATOR (127.0.0.1 and a free port), LSEG_NUM_PROCESSES and
LSEG_PROCESS_ID, which `lseg_jax.distributed.initialize` reads, and its own devices;
output lines are prefixed with "[i] ", SIGTERM and SIGINT forwarded to every process, and
the exit code is the worst of the processes' (signals count as 128 + signal number).
Devices and platforms: docs/scaling.md, "On one machine".
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Sequence

from lseg_jax import distributed
from lseg_jax.cli import common
from lseg_jax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
  p = common.new_parser(__doc__)
  p.add_argument("--processes", type=int, required=True, help="number of processes")
  p.add_argument("--devices-per-process", type=int, default=None, help=(
      "CPU: host devices per process (default 1); GPU: GPUs per process (default 1)"))
  p.add_argument("--platform", choices=["cpu", "gpu"], default="cpu",
                 help="cpu: forced host devices and gloo; gpu: GPUs split over processes")
  p.add_argument("--port", type=int, default=0,
                 help="coordinator port on 127.0.0.1 (default: a free one)")
  p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command each process runs")
  return p


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], index: int, count: int, coordinator: str,
                platform: str, devices: int) -> dict[str, str]:
  """The environment of process `index`."""
  env = dict(base)
  env.update({distributed.ENV_COORDINATOR: coordinator,
              distributed.ENV_NUM_PROCESSES: str(count),
              distributed.ENV_PROCESS_ID: str(index),
              "PYTHONUNBUFFERED": "1"})
  if platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  else:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(
        str(d) for d in range(index * devices, (index + 1) * devices))
  return env


def _pump(stream, prefix: str, lock: threading.Lock):
  for line in iter(stream.readline, b""):
    with lock:
      sys.stdout.buffer.write(prefix.encode() + line)
      sys.stdout.flush()
  stream.close()


def exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def launch(command: Sequence[str], processes: int, *, devices_per_process: int = 1,
           platform: str = "cpu", port: int = 0) -> int:
  """Starts `command` `processes` times as one job; returns the worst exit code."""
  if processes < 1:
    raise UserError(f"--processes {processes}; expected >= 1")
  if devices_per_process < 1:
    raise UserError(f"--devices-per-process {devices_per_process}; expected >= 1")
  if not command:
    raise UserError("no command; expected -- python tools/train.py ...")
  coordinator = f"127.0.0.1:{port or free_port()}"
  lock = threading.Lock()
  procs, pumps = [], []
  for i in range(processes):
    env = process_env(os.environ, i, processes, coordinator, platform, devices_per_process)
    # Own session: a terminal's Ctrl-C reaches the launcher, which forwards it once.
    proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(proc)
    with lock:
      print(f"[launch] process {i} of {processes}: pid {proc.pid}", flush=True)
    pump = threading.Thread(target=_pump, args=(proc.stdout, f"[{i}] ", lock), daemon=True)
    pump.start()
    pumps.append(pump)

  def forward(signum, frame):
    del frame
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signum)
  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    codes = [exit_code(proc.wait()) for proc in procs]
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for pump in pumps:
    pump.join(timeout=5)
  with lock:
    print(f"[launch] exit codes {codes}", flush=True)
  return max(codes)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  return launch(command, args.processes, devices_per_process=args.devices_per_process or 1,
                platform=args.platform, port=args.port)


if __name__ == "__main__":
  common.entry_point(main)
