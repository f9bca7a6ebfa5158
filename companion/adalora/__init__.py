"""AdaLoRA from scratch (Zhang et al., ICLR 2023), equal to PEFT's implementation step for step.

One concept per module, in the order Chapter 2 teaches them:

- :mod:`.layer`          -- ``SVDLinear``: Delta W = P Lambda Q on a frozen (or 4-bit) base; ``inject_adalora``
- :mod:`.importance`     -- ``ImportanceTracker``: sensitivity, uncertainty, score (Eq. 10-13)
- :mod:`.masking`        -- triplet score (Eq. 9) and ``allocate_budget`` (Eq. 8, PEFT ``mask_to_budget``)
- :mod:`.schedule`       -- ``budget_schedule``: warm-up, cubic decay, final phase (Eq. 14, typo fixed)
- :mod:`.regularization` -- ``orthogonal_regularization`` (Eq. 4 and PEFT's form)
- :mod:`.allocator`      -- ``RankAllocator``: the training-time loop (PEFT ``update_and_allocate``)
- :mod:`.callback`       -- ``AdaLoraCallback`` for HF ``Trainer`` (PEFT needs it, silently)
- :mod:`.interop`        -- PEFT names, weight copying, ``freeze_ranknum``, rank tables in the paper's layout
- :mod:`.seed_variants`  -- the source tutorial's (wrong) versions, for the ablation
- :mod:`.ablation`       -- the ablation's arms on one model
"""

from .ablation import VARIANTS, AblationSettings, PreparedRun, prepare_variant
from .allocator import RankAllocator, TripletImportance
from .callback import AdaLoraCallback
from .importance import ImportanceTracker
from .interop import copy_adapter_weights_from_peft, freeze_ranknum, paper_position, rank_grid, ranks_from_peft
from .layer import SVDLinear, adalora_layers, inject_adalora
from .masking import allocate_budget, mask_threshold, mask_to_budget, triplet_score
from .regularization import (add_orthogonal_regularization, adalora_pairs, orthogonal_regularization,
                             orthogonality_deviations)
from .schedule import budget_schedule, check_schedule, phase
from .seed_variants import SeedLearningRatePhases, SeedMatrixScorer, seed_svd_init

__all__ = [
    "VARIANTS", "AblationSettings", "AdaLoraCallback", "ImportanceTracker", "PreparedRun", "RankAllocator",
    "SVDLinear", "SeedLearningRatePhases", "SeedMatrixScorer", "TripletImportance", "adalora_layers",
    "adalora_pairs", "add_orthogonal_regularization", "allocate_budget", "budget_schedule", "check_schedule",
    "copy_adapter_weights_from_peft", "freeze_ranknum", "inject_adalora", "mask_threshold", "mask_to_budget",
    "orthogonal_regularization", "orthogonality_deviations", "paper_position", "phase", "prepare_variant",
    "rank_grid", "ranks_from_peft", "seed_svd_init", "triplet_score",
]
