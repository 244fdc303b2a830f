"""The PyTorch side of `tools/benchmark.py --torch`: timings of our PyTorch LSeg
(`lseg_jax.torch_lseg`) with the same model settings, in a process of its own:

  python -m lseg_jax.torch_lseg.benchmark < job.json

reads a JSON job {"model": TorchLSegConfig fields, "platform", "crop", "labels",
"steps", "figures": [[task, dtype, batch]], "text_tower"} from stdin and writes one JSON
line {"version", "device", "figures": [timing]} (or {"skipped": why}) to stdout.
"""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import torch
import torch.nn.functional as F

from lseg_jax.timing import time_calls
from lseg_jax.torch_lseg.lseg import LSegTorch, TorchLSegConfig

NA = "n/a"


def torch_device(platform: str):
  """The torch device of the JAX platform, or None (with the reason) if torch has none."""
  if platform == "cpu":
    return torch.device("cpu"), None
  if platform in ("gpu", "cuda") and torch.cuda.is_available():
    return torch.device("cuda"), None
  return None, f"PyTorch has no {platform} device here"


def _inputs(model: LSegTorch, device, *, batch_size: int, crop: int, labels: int):
  """Random label embeddings, label token ids, two image and label batches, a mask."""
  g = torch.Generator().manual_seed(0)
  text = torch.randn(labels, model.embed_dim, generator=g).to(device)
  # Token ids: start token, 8 random word ids, end token (the highest id: CLIP pools
  # the embedding at the argmax), padding.
  vocab = model.clip_pretrained.token_embedding.num_embeddings
  tokens = torch.zeros(labels, model.clip_pretrained.context_length, dtype=torch.long)
  tokens[:, 0] = vocab - 2
  tokens[:, 1:9] = torch.randint(1, vocab - 2, (labels, 8), generator=g)
  tokens[:, 9] = vocab - 1
  images = [torch.rand(batch_size, 3, crop, crop, generator=g).mul(2).sub(1).to(device)
            for _ in range(2)]
  label = [torch.randint(-1, labels, (batch_size, crop, crop), generator=g).to(device)
           for _ in range(2)]
  mask = torch.ones(batch_size, labels, dtype=torch.bool, device=device)
  return text, tokens.to(device), images, label, mask


def bench_torch(cfg: TorchLSegConfig, task: str, dtype: str, device, *, batch_size: int,
                crop: int, labels: int, steps: int, text_tower: str = "frozen"
                ) -> dict[str, Any]:
  """One PyTorch figure: timing (plus peak memory on CUDA) of `task` in `dtype`.

  text_tower: "frozen" (label embeddings computed once) or "trained" (train: the label
  token ids encoded, backpropagated and updated every step, as official lang-seg).
  """
  torch.manual_seed(0)
  model = LSegTorch(cfg).to(device)
  train_text = task == "train" and text_tower == "trained"
  for p in model.clip_pretrained.parameters():
    p.requires_grad_(train_text)
  text, tokens, images, label, mask = _inputs(model, device, batch_size=batch_size,
                                              crop=crop, labels=labels)
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
              else contextlib.nullcontext())
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  if device.type == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

  if task == "train":
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step(i):
      opt.zero_grad(set_to_none=True)
      with autocast:
        logits = model(images[i % 2], model.encode_text(tokens) if train_text else text, mask)
      loss = F.cross_entropy(logits.float(), label[i % 2], ignore_index=-1)
      loss.backward()
      opt.step()
      sync()
  else:
    model.eval()

    def step(i):
      with torch.inference_mode(), autocast:
        model(images[i % 2], text, mask).argmax(1)
      sync()

  out = {k: round(v, 4) for k, v in time_calls(step, steps).items()}
  out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else NA
  del model
  return out


def main() -> None:
  """Reads the JSON job from stdin, writes the JSON answer line to stdout."""
  job = json.load(sys.stdin)
  device, reason = torch_device(job["platform"])
  if device is None:
    print(json.dumps({"skipped": reason}))
    return
  cfg = TorchLSegConfig(**job["model"])
  out = {"version": torch.__version__, "device": str(device), "figures": []}
  for task, dtype, batch in job["figures"]:
    print(f"torch {task} {dtype}: batch {batch}, {job['steps']} timed steps",
          file=sys.stderr, flush=True)
    out["figures"].append(bench_torch(cfg, task, dtype, device, batch_size=batch,
                                      crop=job["crop"], labels=job["labels"],
                                      steps=job["steps"], text_tower=job["text_tower"]))
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
