"""Every notebook in notebooks/ runs top to bottom in a fresh kernel; results.ipynb reads the demo's results.json
and ablation.json through ibkit.shapes.report; ibkit.shapes.plotting reads loss curves and draws the old figure."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

from ibkit.shapes.plotting import check_curves, read_loss_curve, running_mean

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _prepend(path: Path, variable: str) -> str:
    return os.pathsep.join([str(path), *filter(None, os.environ.get(variable, "").split(os.pathsep))])


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A ``python3`` kernelspec that runs THIS interpreter, found first through JUPYTER_PATH, and ibkit importable."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", _prepend(tmp_path / "jupyter", "JUPYTER_PATH"))
    monkeypatch.setenv("PYTHONPATH", _prepend(REPO / "src", "PYTHONPATH"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: a second thread only waits on a busy CPU
    work = tmp_path / "work"
    work.mkdir()
    return work


def parameters_cell(nb) -> int:
    tagged = [
        i for i, cell in enumerate(nb.cells) if "parameters" in cell.get("metadata", {}).get("tags", [])
    ]
    assert len(tagged) == 1, "a notebook needs exactly one code cell tagged 'parameters'"
    return tagged[0]


def run_notebook(path: Path, cwd: Path, parameters: dict | None = None):
    """Execute ``path`` in ``cwd`` with ``parameters`` assigned right after its parameters cell (papermill style)."""
    nb = nbformat.read(path, as_version=4)
    if parameters:
        index = parameters_cell(nb)
        declared = nb.cells[index].source
        for name in parameters:
            assert f"\n{name} = " in f"\n{declared}", f"{path.name}: parameters cell has no {name}"
        source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
        injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
        nb.cells.insert(index + 1, injected)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    return nb


def text_output(nb) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output["text"])
            elif "data" in output and "text/plain" in output["data"]:
                parts.append(output["data"]["text/plain"])
    return "".join(parts)


# ----------------------------------------------------------------------------------------------- notebooks


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "results.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_saved_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), (
        "clear outputs before saving"
    )
    assert any(cell.cell_type == "markdown" for cell in nb.cells)
    parameters_cell(nb)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_env):
    """Defaults, run from an empty folder: quickstart builds a small model, results falls back to its example."""
    nb = run_notebook(path, kernel_env)
    text = text_output(nb)
    if path.stem == "quickstart":
        assert sum(line.startswith("A: ") for line in text.splitlines()) == 3  # one answer per question
        assert "dropped" in text and "nothing saved" in text  # the BLIP-2 cell passed its assertions
    if path.stem == "results":
        assert "MADE-UP EXAMPLE" in text
        assert (kernel_env / "outputs/demo/results.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.slow
def test_quickstart_saves_a_model_that_loads_back_through_model_path(kernel_env):
    """SAVE_PATH then MODEL_PATH: the loaded model and processor give the same answers and features."""
    saved = kernel_env / "model"
    first = text_output(
        run_notebook(REPO / "notebooks" / "quickstart.ipynb", kernel_env, {"SAVE_PATH": str(saved)})
    )
    assert (saved / "config.json").is_file() and (saved / "qformer_tokenizer").is_dir()
    second = text_output(
        run_notebook(
            REPO / "notebooks" / "quickstart.ipynb",
            kernel_env,
            {"MODEL_PATH": str(saved), "WORK_DIR": str(kernel_env / "unused")},
        )
    )
    assert not (kernel_env / "unused").exists()  # loading builds nothing

    def answers_and_similarities(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith(("A: ", "What ", "How ", "Is "))]

    assert len(answers_and_similarities(first)) == 3 + 2 * 3  # three answers, two 3x3 similarity matrices
    assert answers_and_similarities(first) == answers_and_similarities(second)


def _write_csvlogger(save_dir: Path, name: str, losses: list[float]) -> Path:
    """Write metrics.csv with Lightning's own CSVLogger, validation rows interleaved (no train/loss there)."""
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=save_dir, name=name)
    for step, loss in enumerate(losses):
        logger.log_metrics({"train/loss": loss, "train/lr": 1e-4}, step=step)
        if step % 2 == 1:
            logger.log_metrics({"val/loss": loss + 1.0}, step=step)
    logger.save()
    return Path(logger.log_dir) / "metrics.csv"


def test_results_notebook_reads_demo_outputs(kernel_env):
    """The pipeline demo's results.json; each step's curve from its folder beside it (or CURVES)."""
    from test_report import RESULTS

    demo = kernel_env / "demo"
    demo.mkdir()
    (demo / "results.json").write_text(json.dumps(RESULTS))
    _write_csvlogger(demo, "encoder", [3.0, 2.5, 2.0, 1.7, 1.5])
    lm_csv = _write_csvlogger(kernel_env / "elsewhere", "lm", [1.4, 1.2, 1.1])
    out_png = kernel_env / "figure" / "demo.png"
    nb = run_notebook(
        REPO / "notebooks" / "results.ipynb",
        kernel_env,
        {"RESULTS_JSON": str(demo / "results.json"), "OUT_PNG": str(out_png)},
    )
    text = text_output(nb)
    assert "MADE-UP EXAMPLE curve" in text  # lm's folder is not beside results.json
    assert "encoder: 5 training steps" in text
    assert "| shapes_vsr | accuracy | 400 | 0.500 | 0.520 ± 0.030 | 0.700 ± 0.020 | yes |" in text
    assert "| color | 250 | 0.500 ± 0.010 | 0.950 ± 0.010 |" in text
    assert "make ablation): no ablation shown" in text
    assert out_png.read_bytes().startswith(PNG_SIGNATURE)
    text = text_output(run_notebook(
        REPO / "notebooks" / "results.ipynb", kernel_env,
        {"RESULTS_JSON": str(demo / "results.json"), "OUT_PNG": str(out_png),
         "CURVES": {"encoder": str(demo / "encoder"), "lm": str(lm_csv)}},  # a folder and a file
    ))
    assert "MADE-UP" not in text and "lm: 3 training steps" in text


# ------------------------------------------------------------------------------------------------ plotting


def test_read_loss_curve_returns_the_logged_training_losses(tmp_path):
    losses = [2.0, 1.5, 1.25, 1.0]
    csv_file = _write_csvlogger(tmp_path, "run", losses)
    expected = list(enumerate(losses))
    assert read_loss_curve(csv_file) == expected
    assert read_loss_curve(tmp_path / "run") == expected  # the folder: newest version_N/metrics.csv
    assert read_loss_curve(csv_file, column="val/loss") == [(1, 2.5), (3, 2.0)]


def test_running_mean_smooths_alternating_task_losses():
    losses = [4.0, 0.5, 4.0, 0.5, 4.0, 0.5]  # a caption batch, then a one-word answer batch, ...
    smooth = running_mean(losses, 2)
    assert smooth == [4.0, 2.25, 2.25, 2.25, 2.25, 2.25]
    assert running_mean(losses, 4)[:4] == [4.0, 2.25, 8.5 / 3, 2.25]
    assert running_mean(losses, 1) == losses
    with pytest.raises(ValueError, match="window must be positive"):
        running_mean(losses, 0)


def test_read_loss_curve_names_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_loss_curve(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        read_loss_curve(tmp_path)
    bad = tmp_path / "metrics.csv"
    bad.write_text("step,loss\n0,1.0\n")
    with pytest.raises(ValueError, match=r"metrics\.csv: no 'train/loss' column \(columns: step, loss\)"):
        read_loss_curve(bad)
    bad.write_text("step,train/loss\n0,1.0\n1,oops\n")
    with pytest.raises(ValueError, match=r"metrics\.csv line 3"):
        read_loss_curve(bad)


def test_bad_curves_name_the_step_and_the_point():
    check_curves({"encoder": [(0, 1.0), (10, 0.5)], "lm": []})
    with pytest.raises(ValueError, match=r"curves\['stage1'\]\[0\]"):
        check_curves({"stage1": [(0, "x")]})


def test_results_notebook_adds_the_ablation_file(kernel_env):
    """``make ablation`` writes ablation.json apart from the demo's results.json; the notebook shows both."""
    from test_report import ABLATION

    (kernel_env / "ablation.json").write_text(json.dumps(ABLATION))
    png = kernel_env / "abl" / "ablation.png"
    nb = run_notebook(
        REPO / "notebooks" / "results.ipynb",
        kernel_env,
        {"ABLATION_JSON": str(kernel_env / "ablation.json"), "ABLATION_PNG": str(png),
         "OUT_PNG": str(kernel_env / "demo.png")},
    )
    text = text_output(nb)
    assert "seeds [0, 1, 2]" in text and "MADE-UP EXAMPLE numbers" in text  # no results.json here
    assert "| shapes_vsr | accuracy | 0.500 | 0.620 ± 0.020 (0.600-0.640) |" in text
    assert png.read_bytes().startswith(PNG_SIGNATURE)
