"""AdaLoRA's budget schedule b(t): how many singular values may stay non-zero at step t.

The budget counts triplets (ranks) summed over all adapted matrices, not parameters. It has
three phases (paper §3.3 and App. A, Eq. 14; PEFT ``AdaLoraConfig`` docstring):

1. **warm-up**, ``step <= tinit``: ``b = b(0)``, nothing is masked, importance statistics
   already accumulate;
2. **budgeting**, ``tinit < step <= total_step - tfinal``: a cubic decay from ``b(0)`` to
   ``b(T)``, masking every ``deltaT`` steps;
3. **final fine-tuning**, ``step > total_step - tfinal``: ``b = b(T)``; PEFT freezes the rank
   pattern at ``step == total_step - tfinal`` and re-applies it at every later step.

``tfinal`` is a *number of steps* (the length of phase 3), not a step index (peft#2341).

The paper prints the decay as ``(1 - (t - t_i - t_f) / (T - t_i - t_f))^3``. That is a typo:
it is neither ``b(0)`` at ``t = t_i`` nor ``b(T)`` at ``t = T - t_f``. PEFT and the authors'
``schedule_threshold`` use ``(t - t_i)``, and so does :func:`budget_schedule`, which returns
exactly what PEFT's ``RankAllocator.budget_schedule`` returns, including the ``int()`` floor
and the ``step <= tinit`` boundary (the paper writes ``t < t_i``).
"""

from __future__ import annotations

PHASES = ("warm-up", "budgeting", "final")
PEFT_SAME_BUDGET = ("PEFT 0.21.2 accepts this AdaLoraConfig and fails at the first allocation after tinit with "
                    "'kthvalue(): selected number k out of range'")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_schedule(*, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                   total_step: int | None, deltaT: int) -> None:
    """Raise ``ValueError`` for a schedule PEFT would reject or that cannot work.

    Budgets count triplets: ``init_budget`` = b(0) = sum of ``init_r``, ``target_budget`` = b(T) =
    ``target_r`` x matrices. b(T) must lie in [1, b(0) - 1]: with b(T) = b(0) nothing is ever masked.
    """
    if total_step is None:
        raise ValueError("total_step is required: set it to the number of optimizer steps of the run "
                         "(PEFT's AdaLoraConfig raises for total_step=None too)")
    if not _is_int(total_step) or total_step <= 0:
        raise ValueError(f"total_step must be a positive integer (optimizer steps), got {total_step!r}")
    if not (_is_int(tinit) and _is_int(tfinal)) or tinit < 0 or tfinal < 0:
        raise ValueError(f"tinit and tfinal count steps and must be integers >= 0, got tinit={tinit!r}, "
                         f"tfinal={tfinal!r}")
    if tinit + tfinal >= total_step:
        raise ValueError(f"tinit + tfinal = {tinit} + {tfinal} >= total_step = {total_step} leaves no budgeting "
                         "phase: decrease tinit or tfinal, or increase total_step")
    if not _is_int(deltaT) or deltaT < 1:
        raise ValueError(f"deltaT (steps between two allocations) must be a positive integer, got {deltaT!r}")
    if target_budget < 1:
        raise ValueError(f"the target budget must be at least one triplet, got {target_budget}; raise target_r")
    if target_budget > init_budget:
        raise ValueError(f"target budget b(T) = {target_budget} triplets exceeds the initial budget b(0) = "
                         f"{init_budget}: target_r must be below init_r (AdaLoRA only removes ranks)")
    if target_budget == init_budget:
        raise ValueError(f"target_r equals init_r (target budget b(T) = initial budget b(0) = {init_budget} "
                         f"triplets): AdaLoRA would have no rank to remove. {PEFT_SAME_BUDGET}. For a fixed "
                         "rank use plain LoRA (LoraConfig(r=target_r)); otherwise lower target_r below init_r "
                         "or raise init_r (the paper uses b(0) = 1.5 b(T))")


def check_loop_length(*, total_step: int, tfinal: int, max_steps: int, grad_accum: int = 1) -> None:
    """Raise ``ValueError`` unless the schedule ends where the training loop ends.

    ``total_step`` (AdaLoRA's, PEFT's meaning) and ``max_steps`` both count *optimizer* steps; a loop
    with ``grad_accum`` micro-batches per step runs ``max_steps x grad_accum`` forward passes.
    """
    if total_step == max_steps:
        return
    if max_steps <= total_step - tfinal:
        effect = (f"the rank pattern is never frozen at b(T) (that happens at 0-based step total_step - tfinal = "
                  f"{total_step - tfinal})")
    elif max_steps < total_step:
        effect = "the final fine-tuning phase is cut short"
    else:
        effect = f"steps {total_step} to {max_steps - 1} would run past the end of the schedule"
    fix = f"Set total_step={max_steps} (optimizer steps, after gradient accumulation), or max_steps={total_step}"
    if grad_accum > 1 and total_step == max_steps * grad_accum:
        fix = (f"total_step = max_steps x grad_accum = {max_steps} x {grad_accum} counts micro-batches, but "
               "AdaLoRA's schedule counts optimizer steps (PEFT's update_and_allocate gets the optimizer step): "
               f"set total_step={max_steps}")
    raise ValueError(f"AdaLoRA's total_step={total_step} does not match the training loop's max_steps={max_steps} "
                     f"optimizer steps (grad_accum={grad_accum} micro-batches each): {effect}. {fix}")


def budget_schedule(step: int, *, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_step: int | None, deltaT: int) -> tuple[int, bool]:
    """``(budget, mask_now)`` at optimizer step ``step`` (counted from 0), as PEFT computes it."""
    check_schedule(init_budget=init_budget, target_budget=target_budget, tinit=tinit, tfinal=tfinal,
                   total_step=total_step, deltaT=deltaT)
    if step <= tinit:  # phase 1: full budget, no masking
        return init_budget, False
    if step > total_step - tfinal:  # phase 3: final budget, pattern fixed
        return target_budget, True
    # phase 2, Eq. 14 with (t - t_i) in the numerator
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_budget - target_budget) * (mul_coeff ** 3) + target_budget)
    return budget, step % deltaT == 0


def phase(step: int, *, tinit: int, tfinal: int, total_step: int) -> str:
    """Which of :data:`PHASES` the step belongs to (PEFT's boundaries)."""
    if step <= tinit:
        return "warm-up"
    return "final" if step > total_step - tfinal else "budgeting"
