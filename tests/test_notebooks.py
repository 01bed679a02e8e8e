"""The walkthrough notebooks (``notebooks/*.ipynb``) run top to bottom in a fresh kernel.

Each notebook is executed with nbclient in shrunk mode (``JAXDIFF_NOTEBOOK_FAST=1``), in a
kernel started from *this* interpreter (a kernelspec written to a temporary folder, so a
``python3`` kernelspec installed elsewhere on the machine cannot hijack the run), with a clean
environment: one CPU device (the test session's simulated-devices ``XLA_FLAGS`` are dropped) and
runs written under the test's ``tmp_path``. A failing cell is reported with the notebook, the
cell number and its source.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 300
KERNEL_NAME = "jaxdiff-test-python"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _kernel_env(runs_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest simulates 8 devices for the tests; notebooks see 1
    env.pop("PYTEST_CURRENT_TEST", None)
    env.pop("MPLBACKEND", None)  # ipykernel's inline backend
    env.update(
        JAXDIFF_NOTEBOOK_FAST="1",
        JAXDIFF_NOTEBOOK_RUNS=str(runs_dir),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
        PYDEVD_DISABLE_FILE_VALIDATION="1",
        TQDM_DISABLE="1",
    )
    return env


def _kernel_manager(kernels_dir: Path):
    """A KernelManager whose only kernel runs ``sys.executable -m ipykernel_launcher``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = kernels_dir / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "jaxdiff test kernel",
                "language": "python",
            }
        )
    )
    ksm = KernelSpecManager(kernel_dirs=[str(kernels_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def test_every_notebook_is_here():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"], NOTEBOOKS


def test_notebooks_match_their_generator_and_have_no_outputs():
    result = subprocess.run(
        [sys.executable, str(NOTEBOOK_DIR / "build_notebooks.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs in git"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path):
    nb = nbformat.read(path, as_version=4)
    km = _kernel_manager(tmp_path / "kernels")
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # the kernel's working directory
    )
    start = time.perf_counter()
    try:
        client.execute(env=_kernel_env(tmp_path / "runs"))
    except nbclient.exceptions.CellExecutionError as e:
        index = next(
            (i for i, c in enumerate(nb.cells) if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.get("outputs", []))),
            "?",
        )
        pytest.fail(f"{path.name}, cell {index}:\n{_ANSI.sub('', str(e))}", pytrace=False)
    except nbclient.exceptions.CellTimeoutError as e:
        pytest.fail(f"{path.name}: a cell ran longer than {CELL_TIMEOUT_S} s:\n{e}", pytrace=False)
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.1f} s")
    # Every code cell ran, in order, and the last one reported the notebook's run time.
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code_cells] == list(range(1, len(code_cells) + 1))
    last_text = "".join(o.get("text", "") for o in code_cells[-1].outputs)
    assert "notebook ran in" in last_text and "FAST=True" in last_text, last_text
