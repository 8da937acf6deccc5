"""The example notebooks run from top to bottom without an error, in their fast TINY mode.

Each notebook is executed with nbclient in a kernel started from this interpreter
(``sys.executable``): a kernelspec naming it is written to a temporary folder put first on
``JUPYTER_PATH``, so a ``python3`` kernelspec from another environment is never used. The
kernel gets ``MCU_NOTEBOOK_TINY=1`` and runs in a temporary working directory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("01_quickstart.ipynb", "02_curve_shapes.ipynb")
KERNEL_NAME = "mcu-jax-tests"
HINT = "is not installed; pip install -e '.[dev]' to run the notebook tests"


def _load(name: str):
    nbformat = pytest.importorskip("nbformat", reason=f"nbformat {HINT}")
    path = NOTEBOOK_DIR / name
    assert path.is_file(), f"missing notebook {path}"
    return nbformat.read(path, as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
    nb = _load(name)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: cell {i} has outputs; strip them before committing"
            assert cell.execution_count is None, f"{name}: cell {i} has an execution count"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_reads_the_tiny_switch(name):
    nb = _load(name)
    first_code = next(cell.source for cell in nb.cells if cell.cell_type == "code")
    assert 'os.environ.get("MCU_NOTEBOOK_TINY") == "1"' in first_code


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernelspec running this interpreter, found first through JUPYTER_PATH."""
    pytest.importorskip("nbclient", reason=f"nbclient {HINT}")
    pytest.importorskip("ipykernel", reason=f"ipykernel {HINT}")
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "mcu-jax tests",
                "language": "python",
            }
        )
    )
    patch = pytest.MonkeyPatch()
    paths = [str(root), *filter(None, [os.environ.get("JUPYTER_PATH")])]
    patch.setenv("JUPYTER_PATH", os.pathsep.join(paths))
    patch.setenv("MCU_NOTEBOOK_TINY", "1")
    yield KERNEL_NAME
    patch.undo()


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, kernel_name, tmp_path):
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell

    nb = _load(name)
    # A last cell reports the kernel's interpreter, to check it is this one.
    nb.cells.append(new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.getcwd())"))
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            errors = [o for o in cell.outputs if o.output_type == "error"]
            assert not errors, f"{name}: cell {i} raised {errors[0].ename}: {errors[0].evalue}"
    first_code = next(cell for cell in nb.cells if cell.cell_type == "code")
    assert "TINY=True" in "".join(o.get("text", "") for o in first_code.outputs)
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs).split("\n")
    assert printed[0] == sys.executable, f"the kernel ran {printed[0]!r}, not {sys.executable!r}"
    assert Path(printed[1]).resolve() == tmp_path.resolve()
