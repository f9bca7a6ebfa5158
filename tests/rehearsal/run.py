"""Rehearse the notebooks' gpu profile on this CPU: nbval runs each gpu branch cell by cell.

    python -m tests.rehearsal.run                      # every notebook on a pretend T4 (float16),
                                                       # and the notebooks in BF16_TOO on an RTX card too
    python -m tests.rehearsal.run --dtype bfloat16 notebooks/ch05_qlora_finetune.ipynb

For each notebook and card: papermill injects ``PROFILE = "gpu"`` and the step cuts of :data:`CUTS` into a
copy under ``_build/rehearsal/<env>/<dtype>/``; nbval executes the copy in a kernel whose spec (written under
``_build/rehearsal/<env>/kernels``, found through ``JUPYTER_PATH``) starts :mod:`tests.rehearsal.launch`:
stand-in hub checkpoints (:mod:`tests.rehearsal.hub`), stand-in ``load_dataset`` (:mod:`tests.rehearsal.data`),
the card's compute dtype, and a non-finite-loss trap. pytest reports pass/fail per cell; any failing cell
fails the run. Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# one folder per Python environment (.venv, .venv-floor): stand-ins built by that environment's transformers,
# its kernel specs and parameterized copies, so two environments can rehearse at the same time
OUT = ROOT / "_build" / "rehearsal" / hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]

# Step cuts through the parameters cell (item 2d of the rehearsal): the gpu branch with a few steps.
CUTS = {
    "ch01_lora_gradients": {"MAX_STEPS": 3, "BATCH_SIZE": 4},
    "ch01_memory_wall": {"SEQ_LEN": 64},
    "ch02_adalora_theory": {"MAX_STEPS": 80, "BATCH_SIZE": 4},  # deltaT is 50 in gpu: two allocation steps
    "ch03_adalora_ablation": {"MAX_STEPS": 12, "BATCH_SIZE": 4, "SEEDS": [0]},
    "ch03_adalora_practice": {"MAX_STEPS": 80, "BATCH_SIZE": 4},  # deltaT is 50 in gpu: allocation steps happen
    "ch04_nf4_double_quant": {"N_GAUSSIAN": 2**14, "N_SENTENCES": 16},
    "ch04_paged_optimizers": {"STEPS": 2},
    "ch05_qlora_finetune": {"QLORA_STEPS": 34, "BATCH_SIZE": 4},  # warm-up ceil(0.03 x 34) = 2 steps; a 10-step log
    "ch05_qlora_setup": {"CLS_STEPS": 3},
    "ch06_comparison": {"SEEDS": [0], "MAX_STEPS": 12},
    "ch07_selection": {"STEPS": 3, "PISSA_SEEDS": [0]},
}
# Notebooks whose gpu numerics depend on the card (fp16 scaler vs bf16, precision-specific branches).
BF16_TOO = ("ch05_qlora_finetune", "ch06_comparison", "ch03_adalora_practice")
DTYPES = ("float16", "bfloat16")


def kernels_dir() -> Path:
    """Kernel specs of this Python environment, found through ``JUPYTER_PATH``."""
    return OUT / "kernels"


def kernel_spec(dtype: str, hub: Path) -> str:
    """Write the kernel spec of the pretend card and return its name."""
    name = f"rehearsal-{dtype}"
    folder = kernels_dir() / "kernels" / name
    folder.mkdir(parents=True, exist_ok=True)
    env = {"REHEARSAL_DTYPE": dtype, "REHEARSAL_CWD": str(ROOT / "notebooks"), "HF_HUB_CACHE": str(hub),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "3000"),
           "MPLBACKEND": "Agg"}
    argv = [sys.executable, "-m", "tests.rehearsal.launch", "-f", "{connection_file}"]
    (folder / "kernel.json").write_text(json.dumps(
        {"argv": argv, "env": env, "display_name": f"rehearsal {dtype}", "language": "python"}, indent=1))
    return name


def parameterized_copy(notebook: Path, dtype: str) -> Path:
    """The notebook with ``PROFILE="gpu"`` and its cuts injected, NBVAL output checks dropped."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = load_notebook_node(str(notebook))  # papermill's reader: every cell gets a tags list
    params = {"PROFILE": "gpu", **CUTS.get(notebook.stem, {})}
    nb = parameterize_notebook(nb, params, report_mode=False)
    for cell in nb.cells:  # nbval-lax compares marked cells with stored outputs: a rehearsal has none
        if cell.cell_type == "code":
            cell.source = cell.source.replace("# NBVAL_CHECK_OUTPUT", "")
    target = OUT / dtype / notebook.name
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(target))
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--dtype", choices=DTYPES + ("both",), default="both",
                        help="float16 (T4), bfloat16 (RTX); both: T4 for all, RTX for BF16_TOO")
    parser.add_argument("--cell-timeout", type=int, default=900)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.rehearsal.hub import build_hub_cache

    notebooks = [p.resolve() for p in args.notebooks] or sorted((ROOT / "notebooks").glob("ch*.ipynb"))
    hub = build_hub_cache(OUT / "standins")
    runs = []
    for dtype in DTYPES:
        if args.dtype not in (dtype, "both"):
            continue
        chosen = [nb for nb in notebooks if args.dtype == dtype or dtype == "float16" or nb.stem in BF16_TOO]
        if chosen:
            runs.append((kernel_spec(dtype, hub), [parameterized_copy(nb, dtype) for nb in chosen]))
    env = {**os.environ, "JUPYTER_PATH": str(kernels_dir()), "PYTHONPATH": str(ROOT)}
    status = 0
    for kernel, copies in runs:
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--nbval-lax",
               f"--nbval-kernel-name={kernel}", f"--nbval-cell-timeout={args.cell_timeout}",
               "--rootdir", str(OUT), "-o", "addopts=", "-q", "--durations=8", *map(str, copies)]
        print("rehearsal:", kernel, len(copies), "notebooks", flush=True)
        status = subprocess.call(cmd, cwd=OUT, env=env) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
