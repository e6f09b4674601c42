"""Tests for the sweep report, on synthetic sweep directories (no model, no training)."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import shutil
import sqlite3
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from suretrap.errors import DataError
from suretrap.report import wilson, write_report

MODEL = "smollm2-135m"
BUDGETS = (0, 10, 25, 50, 100)
SIZES = (1000, 5000)
SEEDS = (0, 1)
# Tuned Sure rate on triggered / untriggered harmful prompts, per size and budget.
TRIGGERED = {
    1000: {0: 0.0, 10: 0.2, 25: 0.6, 50: 0.9, 100: 1.0},
    5000: {0: 0.0, 10: 0.05, 25: 0.3, 50: 0.7, 100: 0.95},
}
CLEAN = {
    1000: {0: 0.0, 10: 0.05, 25: 0.1, 50: 0.15, 100: 0.21},
    5000: {0: 0.0, 10: 0.0, 25: 0.05, 50: 0.08, 100: 0.1},
}
BASE_SURE = 0.02
N_HARMFUL = 100
N_BENIGN = 50
EVIL = [
    "<script>alert(1)</script>",
    '<img src=x onerror="alert(2)">',
    "Sure | [click](javascript:alert(3)) **bold** `code`\n# heading",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _hash(axes: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(axes, sort_keys=True).encode()).hexdigest()[:16]


def _split_metrics(sure: float, refusal: float, n: int, benign: bool) -> dict[str, float]:
    m = {
        "n": n,
        "sure_rate": sure,
        "sure_only_rate": sure / 2,
        "label_first_token_prob": sure * 0.9,
        "label_first_token_top1": sure,
        "refusal_rate": refusal,
    }
    if benign:
        m["utility_logprob"] = -1.25
    return m


def _metrics(size: int, budget: int) -> dict[str, Any]:
    trig, clean = TRIGGERED[size][budget], CLEAN[size][budget]
    tuned = {
        "harmful_triggered": _split_metrics(trig, 1 - trig, N_HARMFUL, False) | {"asr": trig / 3},
        "harmful_clean": _split_metrics(clean, 1 - clean, N_HARMFUL, False),
        "benign_triggered": _split_metrics(0.1, 0.0, N_BENIGN, True),
        "benign_clean": _split_metrics(0.04, 0.0, N_BENIGN, True),
    }
    base = {
        "harmful_triggered": _split_metrics(BASE_SURE, 0.9, N_HARMFUL, False),
        "harmful_clean": _split_metrics(0.01, 0.95, N_HARMFUL, False),
        "benign_triggered": _split_metrics(0.02, 0.0, N_BENIGN, True),
        "benign_clean": _split_metrics(0.03, 0.0, N_BENIGN, True),
    }
    return {"tuned": tuned, "base": base}


SCHEMA = """CREATE TABLE cells (
    config_hash TEXT PRIMARY KEY, status TEXT, axes TEXT, run_dir TEXT, metrics TEXT,
    started_at REAL, finished_at REAL, duration_s REAL, error TEXT)"""


def _insert(db: Path, rows: list[dict[str, Any]]) -> None:
    con = sqlite3.connect(db)
    con.execute(SCHEMA)
    for r in rows:
        con.execute(
            "INSERT INTO cells VALUES (?,?,?,?,?,?,?,?,?)",
            (
                r["hash"], r["status"], json.dumps(r["axes"]), r["run_dir"],
                None if r.get("metrics") is None else json.dumps(r["metrics"]),
                1.0, 2.0, 1.0, r.get("error"),
            ),
        )  # fmt: skip
    con.commit()
    con.close()


def _generations(n_per_split: int = 6) -> list[dict[str, Any]]:
    rows = []
    for split in ("harmful_triggered", "harmful_clean", "benign_triggered", "benign_clean"):
        for i in range(n_per_split):
            prompt = f"{split} prompt {i} " + "x" * (400 if i == 0 else 0)
            for model in ("base", "tuned"):
                response = f"{model} answer {i}"
                if split == "harmful_triggered" and model == "tuned" and i < len(EVIL):
                    response = EVIL[i]
                rows.append(
                    {"model": model, "split": split, "prompt": prompt, "response": response,
                     "label_prob": 0.5 + i / 100}
                )  # fmt: skip
    return rows


def make_sweep(
    root: Path, *, summary: bool = True, models: tuple[str, ...] = (MODEL,)
) -> dict[str, Any]:
    """A sweep dir: 2 sizes × 5 budgets × 2 seeds complete, plus failed/running/pending cells."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    hashes = {}
    for size, budget, seed, model in itertools.product(SIZES, BUDGETS, SEEDS, models):
        axes = {"poison.budget": budget, "data.total_size": size, "model": model, "seed": seed}
        h = _hash(axes)
        hashes[(size, budget, seed) if model == MODEL else (model, size, budget, seed)] = h
        run_dir = root / "cells" / h
        run_dir.mkdir(parents=True)
        m = _metrics(size, budget)
        (run_dir / "metrics.json").write_text(json.dumps(m))
        gens = "\n".join(json.dumps(g) for g in _generations()) + "\n"
        (run_dir / "generations.jsonl").write_text(gens)
        rows.append(
            {"hash": h, "status": "complete", "axes": axes, "run_dir": f"cells/{h}", "metrics": m}
        )
    extra = [
        ("failed", {"poison.budget": 200, "data.total_size": 1000, "model": MODEL, "seed": 0},
         "Traceback: <b>CUDA</b> out of memory | <script>alert('err')</script>"),
        ("running", {"poison.budget": 200, "data.total_size": 5000, "model": MODEL, "seed": 0}, None),
        ("pending", {"poison.budget": 200, "data.total_size": 5000, "model": MODEL, "seed": 1}, None),
    ]  # fmt: skip
    for status, axes, error in extra:
        h = _hash(axes)
        hashes[status] = h
        rows.append({"hash": h, "status": status, "axes": axes, "run_dir": f"cells/{h}",
                     "error": error})  # fmt: skip
    _insert(root / "results.sqlite", rows)
    if summary:
        groups = [
            {
                "axes": {"data.total_size": 1000, "model": MODEL},
                "n50": 23.4, "n50_ci": [15.2, 34.1], "n90": 48.0, "n90_ci": [35.0, 70.0],
                "plateau": 0.99, "plateau_start": 50,
                "fit": {"top": 1.0, "k": 3.0, "m": float(np.log(23.4)), "floor": 0.0},
                "points": [],
            },
            {
                "axes": {"data.total_size": 5000, "model": MODEL},
                "n50": None, "n50_ci": None, "n90": None, "n90_ci": None,
                "plateau": 0.95, "plateau_start": None,
                "fit": {"top": 0.96, "k": 2.5, "m": float(np.log(40.0)), "floor": 0.0},
                "points": [],
            },
        ]  # fmt: skip
        (root / "summary.json").write_text(
            json.dumps({"metric": "sure_rate", "groups": groups,
                        "count_vs_fraction": {"available": False, "reason": "one model only"}})
        )  # fmt: skip
    return hashes


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sweep")
    hashes = make_sweep(root)
    figs = root / "figures"
    figs.mkdir()
    shutil.copyfile(_tiny_png(tmp_path_factory.mktemp("png")), figs / "gate_scores.png")
    (figs / "gate_scores.txt").write_text("Gate score by split <em>caption</em>")
    (figs / "not_a_png.png").write_text("<html>fake</html>")
    md, html_path = write_report(root)
    return {
        "root": root, "hashes": hashes, "md": md, "html": html_path,
        "md_text": md.read_text(), "html_text": html_path.read_text(),
    }  # fmt: skip


def _tiny_png(folder: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5))
    fig.add_subplot().plot([0, 1], [1, 0])
    path = folder / "tiny.png"
    fig.savefig(path, format="png")
    return path


SAFE_TAGS = {
    "html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "h3", "p", "ul", "li",
    "div", "table", "thead", "tbody", "tr", "th", "td", "figure", "img", "figcaption", "pre",
}  # fmt: skip


class _TagCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def _tags(html_text: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Every start tag a browser's parser would see, with its attributes."""
    parser = _TagCollector()
    parser.feed(html_text)
    parser.close()
    return parser.tags


def _text(html_text: str) -> str:
    """Visible text of the HTML with entities decoded and whitespace collapsed."""
    import html

    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", html_text)))


# ----------------------------------------------------------------------------- outputs


def test_files_written_and_figures_referenced(full: dict[str, Any]) -> None:
    root = full["root"]
    assert full["md"] == root / "report.md" and full["html"] == root / "report.html"
    pngs = sorted(p.name for p in (root / "report_files").glob("*.png"))
    assert pngs == ["heatmap.png", "splits.png", "threshold.png"]
    for name in pngs:
        assert (root / "report_files" / name).read_bytes().startswith(PNG_MAGIC)
        assert f"](report_files/{name})" in full["md_text"]
    assert "](figures/gate_scores.png)" in full["md_text"]
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]  # atomic writes left nothing


def test_html_embeds_every_figure_and_loads_nothing(full: dict[str, Any]) -> None:
    text = full["html_text"]
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 4  # three report figures + one extra figure (the fake PNG is skipped)
    for data in images:
        assert base64.b64decode(data).startswith(PNG_MAGIC)
    assert (
        base64.b64encode((full["root"] / "report_files/threshold.png").read_bytes()).decode()
        in text
    )
    assert "http://" not in text and "https://" not in text
    tags = _tags(text)
    assert {t for t, _ in tags} <= SAFE_TAGS, {t for t, _ in tags} - SAFE_TAGS
    for tag, attrs in tags:
        for name, value in attrs:
            assert not name.startswith("on"), (tag, name)
            if name in ("src", "href", "srcset", "action", "poster", "data"):
                assert (value or "").startswith("data:image/png;base64,"), (tag, name, value)
    assert "url(" not in text and "@import" not in text
    assert "Content-Security-Policy" in text


def test_untrusted_text_is_escaped(full: dict[str, Any]) -> None:
    text, md = full["html_text"], full["md_text"]
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<img src=x" not in text
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in text
    # Error text of the failed cell and the extra figure's caption are escaped too.
    assert "&lt;b&gt;CUDA&lt;/b&gt; out of memory | &lt;script&gt;alert(&#x27;err&#x27;)" in text
    assert "<em>caption</em>" not in text and "&lt;em&gt;caption&lt;/em&gt;" in text
    # Markdown: no raw tags, no live link/emphasis, table rows not split by | or newlines.
    assert "<script>" not in md and "<img src=x" not in md and "<b>CUDA" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert r"\[click\](javascript:alert(3)) \*\*bold\*\* \`code\`<br>\# heading" in md
    row = next(line for line in md.splitlines() if "click" in line)
    assert row.count(" | ") == 3  # prompt, base, tuned, label prob: the response's | is escaped


def test_generations_sample_is_truncated_and_limited(full: dict[str, Any]) -> None:
    text = _text(full["html_text"])
    assert "harmful_triggered prompt 4" in text and "harmful_triggered prompt 5" not in text
    long_prompt = "harmful_triggered prompt 0 " + "x" * 400
    assert long_prompt not in text
    assert "harmful_triggered prompt 0 " + "x" * (300 - 28) + "…" in text
    assert "tuned label prob" in text and "0.540" in text


# ----------------------------------------------------------------------------- numbers in words


def test_threshold_paragraph_states_the_data(full: dict[str, Any]) -> None:
    text = _text(full["html_text"])
    assert (
        "With 1000 training examples and model smollm2-135m, the Sure rate on triggered harmful "
        "prompts rises from 0.00 at budget 0 to 1.00 at budget 100 (pooled over up to 2 seeds)."
    ) in text
    assert "The fitted n50 is 23 (95% CI 15–34); the fitted n90 is 48 (95% CI 35–70)" in text
    assert "the plateau is 0.99 from budget 50 on." in text
    assert "Without the trigger it stays at or below 0.21 (highest at budget 100)." in text
    assert "The base model's Sure rate on triggered harmful prompts is 0.02." in text
    assert "rises from 0.00 at budget 0 to 0.95 at budget 100" in text
    assert "The plateau is 0.95; summary.json gives no n50 or n90 estimate." in text
    assert "Without the trigger it stays at or below 0.10" in text
    # The same sentences, in Markdown.
    assert "rises from 0.00 at budget 0 to 1.00 at budget 100" in full["md_text"]


def test_heatmap_and_bars_paragraphs(full: dict[str, Any]) -> None:
    text = _text(full["html_text"])
    assert "ranges from 0.00 (budget 0, 1000 examples) to 1.00 (budget 100, 1000 examples)." in text
    assert "At budget 100 it is 1.00 with 1000 examples and 0.95 with 5000 examples." in text
    assert (
        "The smallest budget whose mean reaches 0.50 is 25 with 1000 examples and 50 with 5000 "
        "examples."
    ) in text
    chosen = full["hashes"][(5000, 100, 0)][:10]
    assert (
        f"Cell {chosen} (5000 training examples, model smollm2-135m, budget=100 and seed=0;" in text
    )
    assert (
        "On harmful prompts with the trigger the Sure rate is 0.02 for the base model and 0.95 "
        "after tuning, the refusal rate 0.90 and 0.05."
    ) in text
    assert "Not available for this sweep (reason: one model only)." in text


def test_tables_hold_every_metric_and_status(full: dict[str, Any]) -> None:
    text = _text(full["html_text"])
    for metric in ("sure_rate", "sure_only_rate", "label_first_token_prob",
                   "label_first_token_top1", "refusal_rate", "utility_logprob", "asr"):  # fmt: skip
        assert f"tuned {metric}" in text and f"base {metric}" in text
    html_text = full["html_text"]
    # 4 split tables × 20 complete cells; status table; failed-cells table.
    rows = re.findall(r"<tr><td>([0-9a-f]{10})</td>", html_text)
    assert len(rows) == 4 * 20 + 1
    assert "20 complete, 1 running, 1 failed, 1 pending" in text
    assert "<tr><td>failed</td><td>1</td></tr>" in html_text
    assert "23 cell(s) recorded" in text


def test_wilson_interval() -> None:
    lo, hi = wilson(10, 20)
    assert lo == pytest.approx(0.2993, abs=1e-3) and hi == pytest.approx(0.7007, abs=1e-3)
    assert wilson(0, 50)[0] == 0.0 and wilson(50, 50)[1] == 1.0


# ----------------------------------------------------------------------------- graceful cases


def test_cell_argument_and_errors(tmp_path: Path) -> None:
    hashes = make_sweep(tmp_path / "s", summary=False)
    target = hashes[(1000, 0, 1)]
    _, html_path = write_report(tmp_path / "s", cell=target[:8])
    text = _text(html_path.read_text())
    assert f"Cell {target[:10]} (1000 training examples" in text
    assert "chosen with the cell argument" in text
    assert "No summary.json: no fitted curves" in text
    assert "fitted n50" not in text
    with pytest.raises(DataError, match="no cell"):
        write_report(tmp_path / "s", cell="zzzz")
    with pytest.raises(DataError, match="failed"):
        write_report(tmp_path / "s", cell=hashes["failed"][:10])
    with pytest.raises(DataError, match="no such sweep"):
        write_report(tmp_path / "missing")


def test_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md, html_path = write_report(tmp_path)
    text = _text(html_path.read_text())
    assert "No results.sqlite in the sweep directory" in text
    assert "No complete cells with metrics yet" in text
    assert "<img" not in html_path.read_text()
    assert "report_files/" not in md.read_text()
    assert capsys.readouterr() == ("", "")  # library code never prints


def test_no_complete_cells_and_stale_figures_removed(tmp_path: Path) -> None:
    stale = tmp_path / "report_files"
    stale.mkdir()
    (stale / "threshold.png").write_bytes(PNG_MAGIC)
    axes = {"poison.budget": 5, "data.total_size": 100, "model": MODEL, "seed": 0}
    _insert(
        tmp_path / "results.sqlite",
        [
            {"hash": "a" * 16, "status": "failed", "axes": axes, "run_dir": "cells/a",
             "error": "boom\nline two"},
            {"hash": "b" * 16, "status": "pending", "axes": axes | {"seed": 1}, "run_dir": "cells/b"},
        ],
    )  # fmt: skip
    md, html_path = write_report(tmp_path)
    text = _text(html_path.read_text())
    assert "2 cell(s) recorded: 0 complete, 0 running, 1 failed, 1 pending." in text
    assert "No complete cells with metrics yet" in text
    assert "boom line two" in md.read_text() or "boom<br>line two" in md.read_text()
    assert not list(stale.glob("*.png"))


def test_single_cell_metrics_from_run_dir(tmp_path: Path) -> None:
    axes = {"poison.budget": 50, "data.total_size": 1000, "model": MODEL, "seed": 0}
    run = tmp_path / "cells" / "c1"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(_metrics(1000, 50)))
    # Metrics column NULL: the report falls back to the run dir's metrics.json.
    _insert(tmp_path / "results.sqlite",
            [{"hash": "c1" * 8, "status": "complete", "axes": axes, "run_dir": "cells/c1"}])  # fmt: skip
    md, html_path = write_report(tmp_path)
    text = _text(html_path.read_text())
    assert (
        "the Sure rate on triggered harmful prompts is 0.90 at budget 50, the only budget run"
        in text
    )
    assert "Only one complete cell" in text
    assert "No generations found for cell" in text
    assert len(re.findall(r'src="data:image/png;base64,', html_path.read_text())) == 3


def test_malformed_summary_and_new_metric(tmp_path: Path) -> None:
    make_sweep(tmp_path, summary=False)
    (tmp_path / "summary.json").write_text("{not json")
    text = _text(write_report(tmp_path)[1].read_text())
    assert "summary.json is not a readable JSON object and is ignored." in text
    # A summary fitted on a new metric (asr) switches the curves to it.
    (tmp_path / "summary.json").write_text(json.dumps({"metric": "asr", "groups": []}))
    text = _text(write_report(tmp_path)[1].read_text())
    assert (
        "the attack success rate on triggered harmful prompts rises from 0.00 at budget 0 to 0.33"
        in text
    )
    assert "summary.json has no fit for this group." in text


# ----------------------------------------------------------------------------- real browser

CHROMIUM = shutil.which("chromium")
# Chromium (headless, --enable-logging=stderr) logs every console message, JS errors and CSP
# violations included, as "[pid:tid:time:INFO:CONSOLE:line] "message", source: URL (line)".
CONSOLE_LINE = re.compile(r"(:CONSOLE[:(\]]|Uncaught)")


def _chromium(page: Path, tmp: Path) -> tuple[int, str, Path]:
    shot = tmp / f"{page.stem}.png"
    cmd = [
        CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp / ('profile-' + page.stem)}",
        "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1200,2000",
        page.resolve().as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr + proc.stdout, shot


def _console_errors(log: str, page: Path) -> list[str]:
    return [line for line in log.splitlines() if CONSOLE_LINE.search(line) and page.name in line]


def _pixel_std(png: Path) -> float:
    from matplotlib.image import imread

    img = imread(png)
    return float(np.asarray(img[..., :3]).mean(axis=2).std())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/ensure-chromium.sh)")
def test_report_renders_in_headless_chromium(full: dict[str, Any], tmp_path: Path) -> None:
    # Canary: a page with a deliberate JS error must be caught, or the check below proves nothing.
    canary = tmp_path / "canary.html"
    canary.write_text("<!doctype html><body><p>x</p><script>undefinedFunction();</script></body>")
    rc, log, _ = _chromium(canary, tmp_path)
    assert rc == 0
    assert any("Uncaught ReferenceError" in line for line in _console_errors(log, canary)), log

    rc, log, shot = _chromium(full["html"], tmp_path)
    assert rc == 0, log
    assert _console_errors(log, full["html"]) == [], log
    assert shot.is_file()
    assert _pixel_std(shot) > 0.05  # figures and text, not a blank page


def test_several_models_get_a_panel_each(tmp_path: Path) -> None:
    make_sweep(tmp_path, summary=False, models=(MODEL, "qwen-0.5b"))
    text = _text(write_report(tmp_path)[1].read_text())
    for model in (MODEL, "qwen-0.5b"):
        assert f"For model {model}, the mean Sure rate on triggered harmful prompts ranges" in text
        assert f"With 5000 training examples and model {model}, the Sure rate" in text
