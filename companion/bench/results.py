"""The comparison's results: tidy tables on disk, a summary table, and the chapter's three plots.

:class:`BenchResults` holds four tidy tables -- ``runs`` (one row per method and seed), ``curves``
(validation accuracy at every evaluation), ``losses`` (training loss at every step) -- plus the final
AdaLoRA ranks and the run's metadata. ``save`` writes them as CSV and JSON files that any tool can
read; Chapter 6's table and figures are produced from those files, not typed in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

FILES = {"runs": "runs.csv", "curves": "curves.csv", "losses": "losses.csv"}
LABELS = {"full": "Full fine-tuning", "lora": "LoRA", "adalora": "AdaLoRA", "qlora": "QLoRA (NF4 + DQ)",
          "qlora-adalora": "QLoRA + AdaLoRA"}
RUN_COLUMNS = ("method", "seed", "val_accuracy", "test_accuracy", "steps_to_target", "seconds_per_step",
               "peak_memory_bytes", "trainable_params", "planned_budget_params", "budget_params",
               "base_storage_bytes")


@dataclass
class BenchResults:
    runs: pd.DataFrame
    curves: pd.DataFrame
    losses: pd.DataFrame
    ranks: dict[str, dict[str, dict[str, int]]]  # method -> seed -> layer -> final rank
    meta: dict

    def __post_init__(self):
        missing = [c for c in RUN_COLUMNS if c not in self.runs.columns]
        if missing:
            raise ValueError(f"runs table lacks columns {missing}; it must come from companion.bench.run_benchmark")

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(self.runs["method"]))

    @classmethod
    def concat(cls, parts: list[BenchResults]) -> BenchResults:
        """One result from runs done in parts (e.g. one notebook cell per method): the tables stacked in
        order, the ranks merged, the minutes summed, the rest of the metadata from the first part. Raises
        ``ValueError`` when the parts ran different tasks or configurations, or repeat a method and seed."""
        if not parts:
            raise ValueError("concat needs at least one BenchResults")
        first = parts[0].meta
        for part in parts[1:]:
            if (part.meta["task"], part.meta["config"]) != (first["task"], first["config"]):
                raise ValueError(f"cannot join runs of different tasks or configurations: {first['task']!r} and "
                                 f"{part.meta['task']!r}; run every part with the same task and BenchConfig")
        runs = pd.concat([p.runs for p in parts], ignore_index=True)
        if runs.duplicated(["method", "seed"]).any():
            raise ValueError(f"method and seed repeated across parts: "
                             f"{runs.loc[runs.duplicated(['method', 'seed']), ['method', 'seed']].values.tolist()}")
        ranks = {}
        for part in parts:
            for method, by_seed in part.ranks.items():
                ranks.setdefault(method, {}).update(by_seed)
        meta = {**first, "minutes": sum(p.meta["minutes"] for p in parts)}
        return cls(runs, *(pd.concat([getattr(p, name) for p in parts], ignore_index=True)
                           for name in ("curves", "losses")), ranks, meta)

    def save(self, directory) -> Path:
        """Write runs.csv, curves.csv, losses.csv and results.json (ranks + metadata) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, filename in FILES.items():
            getattr(self, name).to_csv(directory / filename, index=False)
        (directory / "results.json").write_text(json.dumps({"ranks": self.ranks, "meta": self.meta}, indent=1))
        return directory

    @classmethod
    def load(cls, directory) -> BenchResults:
        directory = Path(directory)
        if not (directory / "results.json").exists():
            raise FileNotFoundError(f"no results.json in {directory}; run run_benchmark(...).save({str(directory)!r})")
        tables = {name: pd.read_csv(directory / filename) for name, filename in FILES.items()}
        extra = json.loads((directory / "results.json").read_text())
        return cls(**tables, ranks=extra["ranks"], meta=extra["meta"])

    def summary(self) -> pd.DataFrame:
        """One row per method: means and standard deviations over seeds (sample std, ddof=1).

        ``planned budget params`` is the budget the harness checked before training (``target_r`` on every
        matrix); ``budget params`` is the mean final budget over the seeds, counted from the ranks each
        matrix kept, with its ``min`` and ``max`` (AdaLoRA's ranks, and so its final budget, vary by seed)."""
        g = self.runs.groupby("method", sort=False)
        table = pd.DataFrame({
            "val acc mean (%)": 100 * g["val_accuracy"].mean(), "val acc std": 100 * g["val_accuracy"].std(),
            "test acc mean (%)": 100 * g["test_accuracy"].mean(), "test acc std": 100 * g["test_accuracy"].std(),
            "steps to target": g["steps_to_target"].mean(),
            "reached target": g["steps_to_target"].apply(lambda s: f"{s.notna().sum()}/{len(s)}"),
            "ms per step": 1e3 * g["seconds_per_step"].median(),
            "peak MB": g["peak_memory_bytes"].mean() / 1e6,
            "trainable params": g["trainable_params"].first(),
            "planned budget params": g["planned_budget_params"].first(),
            "budget params": g["budget_params"].mean(), "budget params min": g["budget_params"].min(),
            "budget params max": g["budget_params"].max(),
            "base model MB": g["base_storage_bytes"].first() / 1e6})
        table.index = [LABELS.get(m, m) for m in table.index]
        table.index.name = "method"
        return table

    def table(self) -> pd.DataFrame:
        """The summary with "mean ± std" strings: the form of the chapter's results table."""
        s = self.summary()
        out = pd.DataFrame(index=s.index)
        out["validation acc. (%)"] = [f"{m:.1f} ± {d:.1f}" for m, d in zip(s["val acc mean (%)"], s["val acc std"])]
        out["held-out test acc. (%)"] = [f"{m:.1f} ± {d:.1f}"
                                         for m, d in zip(s["test acc mean (%)"], s["test acc std"])]
        out["steps to target"] = [("–" if np.isnan(v) else f"{v:.0f}") + f" ({r})"
                                  for v, r in zip(s["steps to target"], s["reached target"])]
        out["ms / step"] = s["ms per step"].map("{:.0f}".format)
        out["peak memory (MB)"] = s["peak MB"].map("{:.1f}".format)
        out["trainable params"] = s["trainable params"].map("{:,}".format)
        out["planned budget"] = s["planned budget params"].map("{:,}".format)
        out["final budget"] = [f"{low:,}" if low == high else f"{low:,}-{high:,}"
                               for low, high in zip(s["budget params min"], s["budget params max"])]
        out["base model (MB)"] = s["base model MB"].map("{:.1f}".format)
        return out


def plot_accuracy_vs_memory(results: BenchResults, ax=None):
    """Mean held-out accuracy (± std over seeds) against the measured peak memory of a training step."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 4.2))[1]
    s = results.summary()
    for name, row in s.iterrows():
        ax.errorbar(row["peak MB"], row["test acc mean (%)"], yerr=row["test acc std"], fmt="o", capsize=4,
                    label=name)
    ax.set(xscale="log", xlabel="peak memory of a training step (MB, log scale)",
           ylabel="held-out test accuracy (%)", title="Accuracy vs memory (mean ± std over seeds)")
    ax.legend(fontsize=8)
    return ax


def plot_learning_curves(results: BenchResults, ax=None, target: float | None = None):
    """Validation accuracy during training: mean over seeds, shaded min-max band."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 4.2))[1]
    for method in results.methods:
        c = results.curves[results.curves["method"] == method].groupby("step")["val_accuracy"]
        mean, low, high = 100 * c.mean(), 100 * c.min(), 100 * c.max()
        ax.plot(mean.index, mean.values, marker=".", label=LABELS.get(method, method))
        ax.fill_between(mean.index, low.values, high.values, alpha=0.15)
    if target is not None:
        ax.axhline(100 * target, color="black", linestyle=":", label=f"target {100 * target:.0f}%")
    ax.set(xlabel="optimizer step", ylabel="validation accuracy (%)",
           title="Learning curves (mean over seeds, band = min to max)")
    ax.legend(fontsize=8)
    return ax


def plot_rank_heatmaps(results: BenchResults, init_r: int, seed: str | int | None = None):
    """Final AdaLoRA rank of every matrix (layers x matrix types), one panel per AdaLoRA method;
    ``seed`` defaults to the first seed stored."""
    import matplotlib.pyplot as plt

    from ..adalora import rank_grid

    methods = [m for m in results.methods if m in results.ranks]
    if not methods:
        raise ValueError("these results have no AdaLoRA runs, so there are no ranks to plot")
    stored = list(results.ranks[methods[0]])
    seed = stored[0] if seed is None else str(seed)
    if any(seed not in results.ranks[m] for m in methods):
        raise ValueError(f"no ranks stored for seed {seed!r}; stored seeds: {stored}")
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        grid = rank_grid(results.ranks[method][str(seed)]).T  # rows: matrix types, columns: layers
        image = ax.imshow(grid.values, cmap="YlGn", vmin=0, vmax=init_r)
        for (i, j), r in np.ndenumerate(grid.values):
            ax.text(j, i, int(r), ha="center", va="center", fontsize=8)
        ax.set(xticks=range(grid.shape[1]), xticklabels=[str(c + 1) for c in grid.columns], yticks=range(len(grid)),
               yticklabels=grid.index, xlabel="layer", ylabel="weight matrix",
               title=f"{LABELS.get(method, method)}, seed {seed}")
        fig.colorbar(image, ax=ax, label="final rank")
    fig.suptitle(f"Where AdaLoRA put its budget (init_r = {init_r})")
    fig.tight_layout()
    return fig
