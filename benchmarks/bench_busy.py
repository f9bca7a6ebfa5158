"""A training cell on a busy machine: its time alone and beside a CPU-bound neighbour, before and after the fix.

The workload is one training cell of the course: MiniLM with PEFT LoRA (r = 8 on query and value),
AdamW, batches of 16 sentences of 32 tokens, ``companion.train.train``. It runs in a child process,
so that the OpenMP settings are those the process starts with, as in a notebook kernel.

Two OpenMP set-ups are compared:

- **before**: ``torch`` is imported before anything sets ``GOMP_SPINCOUNT``, as in the course before
  the fix. GNU OpenMP (the ``libgomp`` that PyTorch's Linux wheels bundle) then lets a thread that
  reaches a barrier spin for about 300,000 iterations before it sleeps.
- **after**: ``import companion`` comes first and sets ``GOMP_SPINCOUNT=3000`` (unless the user set it or
  ``OMP_WAIT_POLICY``), so a waiting thread spins briefly, then sleeps and hands its core to whoever
  needs it.

Each set-up is timed alone and beside two neighbours that keep both cores busy: a second course
notebook (a torch process with two threads doing matrix products, same OpenMP set-up as the workload)
and a non-OpenMP program (two plain Python processes in a busy loop, like a browser tab running
JavaScript). With two CPU-bound programs on two cores, a fair share doubles the time: the ratio
printed is (time beside the neighbour) / (time alone) of the same set-up, so 2.0 is fair. Spinning
threads push it far above that, because a thread that spins on a core the other program needs
delays both. A run that has not finished ``STEPS`` steps after ``TIME_CAP`` seconds stops there and
reports its time per step so far.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

STEPS, TIME_CAP, WARMUP = 24, 90.0, 2

WORKLOAD = r"""
import sys, time
if sys.argv[1] == "before":
    import torch  # libgomp reads its settings now, before the companion can set any
import companion  # "after": sets GOMP_SPINCOUNT=3000 before torch starts
import torch
from peft import LoraConfig, get_peft_model
from companion.data import sentiment_dataloaders
from companion.models import load_minilm_classifier
from companion.train import TrainConfig, train

steps, cap, warmup = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
model, tokenizer = load_minilm_classifier(seed=0)
model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]))
loader = sentiment_dataloaders(tokenizer, batch_size=16, seed=0, max_length=32, n_train=512,
                               n_validation=8, n_test=8)["train"]
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
train(model, loader, optimizer, TrainConfig(max_steps=warmup, eval_every=0, progress=False))
done, start = 0, time.perf_counter()
while done < steps and time.perf_counter() - start < cap:
    train(model, loader, optimizer, TrainConfig(max_steps=1, eval_every=0, progress=False))
    done += 1
print((time.perf_counter() - start) / done)
"""

TORCH_NEIGHBOUR = r"""
import sys
if sys.argv[1] == "before":
    import torch
import companion
import torch
a = torch.randn(384, 384)
while True:
    for _ in range(50):
        b = a @ a
"""

SPINNER = "while True: pass"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def seconds_per_step(setup: str, neighbour: str | None) -> float:
    """Seconds per optimizer step of the workload in ``setup`` ("before"/"after") beside ``neighbour``
    (None, "notebook" or "spinners")."""
    env = _env()
    others = []
    if neighbour == "notebook":
        others = [subprocess.Popen([sys.executable, "-W", "ignore", "-c", TORCH_NEIGHBOUR, setup], env=env,
                                   stderr=subprocess.DEVNULL)]
    elif neighbour == "spinners":
        others = [subprocess.Popen([sys.executable, "-c", SPINNER]) for _ in range(os.cpu_count() or 2)]
    try:
        time.sleep(3.0 if others else 0.0)  # let the neighbour start and fill the cores
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", WORKLOAD, setup, str(STEPS), str(TIME_CAP), str(WARMUP)],
                             env=env, check=True, capture_output=True, text=True)
        return float(out.stdout.strip().splitlines()[-1])
    finally:
        for p in others:
            p.kill()
            p.wait()


def main() -> None:
    print(f"cores: {os.cpu_count()}; workload: MiniLM + LoRA, {STEPS} optimizer steps (cap {TIME_CAP:.0f} s)")
    print(f"{'set-up':<8} {'neighbour':<24} {'s/step':>8} {'ratio to alone':>15}")
    alone_by_setup = {}
    for setup in ("before", "after"):
        alone = alone_by_setup[setup] = seconds_per_step(setup, None)
        print(f"{setup:<8} {'none':<24} {alone:8.3f} {1.0:15.2f}", flush=True)
        for neighbour, label in (("notebook", "torch notebook, 2 thr."), ("spinners", "busy loops (non-OpenMP)")):
            busy = seconds_per_step(setup, neighbour)
            print(f"{setup:<8} {label:<24} {busy:8.3f} {busy / alone:15.2f}", flush=True)
    print("fair share on a machine whose every core is kept busy by the neighbour: 2.0")
    print(f"cost of the fix on an idle machine (after / before, alone): "
          f"{alone_by_setup['after'] / alone_by_setup['before']:.2f}: sleeping threads wake more slowly than spinning "
          "ones, which tiny models with many short parallel regions feel most")


if __name__ == "__main__":
    main()
