"""The papermill runner: a real run of notebook 00, parameter handling, failure and manifest."""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pandas as pd
import pytest

from lrsafety import runner
from lrsafety.languages import POLYREFUSE_LANGUAGES


def _notebook(path, parameters: str, body: str) -> None:
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    notebook.cells = [cell, nbformat.v4.new_code_cell(body)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


@pytest.fixture(scope="module")
def data_run(tmp_path_factory, polyrefuse_source):
    """Run notebook 00 through the command line exactly as a user would."""
    out = tmp_path_factory.mktemp("runs") / "tiny-qwen2"
    data_dir = tmp_path_factory.mktemp("data")
    command = [
        sys.executable, "-m", "lrsafety.cli", "run", "--model", "tiny-qwen2", "--out", str(out),
        "--notebooks", "00", "-p", f"data_dir={data_dir}", "-p", f"polyrefuse_source={polyrefuse_source}",
        "--no-progress",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out


def test_run_writes_executed_notebook(data_run):
    executed = nbformat.read(data_run / "00_data.ipynb", as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1


def test_run_data_counts_match_release(data_run):
    counts = pd.read_csv(data_run / "tables" / "data_counts.csv")
    assert sorted(counts["language"].unique()) == sorted(POLYREFUSE_LANGUAGES)
    assert (counts["n"] == counts["expected"]).all()
    check = pd.read_csv(data_run / "tables" / "language_check.csv").set_index("language")
    assert (check.drop("en")["share_same_as_english"] < 0.05).all()
    assert (data_run / "figures" / "data_counts.png").is_file()
    assert (data_run / "figures" / "data_counts.svg").is_file()


def test_run_manifest_records_provenance(data_run):
    manifest = json.loads((data_run / "manifest.json").read_text())
    assert manifest["status"] == "ok"
    assert manifest["model"] == "tiny-qwen2"
    assert manifest["packages"]["nnsight"]
    assert manifest["packages"]["torch"]
    assert "commit" in manifest["git"]
    assert manifest["started"] <= manifest["finished"]
    notebook = manifest["notebooks"][0]
    assert notebook["notebook"] == "00_data.ipynb"
    assert notebook["status"] == "ok"
    assert manifest["seeds"] == {"00_data.ipynb": "0"}
    model = json.loads((data_run / "model.json").read_text())
    assert model["is_standin"] is True
    assert model["n_layers"] == 4


def test_failing_notebook_stops_run(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "00_first.ipynb", "model = 'x'\nout_dir = '.'", "print('first ran')")
    _notebook(folder / "01_broken.ipynb", "model = 'x'\nout_dir = '.'", "raise ValueError('deliberate failure 42')")
    _notebook(folder / "02_never.ipynb", "model = 'x'\nout_dir = '.'", "open('never-ran', 'w')")
    out = tmp_path / "run"
    with pytest.raises(runner.RunError, match=r"01_broken.ipynb failed .*ValueError: deliberate failure 42"):
        runner.run_notebooks("tiny-llama", out, folder=folder, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert [n["status"] for n in manifest["notebooks"]] == ["ok", "failed"]
    assert not (out / "02_never.ipynb").exists()


def test_cli_reports_failure_exit_code(tmp_path, capsys):
    from lrsafety.cli import main

    code = main(["run", "--model", "tiny-llama", "--notebooks", "99", "--out", str(tmp_path / "r")])
    assert code == 1
    assert "no notebook with prefix 99" in capsys.readouterr().err


def test_parameters_are_typed():
    assert runner.parse_parameter("budget=4") == ("budget", 4)
    assert runner.parse_parameter("remote=true") == ("remote", True)
    assert runner.parse_parameter("languages=[yo, th]") == ("languages", ["yo", "th"])
    assert runner.parse_parameter("completions_path=../x.jsonl.gz") == ("completions_path", "../x.jsonl.gz")


def test_token_counts_are_not_secrets():
    assert runner.parse_parameter("max_new_tokens=8") == ("max_new_tokens", 8)
    assert runner.parse_parameter("token_budget=4096") == ("token_budget", 4096)


@pytest.mark.parametrize("text", ["api_key=abc", "ndif_token=xyz", "JUDGE_API_KEY=1", "token=abc", "HF_TOKEN=x"])
def test_secret_parameters_rejected(text):
    with pytest.raises(runner.RunError, match="environment variables"):
        runner.parse_parameter(text)


def test_undeclared_parameter_rejected(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "00_only.ipynb", "model = 'x'\nout_dir = '.'", "pass")
    with pytest.raises(runner.RunError, match="typo_budget are not declared"):
        runner.plan_run("tiny-qwen2", tmp_path / "run", None, {"typo_budget": 3}, folder)


def test_standin_defaults_reach_declaring_notebooks(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "00_a.ipynb", "model = 'x'\nout_dir = '.'", "pass")
    _notebook(folder / "01_b.ipynb", "model = 'x'\nout_dir = '.'\nmax_new_tokens = 128", "pass")
    plans = runner.plan_run("tiny-gemma2", tmp_path / "run", None, {}, folder)
    assert "max_new_tokens" not in plans[0].parameters
    assert plans[1].parameters["max_new_tokens"] == 24
    real = runner.plan_run("gemma-2-9b-it", tmp_path / "run", None, {}, folder)
    assert "max_new_tokens" not in real[1].parameters


def test_remote_run_manifest_has_host_not_key(tmp_path, monkeypatch):
    sentinel = "sentinel-key-4f1d9c"
    monkeypatch.setenv("NDIF_API_KEY", sentinel)
    monkeypatch.setenv("NDIF_HOST", "https://ndif.example.invalid")
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "00_echo.ipynb", "model = 'x'\nout_dir = '.'\nremote = False", "print(model, remote)")
    out = runner.run_notebooks("llama-3.1-8b-instruct", tmp_path / "run", folder=folder,
                               parameters={"remote": True}, progress=False)
    manifest_text = (out / "manifest.json").read_text()
    manifest = json.loads(manifest_text)
    assert manifest["remote"]["mode"] == "ndif"
    assert manifest["remote"]["host"] == "https://ndif.example.invalid"
    assert manifest["remote"]["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert sentinel not in manifest_text
    assert sentinel not in (out / "00_echo.ipynb").read_text()


def test_unknown_model_fails_before_folder(tmp_path, capsys):
    from lrsafety.cli import main

    out = tmp_path / "never"
    assert main(["run", "--model", "nosuchmodel", "--notebooks", "00", "--out", str(out)]) == 1
    assert "neither a preset" in capsys.readouterr().err
    assert not out.exists()


def test_empty_notebook_selection_rejected(tmp_path, capsys):
    from lrsafety.cli import main

    assert main(["run", "--notebooks", "", "--out", str(tmp_path / "r")]) == 1
    assert "selects no notebook" in capsys.readouterr().err


def test_written_files_follow_umask(tmp_path):
    from lrsafety.runs import write_json

    path = write_json(tmp_path / "x.json", {"a": 1})
    assert path.stat().st_mode & 0o044 == 0o044
