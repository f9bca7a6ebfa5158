"""Busy machines: every way the course runs starts PyTorch with sleeping, not spinning, OpenMP threads.

The cause of the slowdown (``benchmarks/bench_busy.py`` measures it) is GNU OpenMP's spin-waiting, which
a short ``GOMP_SPINCOUNT`` (3000) cuts short. libgomp reads it once, when torch loads, so each run path must
set it before that: ``import companion`` (a reader's own Jupyter), the kernel spec that papermill and the
book build start (installed by the Makefile), and the Makefile's own environment.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          check=True)


def test_import_companion_before_torch_sets_a_short_spin_count():
    out = _python("import os, companion, torch; print(os.environ['GOMP_SPINCOUNT'])")
    assert out.stdout.strip() == "3000"
    assert "RuntimeWarning" not in out.stderr


def test_import_companion_keeps_a_wait_policy_or_spin_count_the_user_set():
    out = _python("import os, companion; print(os.environ['OMP_WAIT_POLICY'], os.environ.get('GOMP_SPINCOUNT'))",
                  OMP_WAIT_POLICY="PASSIVE")
    assert out.stdout.split() == ["PASSIVE", "None"]
    out = _python("import os, companion; print(os.environ['GOMP_SPINCOUNT'])", GOMP_SPINCOUNT="100")
    assert out.stdout.strip() == "100"


def test_import_companion_after_torch_warns_how_to_fix_it():
    out = _python("import torch, companion")
    assert "imported before companion" in out.stderr and "GOMP_SPINCOUNT=3000" in out.stderr


def test_makefile_sets_the_spin_count_for_tests_notebooks_and_the_kernel_it_installs():
    makefile = (ROOT / "Makefile").read_text()
    offline = next(line for line in makefile.splitlines() if line.startswith("OFFLINE :="))
    assert "GOMP_SPINCOUNT=3000" in offline
    assert "ipykernel install --sys-prefix --name python3 --env GOMP_SPINCOUNT 3000" in makefile


def test_the_kernel_papermill_and_the_book_start_has_the_short_spin_count():
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.env.get("GOMP_SPINCOUNT") == "3000", (
        f"kernel spec {spec.resource_dir} lacks GOMP_SPINCOUNT=3000: run `make` (it installs the kernel with "
        "--env GOMP_SPINCOUNT 3000)")


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts),
                         ids=lambda p: str(p.relative_to(ROOT / "notebooks")))
def test_notebook_imports_companion_before_torch(path):
    """A reader's own Jupyter has no kernel-spec setting: the notebook's first code cell imports companion."""
    nb = json.loads(path.read_text())
    first = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    lines = [line.strip() for line in first.splitlines()]
    at = [i for i, line in enumerate(lines) if line.split("#")[0].strip() == "import companion"]
    assert at, f"{path.name}: the first code cell must `import companion` (before anything imports torch)"
    torch_lines = [i for i, line in enumerate(lines) if line.startswith(("import torch", "from torch"))]
    assert not torch_lines or at[0] < torch_lines[0]
