"""The tutorial notebooks in notebooks/ run top to bottom on the default model, and are stored
without outputs (so that their diffs show code and prose, not numbers and images)."""

import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

# Appended to the in-memory copy of each notebook: which Python the kernel ran.
WHICH_PYTHON = "import sys; print(sys.prefix)"


@pytest.fixture(scope="module")
def this_python_kernel(tmp_path_factory):
    """Make the kernel named "python3" run this interpreter, whatever else is installed.

    nbclient starts the kernel its kernelspec names. The venv's own spec says `python -m
    ipykernel_launcher`, and jupyter_client swaps a bare `python` for sys.executable, so an
    activated or not activated venv both work. But a spec of the same name found first on the
    Jupyter path (~/.local/share/jupyter/kernels/python3 from another install, naming another
    Python by its full path) would win, and the notebooks would run without llava_core or with
    another torch. So ipykernel writes a spec naming sys.executable into a temp folder, and
    JUPYTER_PATH, searched before every other place, points there for this module's tests. Each
    run checks the kernel's sys.prefix (below), so a wrong kernel fails loudly.
    """
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("kernelspec")
    install(kernel_name="python3", prefix=str(prefix))  # -> prefix/share/jupyter/kernels/python3
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        yield


def test_the_notebooks_are_there():
    assert len(NOTEBOOKS) >= 5, f"expected the five tutorial notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, this_python_kernel, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # the kernel inherits TMPDIR: the notebook's output folder (tempfile.mkdtemp) goes under
    # pytest's tmp_path, which pytest prunes, not into /tmp for good (~11 MB a run for 05)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(path, as_version=4)  # an in-memory copy: outputs never go back to the file
    nb.cells.append(nbformat.v4.new_code_cell(WHICH_PYTHON))
    # per cell: 05's ablation cell takes minutes; beside a CI run one run here failed, likely at 300 s
    client = NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})  # cwd: notebooks/
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    assert printed.strip() == sys.prefix, f"the kernel ran {printed.strip()!r}, not this venv ({sys.prefix})"
    assert list(tmp_path.glob(f"llava_nb{path.stem[:2]}_*")), f"{path.name} made no output folder under TMPDIR"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs or execution counts; clear them before "
                       "committing (in Jupyter: Edit > Clear Outputs of All Cells)")
