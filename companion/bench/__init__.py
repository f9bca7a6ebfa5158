"""The comparison harness of Chapter 6: every method on the same task, data, steps and budget.

- :mod:`.tasks`   -- :class:`Task`: model loader, data, metric, adapted layers (MiniLM, GLUE, causal LMs)
- :mod:`.harness` -- :class:`BenchConfig`, the budget check, one arm per method, :func:`run_benchmark`
- :mod:`.precision` -- full fine-tuning of a 16-bit model in mixed precision (float32 master weights)
- :mod:`.results` -- :class:`BenchResults`: tidy CSV/JSON files, the summary table, the plots

    task = sentiment_task(profile)
    results = run_benchmark(task, BenchConfig())
    results.save("results/ch06")
    results.table()
"""

from .harness import (ADAPTER_METHODS, METHODS, BenchConfig, adapted_shapes, build_arm, check_budgets, ci_config,
                      gpu_config, kept_budget, run_benchmark, run_one, trainable_budget)
from .results import LABELS, BenchResults, plot_accuracy_vs_memory, plot_learning_curves, plot_rank_heatmaps
from .tasks import TASK_MODELS, Task, instruction_task, sentiment_task, task_model

__all__ = ["ADAPTER_METHODS", "LABELS", "METHODS", "TASK_MODELS", "BenchConfig", "BenchResults", "Task",
           "adapted_shapes", "build_arm", "check_budgets", "ci_config", "gpu_config", "instruction_task",
           "kept_budget", "plot_accuracy_vs_memory", "plot_learning_curves", "plot_rank_heatmaps", "run_benchmark",
           "run_one", "sentiment_task", "task_model", "trainable_budget"]
