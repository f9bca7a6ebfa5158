"""Every notebook follows the course's notebook contract.

1. The first cell is Markdown with a title, what the reader will see, the `ci` time and a
   Colab badge; the notebook is committed without outputs.
2. Exactly one code cell is tagged `parameters`; it sets `PROFILE = "ci"`.
3. The next code cell calls `setup_profile(PROFILE, ...)`, so a `gpu` run on a machine
   without CUDA stops there, before any model is loaded. The last test proves that by
   executing every notebook with papermill and `PROFILE="gpu"` on this CPU-only machine.
"""

from pathlib import Path

import nbformat
import pytest
import torch

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("ch*.ipynb"))


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_title_time_and_colab_badge_and_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert "ci" in first.source and "minute" in first.source.lower()
    assert f"colab.research.google.com/github/" in first.source and path.name in first.source
    assert all(not c.outputs and c.execution_count is None for c in code_cells(nb)), \
        "commit notebooks without outputs; the book build executes them"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.metadata["language_info"].get("pygments_lexer") == "ipython3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_parameters_cell_defaults_to_ci_and_the_next_cell_sets_up_the_profile(path):
    cells = code_cells(nbformat.read(path, as_version=4))
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    params = cells[tagged[0]].source
    assert 'PROFILE = "ci"' in params
    assert "setup_profile(PROFILE" in cells[tagged[0] + 1].source


@pytest.fixture(scope="module")
def kernel():
    """One python3 kernel for every notebook below (a kernel and its imports per notebook cost ~12 s each)."""
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", cwd=str(NOTEBOOKS[0].parent))
    yield client
    client.stop_channels()
    manager.shutdown_kernel(now=True)


def run_in(kernel, source: str) -> dict:
    """Execute ``source`` as one cell; the reply's content (``status``, and ``evalue`` on an error)."""
    return kernel.execute_interactive(source, timeout=300, output_hook=lambda msg: None)["content"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_gpu_profile_without_cuda_stops_in_the_setup_cell(path, kernel):
    """As papermill runs it with ``PROFILE="gpu"``: the cells up to the parameters run, the next one stops."""
    assert not torch.cuda.is_available(), "this test describes a CPU-only machine"
    cells = code_cells(nbformat.read(path, as_version=4))
    params = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    for cell in cells[:params + 1]:
        assert run_in(kernel, cell.source)["status"] == "ok", cell.source[:80]
    assert run_in(kernel, 'PROFILE = "gpu"')["status"] == "ok"  # papermill's injected cell
    reply = run_in(kernel, cells[params + 1].source)
    assert reply["status"] == "error" and "needs a CUDA GPU" in reply["evalue"], reply.get("evalue")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_sees_every_name_the_parameters_cell_assigns(path):
    """papermill drops a line it cannot parse (a tuple assignment, a comment holding ``=`` or ``:``),
    then warns "Passed unknown parameter" when a reader sets that name: the cell must parse whole."""
    import ast

    import papermill

    cells = code_cells(nbformat.read(path, as_version=4))
    params = next(c.source for c in cells if "parameters" in c.metadata.get("tags", []))
    assigned = [node.targets[0].id for node in ast.parse(params).body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)]
    assert len(assigned) == len(ast.parse(params).body), "one `NAME = value  # comment` per line"
    assert list(papermill.inspect_notebook(str(path))) == assigned


LOCK = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"
COLAB_PINNED = ("transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets", "sentencepiece", "protobuf")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_install_cell_pins_the_versions_ci_tests_and_is_valid_ipython(path):
    """Colab images move on; the install cell pins the libraries whose APIs the notebooks call to the lock."""
    import ast
    import re

    from IPython.core.inputtransformer2 import TransformerManager

    lock = dict(line.split("==") for line in LOCK.read_text().splitlines() if "==" in line and not line.startswith("#"))
    install = code_cells(nbformat.read(path, as_version=4))[0].source
    pins = dict(re.findall(r"\b([a-z][a-z0-9_-]*)==([0-9][^\s\"]*)", install))
    assert {name: pins.get(name) for name in COLAB_PINNED} == {name: lock[name] for name in COLAB_PINNED}
    assert "torch==" not in install, "Colab's CUDA build of torch stays"
    ast.parse(TransformerManager().transform_cell(install))
