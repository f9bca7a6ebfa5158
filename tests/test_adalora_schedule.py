"""budget_schedule against PEFT's RankAllocator.budget_schedule at every step."""

import pytest
from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator

from companion.adalora import budget_schedule, phase

SETTINGS = [  # (init_budget, target_budget, tinit, tfinal, total_step, deltaT)
    (12, 4, 10, 20, 100, 5),  # the research sheet's worked example
    (432, 288, 6000, 22000, 60000, 100),  # paper-like SST-2 numbers, 36 matrices
    (8, 1, 0, 0, 17, 1),  # PEFT's defaults for the phases
    (96, 48, 3, 2, 11, 3),
]


def peft_allocator(init_budget, target_budget, tinit, tfinal, total_step, deltaT):
    """A PEFT RankAllocator with the budgets set directly (no model needed for the schedule)."""
    allocator = object.__new__(PeftRankAllocator)
    allocator.peft_config = type("Config", (), dict(tinit=tinit, tfinal=tfinal, total_step=total_step,
                                                    deltaT=deltaT))()
    allocator.init_bgt, allocator.target_bgt = init_budget, target_budget
    return allocator


@pytest.mark.parametrize("settings", SETTINGS)
def test_budget_and_mask_flag_equal_peft_at_every_step(settings):
    init_budget, target_budget, tinit, tfinal, total_step, deltaT = settings
    reference = peft_allocator(*settings)
    for step in range(total_step + 3):
        ours = budget_schedule(step, init_budget=init_budget, target_budget=target_budget, tinit=tinit,
                               tfinal=tfinal, total_step=total_step, deltaT=deltaT)
        assert ours == reference.budget_schedule(step), step
        assert isinstance(ours[0], int)


def test_the_worked_example_of_the_three_phases():
    kw = dict(init_budget=12, target_budget=4, tinit=10, tfinal=20, total_step=100, deltaT=5)
    budgets = {s: budget_schedule(s, **kw) for s in (0, 10, 11, 15, 20, 40, 60, 80, 81, 99)}
    assert budgets[0] == budgets[10] == (12, False)  # warm-up includes step tinit
    assert budgets[11] == (11, False) and budgets[15] == (10, True) and budgets[20] == (9, True)
    assert budgets[40] == (5, True) and budgets[60] == (4, True)
    assert budgets[80] == (4, True)  # T - tfinal: cubic term is 0
    assert budgets[81] == budgets[99] == (4, True)
    assert [phase(s, tinit=10, tfinal=20, total_step=100) for s in (10, 11, 80, 81)] == \
        ["warm-up", "budgeting", "budgeting", "final"]


def test_the_schedule_is_continuous_at_both_ends_unlike_the_printed_eq_14():
    kw = dict(init_budget=1000, target_budget=100, tinit=50, tfinal=30, total_step=400, deltaT=1)
    assert budget_schedule(51, **kw)[0] >= 1000 - 30  # starts at b(0) ...
    assert budget_schedule(369, **kw)[0] <= 100 + 1  # ... and reaches b(T) at T - t_f
    # The paper's printed numerator (t - t_i - t_f) would give b(0) + ... at t = t_i: above b(0).
    printed = 100 + 900 * (1 - (50 - 50 - 30) / (400 - 50 - 30)) ** 3
    assert printed > 1000


@pytest.mark.parametrize("kwargs, message", [
    (dict(total_step=None), "total_step is required"),
    (dict(total_step=0), "positive integer"),
    (dict(tinit=60, tfinal=40), "leaves no budgeting phase"),
    (dict(target_budget=13), "target_r must be below init_r"),
    (dict(target_budget=12), r"target_r equals init_r \(target budget b\(T\) = initial budget b\(0\) = 12 "
                             r"triplets\).*kthvalue.*LoraConfig\(r=target_r\).*raise init_r"),
    (dict(deltaT=0), "deltaT"),
    (dict(target_budget=0), "at least one triplet"),
])
def test_bad_schedules_raise_errors_that_name_the_fix(kwargs, message):
    settings = dict(init_budget=12, target_budget=4, tinit=10, tfinal=20, total_step=100, deltaT=5) | kwargs
    with pytest.raises(ValueError, match=message):
        budget_schedule(0, **settings)
