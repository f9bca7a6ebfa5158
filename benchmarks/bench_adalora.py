"""Training-step time of the companion's AdaLoRA vs PEFT's AdaLoRA vs PEFT's LoRA on MiniLM.

All three models are built from the same pretrained all-MiniLM-L6-v2 and adapt the same six
matrices per layer (Wq, Wk, Wv, Wo, Wf1, Wf2). Steps are measured round-robin (a few steps of
each model in turn), so that load from other processes hits all three alike; we report the
median seconds per optimizer step and, for the two AdaLoRA models, the median time of the
allocation call alone (``update_and_allocate``, which here masks at every step: deltaT = 1,
tinit = 0, the worst case). Ratios are companion / PEFT.
"""

from __future__ import annotations

import statistics
import time

import torch

TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]
SCHEDULE = dict(target_r=4, tinit=0, tfinal=0, deltaT=1, total_step=10_000)
INIT_R, ALPHA = 8, 16
ROUNDS, STEPS_PER_ROUND, WARMUP = 8, 4, 3


def build(kind: str):
    """(model, allocate(step) or None) for kind in {"companion", "peft", "lora"}."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from companion.adalora import RankAllocator, add_orthogonal_regularization, inject_adalora
    from companion.models import load_minilm_classifier

    model, _ = load_minilm_classifier(num_labels=2, seed=0)
    if kind == "companion":
        inject_adalora(model, TARGETS, init_r=INIT_R, lora_alpha=ALPHA, trainable_modules=("classifier",))
        add_orthogonal_regularization(model, 0.1)
        allocator = RankAllocator(model, **SCHEDULE)
        return model, allocator.update_and_allocate
    if kind == "peft":
        model = get_peft_model(model, AdaLoraConfig(task_type="SEQ_CLS", init_r=INIT_R, lora_alpha=ALPHA,
                                                    target_modules=TARGETS, orth_reg_weight=0.1, **SCHEDULE))
        return model, model.base_model.update_and_allocate
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=SCHEDULE["target_r"], lora_alpha=ALPHA,
                                             target_modules=TARGETS))
    return model, None


def main() -> None:
    from companion.data import sentiment_dataloaders
    from companion.models import load_minilm_tokenizer

    torch.manual_seed(0)
    loader = sentiment_dataloaders(load_minilm_tokenizer(), batch_size=16, seed=0, max_length=32, n_train=256,
                                   n_validation=5, n_test=5)["train"]
    batches = list(loader)
    runs = {}
    for kind in ("companion", "peft", "lora"):
        model, allocate = build(kind)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        runs[kind] = dict(model=model, allocate=allocate, optimizer=optimizer, step=0, times=[], alloc=[])

    def one_step(run, record):
        batch = batches[run["step"] % len(batches)]
        start = time.perf_counter()
        run["model"](**batch).loss.backward()
        run["optimizer"].step()
        alloc_start = time.perf_counter()
        if run["allocate"] is not None:
            run["allocate"](run["step"])
        end = time.perf_counter()
        run["optimizer"].zero_grad()
        run["step"] += 1
        if record:
            run["times"].append(end - start)
            run["alloc"].append(end - alloc_start)

    for run in runs.values():
        for _ in range(WARMUP):
            one_step(run, record=False)
    for _ in range(ROUNDS):
        for run in runs.values():
            for _ in range(STEPS_PER_ROUND):
                one_step(run, record=True)

    step = {k: statistics.median(r["times"]) for k, r in runs.items()}
    alloc = {k: statistics.median(r["alloc"]) for k, r in runs.items() if r["allocate"] is not None}
    n = ROUNDS * STEPS_PER_ROUND
    from companion.adalora import adalora_layers

    matrices = len(adalora_layers(runs["companion"]["model"]))
    print(f"MiniLM, batch 16, {matrices} adapted matrices, init_r={INIT_R}; median of {n} steps each, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':28s}{'step (ms)':>12s}{'allocation (ms)':>18s}")
    labels = {"companion": "companion AdaLoRA", "peft": "PEFT AdaLoRA", "lora": "PEFT LoRA (r = target_r)"}
    for kind, label in labels.items():
        a = f"{1e3 * alloc[kind]:18.2f}" if kind in alloc else f"{'-':>18s}"
        print(f"{label:28s}{1e3 * step[kind]:12.1f}{a}")
    print(f"ratio step time companion / PEFT AdaLoRA: {step['companion'] / step['peft']:.3f}x (goal <= 1.0x)")
    print(f"ratio allocation time companion / PEFT:   {alloc['companion'] / alloc['peft']:.3f}x")
    print(f"ratio step time PEFT AdaLoRA / PEFT LoRA: {step['peft'] / step['lora']:.3f}x")
    print(f"allocation share of a companion step:     {alloc['companion'] / step['companion']:.1%}")


if __name__ == "__main__":
    main()
