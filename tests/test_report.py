"""The results site: `lrsafety report` on real executed runs of two stand-ins.

Checks the Quarto sources (every page, include, embedded notebook and cell label resolves), the
headline tables against the runs' CSV tables, and the nbconvert HTML preview, loaded by a headless
Chromium over a loopback HTTP server with no console error.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from bs4 import BeautifulSoup

from lrsafety import report, runner
from lrsafety.languages import TIERS

REPOSITORY = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
FULL_MODEL, PARTIAL_MODEL = "tiny-qwen2", "tiny-llama"
SITE_SOURCES = ["_quarto.yml", "index.qmd"] + [f"paper/{section.page}.qmd" for section in report.SECTIONS]


# Knobs that keep the notebooks fast on stand-ins. Only those a notebook declares are passed.
SMALL_RUN = {
    "languages": ["en", "de", "th", "yo"],  # two high-resource languages, one mid, one low
    "generation_prompts_per_cell": 2,
    "max_new_tokens": 4,
    "target_languages": ["yo"],  # one low-resource target for the gates and the steering runs
    "n_random_directions": 2,
    "n_permutations": 2,
    "budgets": [0, 1, 4],
    "n_seeds": 2,
    "rank": 2,  # at most the number of high-resource languages above
    "sweep_lambdas": [0, 1],
}
PROMPTS_PER_CELL = 16


def _declared(prefixes: list[str]) -> set[str]:
    import papermill

    available = runner.discover_notebooks()
    names: set[str] = set()
    for prefix in prefixes:
        names |= set(papermill.inspect_notebook(str(available[prefix])))
    return names


def _shrink_prompt_table(data_dir: Path) -> None:
    """Keep the first prompts of every (language, subset, split) cell of the tidy table.

    Cells are index-aligned across languages in PolyRefuse, so the first rows of each cell are
    translations of the same prompts, as the cross-language analyses expect.
    """
    path = data_dir / "processed" / "polyrefuse.parquet"
    table = pd.read_parquet(path)
    table.groupby(["language", "subset", "split"], sort=False).head(PROMPTS_PER_CELL).to_parquet(path)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, polyrefuse_source) -> Path:
    """Two real runs: the full model runs every notebook on a small prompt table, the partial one
    only 00_data, so the site must say what the partial run lacks."""
    root = tmp_path_factory.mktemp("runs")
    data_dir = tmp_path_factory.mktemp("data")
    later = [prefix for prefix in runner.discover_notebooks() if prefix != "00"]
    declared = _declared(["00", *later])
    parameters = {name: value for name, value in SMALL_RUN.items() if name in declared}
    parameters.update(data_dir=str(data_dir), polyrefuse_source=str(polyrefuse_source))
    data_parameters = {name: value for name, value in parameters.items() if name in _declared(["00"])}

    runner.run_notebooks(PARTIAL_MODEL, root / PARTIAL_MODEL, ["00"], data_parameters, progress=False)
    runner.run_notebooks(FULL_MODEL, root / FULL_MODEL, ["00"], data_parameters, progress=False)
    _shrink_prompt_table(data_dir)
    later_parameters = {name: value for name, value in parameters.items() if name in _declared(later)}
    runner.run_notebooks(FULL_MODEL, root / FULL_MODEL, later, later_parameters, progress=False)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the committed site sources, so staging never writes into the repository."""
    folder = tmp_path_factory.mktemp("project")
    for name in SITE_SOURCES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPOSITORY / name, folder / name)
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in SITE_SOURCES}


@pytest.fixture(scope="module")
def site(runs_root, project, tmp_path_factory) -> dict:
    """Run `lrsafety report` as a user would, on a PATH without quarto."""
    before = _digest(project)
    out = tmp_path_factory.mktemp("out") / "site"
    environment = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin")
    completed = subprocess.run(
        [sys.executable, "-m", "lrsafety.cli", "report", "--runs", str(runs_root), "--out", str(out),
         "--project", str(project)],
        capture_output=True, text=True, timeout=300, env=environment,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {"out": out, "stderr": completed.stderr, "stdout": completed.stdout, "before": before}


def _executed(run_folder: Path, notebook: str):
    return nbformat.read(run_folder / notebook, as_version=4)


def _run_notebooks(runs_root: Path) -> list[tuple[Path, str]]:
    """Every (run folder, notebook) pair that the site must show."""
    pairs = []
    for folder in sorted(path for path in runs_root.iterdir() if path.is_dir()):
        for section in report.SECTIONS:
            pairs.extend((folder, notebook) for notebook in section.notebooks if (folder / notebook).is_file())
    return pairs


# ---------------------------------------------------------------------------------------------
# Quarto sources


def test_quarto_config_names_existing_pages():
    config = yaml.safe_load((REPOSITORY / "_quarto.yml").read_text())
    assert config["project"]["type"] == "website"
    assert config["execute"]["enabled"] is False
    rendered = config["project"]["render"]
    assert rendered == ["index.qmd"] + [f"paper/{section.page}.qmd" for section in report.SECTIONS]
    for page in rendered:
        assert (REPOSITORY / page).is_file(), page
    hrefs = [item["href"] for item in config["website"]["navbar"]["left"]]
    assert sorted(hrefs) == sorted(rendered)
    assert "lrsafety.report --stage-only" in config["project"]["pre-render"]


def test_committed_pages_include_generated_fragment():
    for name in SITE_SOURCES[1:]:
        page = report.read_page(REPOSITORY / name)
        assert page.front_matter.get("title"), name
        assert page.include is not None, f"{name} has no include shortcode"
        assert Path(page.include).name.startswith(report.GENERATED_PREFIX), name


def test_report_leaves_sources_unchanged(site, project):
    assert _digest(project) == site["before"]


def test_staged_includes_and_embeds_resolve(site, project, runs_root):
    config = report.quarto_config(project)
    embedded = set()
    for page_name in config["project"]["render"]:
        page = report.read_page(project / page_name)
        fragment = (project / page_name).parent / page.include
        assert fragment.is_file(), f"{page_name} includes missing {fragment}"
        for notebook_path, label in report.embeds_in(fragment.read_text()):
            # Quarto resolves an embed inside an include against the including page's folder.
            staged = (project / page_name).parent / notebook_path
            assert staged.is_file(), f"{page_name} embeds missing notebook {notebook_path}"
            staged_labels = {cell.label for cell in report.labeled_cells(nbformat.read(staged, as_version=4))}
            assert label in staged_labels, f"{label} not in {staged}"
            original_label, run_slug = label.rsplit(report.LABEL_SEPARATOR, 1)
            run_folder = runs_root / run_slug
            original_labels = {cell.label for cell in report.labeled_cells(_executed(run_folder, staged.name))}
            assert original_label in original_labels, f"{original_label} not in the executed {staged.name}"
            embedded.add((run_slug, staged.name, original_label))
    expected = {
        (folder.name, notebook, cell.label)
        for folder, notebook in _run_notebooks(runs_root)
        for cell in report.labeled_cells(_executed(folder, notebook))
        if cell.has_outputs
    }
    assert expected, "the runs have no labeled cell"
    assert embedded == expected


def test_staged_notebooks_keep_outputs(project, runs_root, site):
    for folder, notebook in _run_notebooks(runs_root):
        staged = nbformat.read(project / "paper" / "executed" / folder.name / notebook, as_version=4)
        original = _executed(folder, notebook)
        assert [cell.get("outputs") for cell in staged.cells] == [cell.get("outputs") for cell in original.cells]
        for cell in report.labeled_cells(staged):
            options = report.cell_options(staged.cells[cell.index].source)
            caption = options.get("fig-cap") or options.get("tbl-cap")
            assert caption and folder.name in caption, options


def test_missing_notebook_is_noted(project, runs_root, site):
    text = (project / "paper" / f"{report.GENERATED_PREFIX}refusal-gap.qmd").read_text()
    partial_tab = text.split(f"## {PARTIAL_MODEL}", 1)[1]
    assert "01_refusal_gap.ipynb: not run for this model" in partial_tab


def test_standin_warning_on_every_page(project, site):
    from lrsafety.standins import STANDIN_WARNING

    for page in ["index"] + [section.page for section in report.SECTIONS]:
        text = report.fragment_path(project, page).read_text()
        assert "callout-warning" in text, page
        assert STANDIN_WARNING in text, page


# ---------------------------------------------------------------------------------------------
# Headline tables


def test_headline_tables_match_run_tables(runs_root):
    runs = report.find_runs(runs_root)
    assert [run.name for run in runs] == sorted([FULL_MODEL, PARTIAL_MODEL])
    headlines = {headline.key: headline for headline in report.headline_tables(runs)}
    assert list(headlines) == ["refusal_gap", "separability", "recalibration", "steering"]
    full = next(run for run in runs if run.name == FULL_MODEL)
    partial = next(run for run in runs if run.name == PARTIAL_MODEL)
    tables = {"refusal_gap": "refusal_gap", "separability": "separability",
              "recalibration": "recalibration", "steering": "steering"}
    for key, table_name in tables.items():
        headline = headlines[key]
        partial_notes = [note for note in headline.missing if note.startswith(partial.display_name)]
        assert len(partial_notes) == 1, headline.missing
        assert "not run for this model" in partial_notes[0]
        frame = full.table(table_name)
        if frame is None:
            assert headline.table.empty
            continue
        rows = headline.table[headline.table["model"] == full.display_name]
        assert not rows.empty, f"{key}: no headline row for {full.name}"
        _check_headline_values(key, rows, frame, full)


def _check_headline_values(key: str, rows: pd.DataFrame, frame: pd.DataFrame, run) -> None:
    per_language = frame[~frame["language"].astype(str).isin(["mean", "all", "macro", "overall"])]
    per_language = per_language[per_language["tier"].isin(TIERS)]
    first = rows.iloc[0]
    if key == "separability":
        selected = per_language[
            (per_language["layer"] == run.model["paper_layer"])
            & (per_language["position"] == "t_post_inst")
            & (per_language["direction"] == first["direction"])
        ]
        by_language = selected.groupby(["language", "tier"])["auc"].mean().reset_index()
        for tier in TIERS:
            expected = by_language.loc[by_language["tier"] == tier, "auc"].mean()
            assert first[tier] == pytest.approx(expected), tier
    elif key == "refusal_gap":
        selected = per_language[
            (per_language["subset"] == first["subset"]) & (per_language["condition"] == first["condition"])
        ]
        for tier in TIERS:
            expected = selected.loc[selected["tier"] == tier, "refusal_rate"].mean()
            assert first[tier] == pytest.approx(expected), tier
        assert first["gap high − low"] == pytest.approx(first["high"] - first["low"])
    elif key == "recalibration":
        gate_rows = per_language[(per_language["readout"] == "gate") & (per_language["threshold_rule"] == first["threshold rule"])]
        selected = gate_rows[(gate_rows["tier"] == first["tier"]) & (gate_rows["budget"] == 0)]
        expected = selected.groupby("language")["balanced_accuracy"].mean().mean()
        assert first["b = 0"] == pytest.approx(expected)
        assert "b = 1" in rows.columns
    elif key == "steering":
        for _, row in rows.iterrows():
            expected = per_language.loc[per_language["condition"] == row["condition"], "selectivity"].mean()
            assert row["selectivity (points)"] == pytest.approx(expected), row["condition"]


def test_find_runs_reports_bad_folder(tmp_path):
    with pytest.raises(report.ReportError, match="not found"):
        report.find_runs(tmp_path / "absent")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    with pytest.raises(report.ReportError, match="invalid manifest.json"):
        report.find_runs(tmp_path)


# ---------------------------------------------------------------------------------------------
# HTML preview


def test_report_says_quarto_missing(site):
    assert "quarto was not found" in site["stderr"]
    assert "Site written" in site["stdout"]


def test_preview_has_every_page(site):
    out = site["out"]
    assert (out / "index.html").is_file()
    for section in report.SECTIONS:
        assert (out / "paper" / f"{section.page}.html").is_file(), section.page


def test_preview_contains_every_figure_and_table(site, runs_root):
    out = site["out"]
    pages = {}
    for section in report.SECTIONS:
        pages.update({notebook: section.page for notebook in section.notebooks})
    for folder, notebook in _run_notebooks(runs_root):
        soup = BeautifulSoup((out / "paper" / f"{pages[notebook]}.html").read_text(), "html.parser")
        full_page = out / "paper" / "executed" / folder.name / notebook.replace(".ipynb", ".html")
        assert full_page.is_file()
        for cell in report.labeled_cells(_executed(folder, notebook)):
            if not cell.has_outputs:
                continue
            element = soup.find(id=f"cell-id={folder.name}{report.LABEL_SEPARATOR}{cell.label}")
            assert element is not None, f"{folder.name} {notebook} {cell.label} missing from the preview"
            outputs = _executed(folder, notebook).cells[cell.index].outputs
            images = [output["data"]["image/png"] for output in outputs if "image/png" in output.get("data", {})]
            tables = [output for output in outputs if "<table" in str(output.get("data", {}).get("text/html", ""))]
            if cell.kind == "figure":
                assert images, f"{cell.label} has no image output"
            shown = [image["src"].split(",", 1)[1] for image in element.find_all("img")]
            assert shown == [image.replace("\n", "") for image in images]
            assert len(element.find_all("table")) >= len(tables)


def test_preview_index_has_headline_tables(site, runs_root):
    from lrsafety.standins import STANDIN_WARNING

    soup = BeautifulSoup((site["out"] / "index.html").read_text(), "html.parser")
    assert STANDIN_WARNING in soup.get_text(" ")
    runs_table = soup.find(id="headline-runs")
    assert runs_table is not None
    text = runs_table.get_text(" ")
    assert FULL_MODEL in text
    assert PARTIAL_MODEL in text
    runs = report.find_runs(runs_root)
    for headline in report.headline_tables(runs):
        element = soup.find(id=f"headline-{headline.key}")
        if headline.table.empty:
            assert element is None
        else:
            assert element is not None and element.find("table") is not None, headline.key
        for note in headline.missing:
            assert note in soup.get_text(" ")


def test_preview_has_no_network_resources(site):
    for page in site["out"].rglob("*.html"):
        text = page.read_text()
        soup = BeautifulSoup(text, "html.parser")
        assert not soup.find_all("script", src=True), page
        for tag, attribute in (("link", "href"), ("img", "src")):
            for element in soup.find_all(tag):
                target = element.get(attribute, "")
                assert not re.match(r"^(https?:)?//", target), f"{page}: {target}"
    css = (site["out"] / "assets" / "jupyterlab.css").read_text()
    assert not re.search(r"url\((?!['\"]?data:)", css)
    assert "@import" not in css


def test_report_refuses_foreign_output(runs_root, project, tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(report.ReportError, match="not built by lrsafety report"):
        report.build_report(runs_root, foreign, project, preview=True)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_report_without_runs_fails(tmp_path, project, capsys):
    from lrsafety.cli import main

    (tmp_path / "runs").mkdir()
    status = main(["report", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "site"), "--project", str(project)])
    assert status == 1
    assert "no run folder" in capsys.readouterr().err
    assert not (tmp_path / "site").exists()


def test_stage_only_skips_inside_report(project, runs_root, site, monkeypatch):
    from lrsafety.cli import main

    fragment = report.fragment_path(project, "index")
    stamp = fragment.stat().st_mtime_ns
    monkeypatch.setenv(report.STAGED_ENVIRONMENT_VARIABLE, "1")
    assert main(["report", "--stage-only", "--runs", str(runs_root), "--project", str(project)]) == 0
    assert fragment.stat().st_mtime_ns == stamp


def test_staging_again_keeps_unchanged_files(project, runs_root, site):
    fragments = list((project / "paper").glob(f"{report.GENERATED_PREFIX}*.qmd"))
    copies = [path for path in (project / "paper" / report.EXECUTED_FOLDER).rglob("*") if path.is_file()]
    stamps = {path: path.stat().st_mtime_ns for path in fragments + copies}
    assert len(stamps) > len(report.SECTIONS)
    report.stage_site(project, report.find_runs(runs_root), runs_root)
    changed = [path for path, stamp in stamps.items() if path.stat().st_mtime_ns != stamp]
    assert changed == []


def test_stage_only_without_runs_writes_placeholders(tmp_path, monkeypatch):
    from lrsafety.cli import main

    for name in SITE_SOURCES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPOSITORY / name, tmp_path / name)
    monkeypatch.delenv(report.STAGED_ENVIRONMENT_VARIABLE, raising=False)
    assert main(["report", "--stage-only", "--runs", str(tmp_path / "absent"), "--project", str(tmp_path)]) == 0
    for page in ["index"] + [section.page for section in report.SECTIONS]:
        assert "No runs yet" in report.fragment_path(tmp_path, page).read_text(), page


# ---------------------------------------------------------------------------------------------
# Chromium


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, url: str):
        import websocket

        self.socket = websocket.create_connection(url, timeout=30)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, seconds: float = 30.0) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    self.events.remove(event)
                    return event
            self.socket.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(json.loads(self.socket.recv()))
        raise AssertionError(f"timed out waiting for {method}")

    def close(self) -> None:
        self.socket.close()


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) to check the site preview")
    profile = tempfile.mkdtemp(prefix="lrsafety-chromium-")
    process = subprocess.Popen(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         "--window-size=1280,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if match:
                port = int(match.group(1))
            elif not line and process.poll() is not None:
                break
        assert port is not None, "chromium did not start its DevTools server"
        # Keep reading chromium's stderr so that a full pipe never blocks it.
        threading.Thread(target=lambda: process.stderr.read(), daemon=True).start()
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def served_site(site):
    """Serve the preview from 127.0.0.1 on a free port for the length of the module."""
    handler = functools.partial(_QuietHandler, directory=str(site["out"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *arguments):  # noqa: A002 - the signature of the base class
        pass


def _load_page(port: int, url: str, screenshot: Path) -> dict:
    """Load ``url`` in a fresh tab; return console errors, non-loopback requests and table geometry."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
    with urllib.request.urlopen(request, timeout=30) as response:
        target = json.loads(response.read())
    tools = DevTools(target["webSocketDebuggerUrl"])
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.call(f"{domain}.enable")
        tools.call("Emulation.setDeviceMetricsOverride", width=1280, height=1000, deviceScaleFactor=1, mobile=False)
        tools.call("Page.navigate", url=url)
        tools.wait_for("Page.loadEventFired")
        time.sleep(0.5)  # let late console messages arrive
        geometry = tools.call(
            "Runtime.evaluate", returnByValue=True,
            expression="JSON.stringify([...document.querySelectorAll('table')].slice(0, 1)"
                       ".map(t => { const r = t.getBoundingClientRect(); return {top: r.top, height: r.height,"
                       " width: r.width, rows: t.rows.length}; }))",
        )["result"]["value"]
        shot = tools.call("Page.captureScreenshot", format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        tools.call("Runtime.evaluate", expression="0")  # drain pending events
        errors, requests = [], []
        for event in tools.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(params["exceptionDetails"].get("text"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(str(params.get("args")))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(params["entry"]["text"])
            elif method == "Network.loadingFailed":
                errors.append(f"request failed: {params.get('errorText')}")
            elif method == "Network.requestWillBeSent":
                requests.append(params["request"]["url"])
        return {"errors": errors, "requests": requests, "tables": json.loads(geometry)}
    finally:
        tools.close()
        urllib.request.urlopen(f"http://127.0.0.1:{port}/json/close/{target['id']}", timeout=30).close()


def _screenshot_folder(tmp_path_factory) -> Path:
    # LRSAFETY_SCREENSHOTS keeps the screenshots for a person to look at.
    folder = os.environ.get("LRSAFETY_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return tmp_path_factory.mktemp("screenshots")


def _screenshot_is_not_blank(path: Path) -> None:
    from PIL import Image

    image = Image.open(path).convert("L")
    low, high = image.getextrema()
    assert image.size == (1280, 1000)
    assert high - low > 100, "the screenshot is blank"


@pytest.mark.parametrize("page", ["index.html", "paper/data.html"])
def test_chromium_loads_preview_without_errors(chromium, served_site, page, tmp_path_factory):
    screenshot = _screenshot_folder(tmp_path_factory) / (page.replace("/", "_") + ".png")
    result = _load_page(chromium, f"{served_site}/{page}", screenshot)
    assert result["errors"] == []
    assert result["requests"], "no request was recorded"
    for url in result["requests"]:
        assert url.startswith(served_site) or url.startswith("data:"), url
    assert result["tables"], f"{page} shows no table"
    first = result["tables"][0]
    assert first["rows"] >= 2
    assert first["width"] > 200
    assert first["height"] > 20
    assert 0 < first["top"] < 1000, f"the first table of {page} is not on the first screen: {first}"
    _screenshot_is_not_blank(screenshot)
