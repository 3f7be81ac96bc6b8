"""``lrsafety run``: execute the numbered notebooks for one model with papermill.

The run folder receives the executed notebooks, ``tables/``, ``figures/``, ``model.json`` and a
``manifest.json`` (package versions, git revision, parameters, seeds, start and end times of
each notebook). The manifest is rewritten after every notebook, so an interrupted run keeps the
record of what finished. A failing notebook stops the run and its error is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import logging
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lrsafety import models
from lrsafety.runs import RunDir, project_root, write_json

logger = logging.getLogger("lrsafety")

# Parameter names that look like credentials. Papermill writes parameters into the executed
# notebook, so secrets must come from environment variables instead.
# "token" counts only as a whole name or suffix (hf_token), so max_new_tokens and token_budget pass.
_SECRET_NAME = re.compile(r"(api[_-]?key|secret|password|passwd|credential|(^|[_-])token$)", re.IGNORECASE)
_REPORTED_PACKAGES = (
    "lrsafety", "torch", "transformers", "nnsight", "tokenizers", "safetensors", "scikit-learn",
    "numpy", "pandas", "seaborn", "matplotlib", "papermill", "nbformat",
)


class RunError(RuntimeError):
    """A run could not start or a notebook failed."""


@dataclass(frozen=True)
class NotebookPlan:
    """One notebook of a run, with the parameters the runner passes to it."""

    prefix: str
    path: Path
    parameters: dict[str, Any]
    effective_parameters: dict[str, Any]


def notebooks_folder() -> Path:
    """Return the folder of the numbered notebooks (``notebooks/`` in the project root)."""
    return project_root(Path(__file__).resolve().parent) / "notebooks"


def discover_notebooks(folder: Path | None = None) -> dict[str, Path]:
    """Map each two-digit prefix (``00``, ``01``, ...) to its notebook, in paper order."""
    folder = folder or notebooks_folder()
    found = {}
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        found[path.name[:2]] = path
    if not found:
        raise RunError(f"no numbered notebooks (NN_name.ipynb) found in {folder}")
    return found


def parse_parameter(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as YAML, so numbers, booleans and lists keep their type."""
    if "=" not in text:
        raise RunError(f"parameter {text!r} must have the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key.isidentifier():
        raise RunError(f"parameter name {key!r} is not a valid Python identifier")
    if _SECRET_NAME.search(key):
        raise RunError(
            f"parameter {key!r} looks like a secret; papermill writes parameters into the executed "
            "notebooks, so pass keys through environment variables (NDIF_API_KEY, LRSAFETY_JUDGE_API_KEY)"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def plan_run(
    model: str,
    out_dir: Path,
    selection: list[str] | None,
    user_parameters: dict[str, Any],
    folder: Path | None = None,
) -> list[NotebookPlan]:
    """Choose the notebooks and the parameters each one declares; reject unknown parameters."""
    import papermill

    available = discover_notebooks(folder)
    prefixes = selection or list(available)
    unknown = [prefix for prefix in prefixes if prefix not in available]
    if unknown:
        raise RunError(f"no notebook with prefix {', '.join(unknown)}; available: {', '.join(available)}")

    offered = {"model": model, "out_dir": str(out_dir)}
    offered.update(models.default_parameters(model))
    offered.update(user_parameters)

    plans, declared_anywhere = [], set()
    for prefix in sorted(prefixes):
        path = available[prefix]
        declared = papermill.inspect_notebook(str(path))
        if not declared:
            raise RunError(f"{path.name} has no cell tagged 'parameters'")
        declared_anywhere |= set(declared)
        passed = {key: value for key, value in offered.items() if key in declared}
        # Defaults as written in the notebook (source text), overridden by what the runner passes.
        effective = {name: info["default"] for name, info in declared.items()}
        effective.update(passed)
        plans.append(NotebookPlan(prefix, path, passed, effective))

    unused = sorted(set(user_parameters) - declared_anywhere)
    if unused:
        raise RunError(f"parameter(s) {', '.join(unused)} are not declared by any selected notebook")
    return plans


def git_revision(root: Path) -> dict[str, Any]:
    """Return the commit and whether the work tree has uncommitted changes (None outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _REPORTED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_notebooks(
    model: str = models.DEFAULT_MODEL,
    out_dir: str | Path | None = None,
    selection: list[str] | None = None,
    parameters: dict[str, Any] | None = None,
    folder: Path | None = None,
    kernel_name: str = "python3",
    progress: bool = True,
) -> Path:
    """Execute the selected notebooks in order and return the run folder.

    Raises ``RunError`` naming the notebook, its failing cell and the error when a notebook fails.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    root = project_root(Path(__file__).resolve().parent)
    run_dir = RunDir(Path(out_dir) if out_dir else Path("runs") / model.replace("/", "--"))
    if not run_dir.path.is_absolute():
        run_dir = RunDir(Path.cwd() / run_dir.path)
    parameters = dict(parameters or {})
    plans = plan_run(model, run_dir.path, selection, parameters, folder)
    try:
        model_description = models.describe_model(model)
    except (ValueError, FileNotFoundError) as error:
        raise RunError(str(error)) from None
    run_dir.path.mkdir(parents=True, exist_ok=True)
    write_json(run_dir.path / "model.json", model_description)

    manifest: dict[str, Any] = {
        "model": model,
        "run_dir": str(run_dir.path),
        "command": _redacted_command(),
        "started": _now(),
        "finished": None,
        "status": "running",
        "git": git_revision(root),
        "packages": package_versions(),
        "platform": {"system": platform.platform(), "machine": platform.machine()},
        "parameters": parameters,
        "seeds": {
            plan.path.name: plan.effective_parameters["seed"] for plan in plans if "seed" in plan.effective_parameters
        },
        "notebooks": [],
    }
    if "remote" in parameters:
        from lrsafety.remote import normalize_remote, remote_description

        try:
            manifest["remote"] = remote_description(model_description, normalize_remote(parameters["remote"]))
        except ValueError as error:
            raise RunError(str(error)) from None
    previous = _read_previous_manifest(run_dir)
    if previous:
        manifest["previous_runs"] = previous
    write_json(run_dir.manifest_path, manifest)

    for plan in plans:
        output = run_dir.path / plan.path.name
        record = {
            "notebook": plan.path.name,
            "parameters": plan.parameters,
            "effective_parameters": plan.effective_parameters,
            "started": _now(),
            "status": "running",
        }
        manifest["notebooks"].append(record)
        write_json(run_dir.manifest_path, manifest)
        logger.info("Running %s for %s -> %s", plan.path.name, model, output)
        started = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(plan.path), str(output), parameters=plan.parameters, kernel_name=kernel_name,
                cwd=str(root), progress_bar=progress, log_output=False,
            )
        except PapermillExecutionError as error:
            record.update(status="failed", finished=_now(), seconds=round(time.perf_counter() - started, 1),
                          error=f"{error.ename}: {error.evalue}")
            manifest.update(status="failed", finished=_now())
            write_json(run_dir.manifest_path, manifest)
            raise RunError(
                f"{plan.path.name} failed in cell {error.exec_count}: {error.ename}: {error.evalue}\n"
                f"The executed notebook with the traceback is {output}"
            ) from None
        except BaseException:
            record.update(status="interrupted", finished=_now())
            manifest.update(status="interrupted", finished=_now())
            write_json(run_dir.manifest_path, manifest)
            raise
        record.update(status="ok", finished=_now(), seconds=round(time.perf_counter() - started, 1))
        write_json(run_dir.manifest_path, manifest)

    manifest.update(status="ok", finished=_now())
    write_json(run_dir.manifest_path, manifest)
    logger.info("Run finished: %s", run_dir.path)
    return run_dir.path


def _read_previous_manifest(run_dir: RunDir) -> list[dict[str, Any]]:
    import json

    if not run_dir.manifest_path.is_file():
        return []
    try:
        earlier = json.loads(run_dir.manifest_path.read_text())
    except json.JSONDecodeError:
        return []
    history = earlier.pop("previous_runs", [])
    summary = {key: earlier.get(key) for key in ("started", "finished", "status", "parameters")}
    summary["notebooks"] = [(entry.get("notebook"), entry.get("status")) for entry in earlier.get("notebooks", [])]
    return history + [summary]


def _redacted_command() -> list[str]:
    # Parameters never hold secrets (parse_parameter rejects such names), but a value could
    # still be pasted by mistake: keep the argument names and drop values that look like keys.
    words = []
    for word in sys.argv:
        name = word.split("=", 1)[0].lstrip("-")
        words.append("<redacted>" if _SECRET_NAME.search(name) else word)
    return words


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``lrsafety run``."""
    parser.add_argument("--model", default=models.DEFAULT_MODEL,
                        help=f"preset ({', '.join(models.PRESETS)}), Hub id or local folder (default: %(default)s)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<model>)")
    parser.add_argument("--notebooks", default=None,
                        help="comma-separated notebook prefixes to run, e.g. 00,02,03 (default: all, in order)")
    parser.add_argument("-p", "--parameter", action="append", default=[], metavar="KEY=VALUE",
                        help="notebook parameter; the value is parsed as YAML (repeatable)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide papermill's cell progress bar")
    parser.set_defaults(handler=_run_command)


def _run_command(arguments: argparse.Namespace) -> int:
    try:
        parameters = dict(parse_parameter(text) for text in arguments.parameter)
        selection = None
        if arguments.notebooks is not None:
            selection = [part.strip() for part in arguments.notebooks.split(",") if part.strip()]
            if not selection:
                raise RunError("--notebooks selects no notebook; give prefixes such as 00,02,03 or leave it out to run all")
        run_dir = run_notebooks(
            model=arguments.model, out_dir=arguments.out, selection=selection, parameters=parameters,
            kernel_name=arguments.kernel, progress=not arguments.no_progress,
        )
    except RunError as error:
        print(f"lrsafety run: {error}", file=sys.stderr)
        return 1
    print(f"Run folder: {run_dir}")
    return 0


__all__ = ["RunError", "discover_notebooks", "parse_parameter", "plan_run", "run_notebooks", "add_arguments"]
