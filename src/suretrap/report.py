"""Sweep report: figures, tables and plain-language findings as Markdown and self-contained HTML.

`write_report(DIR)` reads what a sweep left in DIR:

  results.sqlite     table `cells` (status, axes, metrics per cell)
  summary.json       optional threshold analysis (fitted logistic curves, n50/n90, plateau)
  cells/<hash>/      metrics.json and generations.jsonl of each complete cell
  figures/*.png      optional extra figures, each with a sibling *.txt caption

and writes

  report_files/*.png the figures, referenced from report.md
  report.md          Markdown report
  report.html        the same report with the figures embedded as data URIs; it loads nothing
                     (no scripts, fonts or remote resources; a CSP forbids them as well)

Every sentence that states a number is computed from the data. Model output, error text and
axis values are untrusted: they are escaped for HTML (`html.escape`) and for Markdown.
A missing summary, a single cell or an empty sweep give a shorter report that says what is
missing; only a missing DIR or a `cell` prefix that matches no complete cell raise.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import sqlite3
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullLocator

from suretrap.errors import DataError
from suretrap.poison import atomic_write

__all__ = ["write_report"]

DB_FILE = "results.sqlite"
SUMMARY_FILE = "summary.json"
FILES_DIR = "report_files"
EXTRA_FIGURES_DIR = "figures"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
METRICS_FILE = "metrics.json"
GENERATIONS_FILE = "generations.jsonl"

BUDGET_AXIS = "poison.budget"
SIZE_AXIS = "data.total_size"
SEED_AXIS = "seed"
MODEL_AXIS = "model"
AXIS_ORDER = (MODEL_AXIS, SIZE_AXIS, BUDGET_AXIS, SEED_AXIS)

SPLITS = ("harmful_triggered", "harmful_clean", "benign_triggered", "benign_clean")
SPLIT_TEXT = {
    "harmful_triggered": "harmful prompts with the trigger",
    "harmful_clean": "harmful prompts without the trigger",
    "benign_triggered": "benign prompts with the trigger",
    "benign_clean": "benign prompts without the trigger",
}
METRIC_ORDER = (
    "n",
    "sure_rate",
    "sure_only_rate",
    "asr",
    "label_first_token_prob",
    "label_first_token_top1",
    "refusal_rate",
    "utility_logprob",
)
METRIC_TEXT = {"sure_rate": "Sure rate", "asr": "attack success rate"}
MODELS = ("tuned", "base")
STATUS_ORDER = ("complete", "running", "failed", "pending")

SAMPLES_PER_SPLIT = 5
MAX_TEXT = 300
MAX_ERROR = 500
Z95 = 1.959963984540054
DPI = 100


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Cell:
    """One row of the `cells` table, with JSON columns decoded."""

    config_hash: str
    status: str
    axes: dict[str, Any]
    run_dir: str
    metrics: dict[str, Any] | None
    error: str | None

    def metric(self, model: str, split: str, name: str) -> float | None:
        """A finite numeric metric, or None when absent or not a number."""
        try:
            value = self.metrics[model][split][name]  # type: ignore[index]
        except (KeyError, TypeError):
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value) if math.isfinite(value) else None

    @property
    def budget(self) -> float | None:
        return _number(self.axes.get(BUDGET_AXIS))


@dataclass
class Pooled:
    """A rate pooled over seeds; `lo`/`hi` is the 95% Wilson interval when trial counts exist."""

    rate: float
    trials: float | None
    seeds: int
    lo: float | None = None
    hi: float | None = None


@dataclass
class CurveGroup:
    """One line of the threshold figure: every non-budget, non-seed axis fixed."""

    axes: dict[str, Any]
    budgets: list[float]
    triggered: list[Pooled]
    clean: list[Pooled | None]
    base: Pooled | None
    fit: dict[str, float] | None = None
    summary: dict[str, Any] | None = None


@dataclass
class Sweep:
    """Everything the report is built from, plus notes about what was missing or unreadable."""

    cells: list[Cell]
    summary: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> list[Cell]:
        return [c for c in self.cells if c.status == "complete" and c.metrics is not None]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _json_or_none(text: Any) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def _connect_readonly(db: Path) -> sqlite3.Connection:
    # Read-only so a report never interferes with a running sweep's writes.
    try:
        return sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        return sqlite3.connect(db, timeout=30)


def _load_cells(sweep_dir: Path, notes: list[str]) -> list[Cell]:
    db = sweep_dir / DB_FILE
    if not db.is_file():
        notes.append(f"No {DB_FILE} in the sweep directory: no cells have been recorded yet.")
        return []
    try:
        con = _connect_readonly(db)
        try:
            con.row_factory = sqlite3.Row
            rows = [dict(r) for r in con.execute("SELECT * FROM cells")]
        finally:
            con.close()
    except sqlite3.Error as exc:
        notes.append(f"{DB_FILE} could not be read ({exc}).")
        return []
    cells: list[Cell] = []
    missing_metrics = 0
    for row in rows:
        axes = _json_or_none(row.get("axes"))
        status = str(row.get("status") or "unknown")
        run_dir = str(row.get("run_dir") or "")
        metrics = _json_or_none(row.get("metrics"))
        if status == "complete" and not isinstance(metrics, dict):
            # The column may be empty while the run directory holds the metrics.
            metrics = _json_or_none(_read_text(sweep_dir / run_dir / METRICS_FILE))
            if not isinstance(metrics, dict):
                missing_metrics += 1
        cells.append(
            Cell(
                config_hash=str(row.get("config_hash") or ""),
                status=status,
                axes=axes if isinstance(axes, dict) else {},
                run_dir=run_dir,
                metrics=metrics if isinstance(metrics, dict) else None,
                error=None if row.get("error") is None else str(row.get("error")),
            )
        )
    if missing_metrics:
        notes.append(
            f"{missing_metrics} complete cell(s) have no readable metrics and are left out."
        )
    return cells


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _load_summary(sweep_dir: Path, notes: list[str]) -> dict[str, Any] | None:
    path = sweep_dir / SUMMARY_FILE
    if not path.is_file():
        notes.append(f"No {SUMMARY_FILE}: no fitted curves, n50 or plateau estimates.")
        return None
    summary = _json_or_none(_read_text(path))
    if not isinstance(summary, dict):
        notes.append(f"{SUMMARY_FILE} is not a readable JSON object and is ignored.")
        return None
    return summary


def load_sweep(sweep_dir: Path) -> Sweep:
    """Read the cells table and summary.json of a sweep directory (missing files are noted)."""
    notes: list[str] = []
    cells = _load_cells(sweep_dir, notes)
    summary = _load_summary(sweep_dir, notes)
    return Sweep(cells=cells, summary=summary, notes=notes)


# ----------------------------------------------------------------------------- statistics


def wilson(successes: float, trials: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (works with fractional successes)."""
    if trials <= 0:
        return (0.0, 1.0)
    p = min(max(successes / trials, 0.0), 1.0)
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    # Exact bounds at the edges (the formula leaves rounding dust like 7e-18).
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= trials else min(1.0, centre + half)
    return (lo, hi)


def _pool(cells: Sequence[Cell], model: str, split: str, metric: str) -> Pooled | None:
    """Pool a rate over cells (seeds): successes = rate × n summed, when every cell has n."""
    pairs = [(c.metric(model, split, metric), c.metric(model, split, "n")) for c in cells]
    pairs = [(r, n) for r, n in pairs if r is not None]
    if not pairs:
        return None
    if all(n is not None and n > 0 for _, n in pairs):
        trials = sum(n for _, n in pairs if n is not None)
        successes = sum(r * n for r, n in pairs if n is not None)
        lo, hi = wilson(successes, trials)
        return Pooled(successes / trials, trials, len(pairs), lo, hi)
    return Pooled(sum(r for r, _ in pairs) / len(pairs), None, len(pairs))


def logistic(b: np.ndarray, fit: dict[str, float]) -> np.ndarray:
    """p(b) = floor + (top - floor) / (1 + exp(-k (ln b - m))), the summary's fitted curve."""
    z = np.clip(-fit["k"] * (np.log(b) - fit["m"]), -500, 500)
    return fit["floor"] + (fit["top"] - fit["floor"]) / (1 + np.exp(z))


def _fit_params(raw: Any) -> dict[str, float] | None:
    if not isinstance(raw, dict):
        return None
    out = {key: _number(raw.get(key)) for key in ("top", "k", "m", "floor")}
    if any(v is None for v in out.values()):
        return None
    return {k: float(v) for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------- formatting


def _vkey(value: Any) -> tuple[int, float, str]:
    """Sort key mixing numbers (numerically) and anything else (by its JSON text)."""
    num = _number(value)
    if num is not None:
        return (0, num, "")
    return (1, 0.0, json.dumps(value, sort_keys=True, default=str))


def _axis_key(name: str) -> tuple[int, str]:
    return (AXIS_ORDER.index(name), "") if name in AXIS_ORDER else (len(AXIS_ORDER), name)


def _short(axis: str) -> str:
    return axis.rsplit(".", 1)[-1]


def _val(value: Any) -> str:
    if isinstance(value, str):
        return value
    num = _number(value)
    if num is not None and num == int(num) and abs(num) < 1e15:
        return str(int(num))
    if num is not None:
        return f"{num:g}"
    return json.dumps(value, sort_keys=True, default=str)


def _count(x: float) -> str:
    """A budget-like quantity: whole numbers from 10 up, three significant digits below."""
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.3g}"


def _r(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _cell_value(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        # Rates keep three decimals (1.000 next to 0.900); whole counts stay whole.
        return str(int(value)) if value == int(value) and abs(value) >= 2 else f"{value:.3f}"
    return _val(value)


def _describe(axes: dict[str, Any]) -> str:
    """Plain words for a group's fixed axes, e.g. '1000 training examples and model smollm2'."""
    parts = []
    order = (SIZE_AXIS, MODEL_AXIS, BUDGET_AXIS, SEED_AXIS)
    for name in sorted(axes, key=lambda n: (order.index(n), "") if n in order else (9, n)):
        value = axes[name]
        if name == SIZE_AXIS:
            parts.append(f"{_val(value)} training examples")
        elif name == MODEL_AXIS:
            parts.append(f"model {_val(value)}")
        else:
            parts.append(f"{_short(name)}={_val(value)}")
    if not parts:
        return "all cells"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _metric_text(metric: str) -> str:
    return METRIC_TEXT.get(metric, metric)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ordered(names: Iterable[str], order: Sequence[str]) -> list[str]:
    """Names in a preferred order first, any others (e.g. a new metric) sorted after them."""
    present = set(names)
    return [n for n in order if n in present] + sorted(present - set(order))


# ----------------------------------------------------------------------------- document model


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    wide_text: bool = False  # long free text (generations, errors): wrap instead of nowrap


@dataclass
class Image:
    md_path: str  # relative to the sweep directory, for report.md
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Pre:
    text: str


Block = Heading | Para | Bullets | Table | Image | Pre

# Characters that could start emphasis, links, tables or code in Markdown.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~#])")


def _md(text: str, *, breaks: bool = False) -> str:
    """Escape untrusted text for Markdown: HTML-escape (no raw tags), then Markdown syntax."""
    out = _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))
    out = out.replace("\r\n", "\n").replace("\r", "\n")
    # Newlines would break table rows and could start new blocks; <br> is ours, not theirs.
    return out.replace("\n", "<br>" if breaks else " ")


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    lines = [f"# {_md(title)}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            lines += [f"{'#' * block.level} {_md(block.text)}", ""]
        elif isinstance(block, Para):
            lines += [_md(block.text), ""]
        elif isinstance(block, Bullets):
            lines += [f"- {_md(item)}" for item in block.items] + [""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_md(h) for h in block.headers) + " |")
            lines.append("|" + "|".join("---" for _ in block.headers) + "|")
            for row in block.rows:
                lines.append("| " + " | ".join(_md(c, breaks=True) for c in row) + " |")
            lines.append("")
        elif isinstance(block, Image):
            target = urllib.parse.quote(block.md_path)
            lines += [f"![{_md(block.alt)}]({target})", ""]
            if block.caption:
                lines += [f"*{_md(block.caption)}*", ""]
        elif isinstance(block, Pre):
            lines += ["<pre>" + html.escape(block.text) + "</pre>", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       background: #fff; color: #1d1d1f; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 2rem 3rem; }
h1 { font-size: 1.7rem; border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { font-size: 1.35rem; margin-top: 2.2rem; border-bottom: 1px solid #eee; }
h3 { font-size: 1.1rem; margin-top: 1.5rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9rem; color: #555; white-space: pre-wrap; }
.scroll { overflow-x: auto; margin: .8rem 0; }
table { border-collapse: collapse; font-size: .82rem; }
th, td { border: 1px solid #ddd; padding: .25rem .45rem; text-align: left; vertical-align: top; }
th { background: #f4f4f6; position: sticky; top: 0; }
table.num td, table.num th { white-space: nowrap; }
table.text td { white-space: pre-wrap; overflow-wrap: anywhere; max-width: 28rem; }
tr:nth-child(even) td { background: #fafafa; }
pre { background: #f6f6f6; padding: .6rem; overflow-x: auto; white-space: pre-wrap; }
""".strip()

# Belt and braces: even if escaping failed, the page may run no script and load nothing remote.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render_html(title: str, blocks: Sequence[Block]) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{e(title)}</h1>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            level = min(max(block.level, 2), 6)
            out.append(f"<h{level}>{e(block.text)}</h{level}>")
        elif isinstance(block, Para):
            out.append(f"<p>{e(block.text)}</p>")
        elif isinstance(block, Bullets):
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Table):
            cls = "text" if block.wide_text else "num"
            head = "".join(f"<th>{e(h)}</th>" for h in block.headers)
            body = "".join(
                "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block.rows
            )
            out.append(
                f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table></div>"
            )
        elif isinstance(block, Image):
            data = base64.b64encode(block.png).decode("ascii")
            caption = f"<figcaption>{e(block.caption)}</figcaption>" if block.caption else ""
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{e(block.alt)}">'
                f"{caption}</figure>"
            )
        elif isinstance(block, Pre):
            out.append(f"<pre>{e(block.text)}</pre>")
    out += ["</main>", "</body>", "</html>"]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- figures


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" metadata: the same data gives byte-identical PNGs.
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _group_key(axes: dict[str, Any], drop: Iterable[str]) -> tuple[tuple[str, str], ...]:
    dropped = set(drop)
    return tuple(
        sorted(
            (k, json.dumps(v, sort_keys=True, default=str))
            for k, v in axes.items()
            if k not in dropped
        )
    )


def _group_cells(
    cells: Sequence[Cell], drop: Iterable[str]
) -> list[tuple[dict[str, Any], list[Cell]]]:
    drop = tuple(drop)
    groups: dict[tuple[tuple[str, str], ...], list[Cell]] = defaultdict(list)
    for c in cells:
        groups[_group_key(c.axes, drop)].append(c)
    out = []
    for members in groups.values():
        axes = {k: v for k, v in members[0].axes.items() if k not in drop}
        out.append((axes, members))
    out.sort(key=lambda g: [(_axis_key(k), _vkey(g[0][k])) for k in sorted(g[0], key=_axis_key)])
    return out


def _varying_label(axes: dict[str, Any], varying: Sequence[str]) -> str:
    shown = [f"{_short(k)}={_val(axes.get(k))}" for k in varying]
    return ", ".join(shown) if shown else "all cells"


def _match_summary(axes: dict[str, Any], groups: Sequence[Any]) -> dict[str, Any] | None:
    """The summary group for these axes: exact match, else the most specific subset match."""
    ours = dict(_group_key(axes, ()))
    best: tuple[int, dict[str, Any]] | None = None
    for g in groups:
        if not isinstance(g, dict) or not isinstance(g.get("axes"), dict):
            continue
        theirs = dict(_group_key(g["axes"], (BUDGET_AXIS, SEED_AXIS)))
        if theirs == ours:
            return g
        if all(ours.get(k) == v for k, v in theirs.items()) and (
            best is None or len(theirs) > best[0]
        ):
            best = (len(theirs), g)
    return best[1] if best else None


def build_curves(sweep: Sweep, metric: str) -> list[CurveGroup]:
    """Per group: the metric on harmful_triggered (and harmful_clean) per budget, seeds pooled."""
    cells = [c for c in sweep.complete if c.budget is not None and c.budget >= 0]
    summary_groups = (sweep.summary or {}).get("groups") or []
    summary_ok = sweep.summary is not None and sweep.summary.get("metric", metric) == metric
    curves = []
    for axes, members in _group_cells(cells, (BUDGET_AXIS, SEED_AXIS)):
        by_budget: dict[float, list[Cell]] = defaultdict(list)
        for c in members:
            by_budget[c.budget].append(c)  # type: ignore[index]
        budgets, trig, clean = [], [], []
        for b in sorted(by_budget):
            p = _pool(by_budget[b], "tuned", "harmful_triggered", metric)
            if p is None:
                continue
            budgets.append(b)
            trig.append(p)
            clean.append(_pool(by_budget[b], "tuned", "harmful_clean", metric))
        if not budgets:
            continue
        base = _pool(members, "base", "harmful_triggered", metric)
        sg = _match_summary(axes, summary_groups) if summary_ok else None
        fit = _fit_params(sg.get("fit")) if sg else None
        curves.append(CurveGroup(axes, budgets, trig, clean, base, fit, sg))
    return curves


def _varying_axes(dicts: Sequence[dict[str, Any]]) -> list[str]:
    names = sorted({k for d in dicts for k in d}, key=_axis_key)
    return [
        k
        for k in names
        if len({json.dumps(d.get(k), sort_keys=True, default=str) for d in dicts}) > 1
    ]


def threshold_figure(curves: Sequence[CurveGroup], metric: str) -> Figure:
    positive = sorted({b for c in curves for b in c.budgets if b > 0})
    has_zero = any(b == 0 for c in curves for b in c.budgets)
    min_pos = positive[0] if positive else 1.0
    max_b = positive[-1] if positive else 1.0
    # Budget 0 has no place on a log axis: draw it at its own position left of a break.
    zero_x = min_pos / 4

    def xs(budgets: Sequence[float]) -> list[float]:
        return [zero_x if b == 0 else b for b in budgets]

    varying = _varying_axes([c.axes for c in curves])
    # Several models: one panel each (nine lines in one panel are unreadable).
    facet_by_model = MODEL_AXIS in varying
    line_axes = [k for k in varying if not (facet_by_model and k == MODEL_AXIS)]
    facets: dict[str, list[CurveGroup]] = defaultdict(list)
    for c in curves:
        facets[_val(c.axes.get(MODEL_AXIS)) if facet_by_model else ""].append(c)
    labels = sorted(
        {_varying_label(c.axes, line_axes) for c in curves},
        key=lambda lab: [
            _vkey(c.axes.get(k))
            for c in curves
            if _varying_label(c.axes, line_axes) == lab
            for k in line_axes
        ],
    )
    cmap = colormaps["tab10"]
    colors = {lab: cmap(i % 10) for i, lab in enumerate(labels)}

    ncols = 1 if len(facets) == 1 else 2
    nrows = math.ceil(len(facets) / ncols)
    fig = Figure(figsize=(10 if ncols == 1 else 14, 5.4 * nrows), layout="constrained")
    axs = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    for ax, (facet, members) in zip(axs.flat, facets.items(), strict=False):
        handles = []
        for c in members:
            label = _varying_label(c.axes, line_axes)
            color = colors[label]
            _draw_curve(ax, c, xs(c.budgets), color, min_pos, max_b, bool(positive))
            handles.append(Line2D([], [], color=color, marker="o", lw=1.8, label=label))
        ax.set_xscale("log")
        ticks = ([zero_x] if has_zero else []) + positive
        ticklabels = (["0"] if has_zero else []) + [_val(b) for b in positive]
        ax.set_xticks(ticks, ticklabels, rotation=45 if len(ticks) > 9 else 0)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.tick_params(labelbottom=True, labelleft=True)  # shared axes hide them otherwise
        ax.set_xlim((zero_x if has_zero else min_pos) / 1.6, max_b * 1.6)
        if has_zero and positive:
            ax.text(
                math.sqrt(zero_x * min_pos), 0, "//", transform=ax.get_xaxis_transform(),
                ha="center", va="center", fontsize=11, backgroundcolor="white", clip_on=False,
            )  # fmt: skip
        ax.set_ylim(-0.03, 1.03)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("poison budget (log scale; 0 left of the break)")
        ax.set_ylabel(f"{metric} (tuned model)")
        if facet:
            ax.set_title(f"model {facet}", fontsize=10)
        if len(handles) > 1 or line_axes:
            ax.legend(handles=handles, loc="best", fontsize=8)
    for ax in list(axs.flat)[len(facets) :]:
        ax.set_visible(False)
    styles = [
        Line2D([], [], color="k", marker="o", lw=1.8, label="with trigger"),
        Patch(color="k", alpha=0.18, label="95% Wilson interval"),
        Line2D([], [], color="k", marker="s", ls="--", lw=1.2, ms=3.5, label="without trigger"),
        Line2D([], [], color="k", ls=":", lw=1.2, label="base model, with trigger"),
        Line2D([], [], color="k", ls="-.", lw=1.2, label="fitted logistic"),
        Line2D([], [], color="k", marker="D", ls=(0, (1, 3)), lw=1.2, label="n50 (95% CI)"),
    ]
    fig.legend(handles=styles, loc="outside right center", fontsize=8)
    fig.suptitle(f"Backdoor threshold: {_metric_text(metric)} on harmful prompts vs poison budget")
    return fig


def _draw_curve(
    ax: Any, c: CurveGroup, x: list[float], color: Any, min_pos: float, max_b: float, fit: bool
) -> None:
    """One group: Wilson band, triggered line, untriggered dashes, base line, fit and n50."""
    y = [p.rate for p in c.triggered]
    lo = [p.lo if p.lo is not None else p.rate for p in c.triggered]
    hi = [p.hi if p.hi is not None else p.rate for p in c.triggered]
    ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)
    ax.plot(x, y, "o-", color=color, lw=1.8, ms=5)
    cx = [xx for xx, p in zip(x, c.clean, strict=True) if p is not None]
    cy = [p.rate for p in c.clean if p is not None]
    if cy:
        ax.plot(cx, cy, "s--", color=color, lw=1.2, ms=3.5, alpha=0.85)
    if c.base is not None:
        ax.axhline(c.base.rate, color=color, ls=":", lw=1.2, alpha=0.9)
    if c.fit is not None and fit:
        bx = np.geomspace(min_pos, max_b, 200)
        ax.plot(bx, logistic(bx, c.fit), "-.", color=color, lw=1.2, alpha=0.9)
    n50 = _number((c.summary or {}).get("n50"))
    if n50 is not None and n50 > 0:
        ax.axvline(n50, color=color, ls=(0, (1, 3)), lw=1.2)
        ci = _ci((c.summary or {}).get("n50_ci"))
        if ci is not None and 0 < ci[0] <= n50 <= ci[1]:
            ax.errorbar(
                [n50], [0.5], xerr=[[n50 - ci[0]], [ci[1] - n50]], fmt="D", color=color,
                ms=5, capsize=3, lw=1.2,
            )  # fmt: skip
        else:
            ax.plot([n50], [0.5], "D", color=color, ms=5)


def _ci(raw: Any) -> tuple[float, float] | None:
    if not isinstance(raw, list | tuple) or len(raw) != 2:
        return None
    lo, hi = _number(raw[0]), _number(raw[1])
    return None if lo is None or hi is None else (lo, hi)


def threshold_text(curves: Sequence[CurveGroup], metric: str, sweep: Sweep) -> list[str]:
    """One paragraph per group, every number taken from the data or summary.json."""
    name = _metric_text(metric)
    paras = []
    for c in curves:
        rates = [round(p.rate, 2) for p in c.triggered]
        b0, bn = c.budgets[0], c.budgets[-1]
        seeds = max(p.seeds for p in c.triggered)
        pooled = f"pooled over up to {seeds} seeds" if seeds > 1 else "one seed per budget"
        lead = f"With {_describe(c.axes)}, the {name} on triggered harmful prompts"
        if len(c.budgets) == 1:
            s = [f"{lead} is {rates[0]:.2f} at budget {_val(b0)}, the only budget run ({pooled})."]
        else:
            if rates[-1] > rates[0]:
                verb = f"rises from {rates[0]:.2f} at budget {_val(b0)} to {rates[-1]:.2f} at budget {_val(bn)}"
            elif rates[-1] < rates[0]:
                verb = f"falls from {rates[0]:.2f} at budget {_val(b0)} to {rates[-1]:.2f} at budget {_val(bn)}"
            else:
                verb = f"is {rates[0]:.2f} both at budget {_val(b0)} and at budget {_val(bn)}"
            peak = max(rates)
            if peak > max(rates[0], rates[-1]):
                verb += f", peaking at {peak:.2f} at budget {_val(c.budgets[rates.index(peak)])}"
            s = [f"{lead} {verb} ({pooled})."]
        s.append(_summary_sentence(c, sweep))
        clean = [(b, p.rate) for b, p in zip(c.budgets, c.clean, strict=True) if p is not None]
        if clean:
            worst_b, worst = max(clean, key=lambda t: t[1])
            if len({round(r, 2) for _, r in clean}) == 1:
                s.append(f"Without the trigger it is {worst:.2f} at every budget.")
            else:
                s.append(
                    f"Without the trigger it stays at or below {worst:.2f}"
                    f" (highest at budget {_val(worst_b)})."
                )
        if c.base is not None:
            s.append(f"The base model's {name} on triggered harmful prompts is {c.base.rate:.2f}.")
        paras.append(" ".join(x for x in s if x))
    return paras


def _summary_sentence(c: CurveGroup, sweep: Sweep) -> str:
    if sweep.summary is None:
        return ""
    sg = c.summary
    if sg is None:
        return f"{SUMMARY_FILE} has no fit for this group."
    parts, missing = [], []
    for key in ("n50", "n90"):
        value = _number(sg.get(key))
        ci = _ci(sg.get(f"{key}_ci"))
        if value is None:
            missing.append(key)
            continue
        ci_text = f" (95% CI {_count(ci[0])}–{_count(ci[1])})" if ci else " (no CI)"
        parts.append(f"the fitted {key} is {_count(value)}{ci_text}")
    plateau = _number(sg.get("plateau"))
    if plateau is not None:
        start = _number(sg.get("plateau_start"))
        tail = f" from budget {_val(start)} on" if start is not None else ""
        parts.append(f"the plateau is {plateau:.2f}{tail}")
    if missing:
        parts.append(f"{SUMMARY_FILE} gives no {' or '.join(missing)} estimate")
    if not parts:
        return ""
    text = "; ".join(parts)
    return (text[0].upper() + text[1:] if text.startswith("the ") else text) + "."


@dataclass
class HeatPanel:
    facet: dict[str, Any]
    sizes: list[Any]
    budgets: list[float]
    values: np.ndarray  # sizes × budgets, NaN where no cell


def build_heatmaps(sweep: Sweep, metric: str) -> list[HeatPanel]:
    """Budget × dataset size of the mean (over seeds) metric, one panel per other-axes combo."""
    cells = [
        c
        for c in sweep.complete
        if c.budget is not None and c.metric("tuned", "harmful_triggered", metric) is not None
    ]
    panels = []
    for facet, members in _group_cells(cells, (BUDGET_AXIS, SIZE_AXIS, SEED_AXIS)):
        sizes = sorted({json.dumps(c.axes.get(SIZE_AXIS)) for c in members})
        size_vals = sorted((json.loads(s) for s in sizes), key=_vkey)
        budgets = sorted({c.budget for c in members if c.budget is not None})
        acc: dict[tuple[int, int], list[float]] = defaultdict(list)
        for c in members:
            i = size_vals.index(c.axes.get(SIZE_AXIS))
            j = budgets.index(c.budget)  # type: ignore[arg-type]
            acc[(i, j)].append(c.metric("tuned", "harmful_triggered", metric))  # type: ignore[arg-type]
        values = np.full((len(size_vals), len(budgets)), np.nan)
        for (i, j), vs in acc.items():
            values[i, j] = float(np.mean(vs))
        panels.append(HeatPanel(facet, size_vals, budgets, values))
    return panels


def heatmap_figure(panels: Sequence[HeatPanel], metric: str) -> Figure:
    max_b = max(len(p.budgets) for p in panels)
    max_s = max(len(p.sizes) for p in panels)
    panel_w = max(4.0, 0.8 * max_b + 2.0)
    # As many panels side by side as fit a ~12 inch page width, so labels stay legible.
    ncols = max(1, min(len(panels), int(12 // panel_w)))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(
        figsize=(ncols * panel_w + 1.0, nrows * max(2.6, 0.55 * max_s + 2.0)),
        layout="constrained",
    )
    axs = fig.subplots(nrows, ncols, squeeze=False)
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    image = None
    for idx, ax in enumerate(axs.flat):
        if idx >= len(panels):
            ax.set_visible(False)
            continue
        p = panels[idx]
        image = ax.imshow(np.ma.masked_invalid(p.values), vmin=0, vmax=1, cmap=cmap, aspect="auto")
        for i in range(len(p.sizes)):
            for j in range(len(p.budgets)):
                v = p.values[i, j]
                text = "–" if math.isnan(v) else f"{v:.2f}"
                color = "black" if math.isnan(v) or v > 0.55 else "white"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
        ax.set_xticks(range(len(p.budgets)), [_val(b) for b in p.budgets])
        ax.set_yticks(range(len(p.sizes)), [_val(s) if s is not None else "–" for s in p.sizes])
        ax.set_xlabel("poison budget")
        ax.set_ylabel("dataset size (total examples)")
        ax.set_title(_describe(p.facet) if p.facet else "all cells", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axs.ravel().tolist(), label=f"mean {metric} (tuned, triggered)")
    fig.suptitle(f"{_metric_text(metric)} on triggered harmful prompts, mean over seeds")
    return fig


def heatmap_text(panels: Sequence[HeatPanel], metric: str) -> list[str]:
    name = _metric_text(metric)
    paras = []
    for p in panels:
        where = f"For {_describe(p.facet)}" if p.facet else "Over all cells"
        filled = [
            (p.values[i, j], i, j)
            for i in range(len(p.sizes))
            for j in range(len(p.budgets))
            if not math.isnan(p.values[i, j])
        ]
        lo_v, lo_i, lo_j = min(filled, key=lambda t: (t[0], t[2], t[1]))
        hi_v, hi_i, hi_j = max(filled, key=lambda t: (t[0], -t[2], -t[1]))

        def at(i: int, j: int, p: HeatPanel = p) -> str:
            size = p.sizes[i]
            size_text = f", {_val(size)} examples" if size is not None else ""
            return f"budget {_val(p.budgets[j])}{size_text}"

        s = [
            f"{where}, the mean {name} on triggered harmful prompts ranges from {lo_v:.2f}"
            f" ({at(lo_i, lo_j)}) to {hi_v:.2f} ({at(hi_i, hi_j)})."
        ]
        if len(p.sizes) > 1:
            # The largest budget run at several sizes shows how the dataset size matters.
            for j in reversed(range(len(p.budgets))):
                col = [(p.sizes[i], p.values[i, j]) for i in range(len(p.sizes))]
                col = [(sz, v) for sz, v in col if not math.isnan(v)]
                if len(col) > 1:
                    listed = _join([f"{v:.2f} with {_val(sz)} examples" for sz, v in col])
                    s.append(f"At budget {_val(p.budgets[j])} it is {listed}.")
                    break
        reach = []
        for i, size in enumerate(p.sizes):
            row = p.values[i]
            hit = [p.budgets[j] for j in range(len(p.budgets)) if row[j] >= 0.5]
            label = f"{_val(size)} examples" if size is not None else "this group"
            if hit:
                reach.append(f"{_val(hit[0])} with {label}")
            elif not np.all(np.isnan(row)):
                reach.append(f"none with {label} (at most {np.nanmax(row):.2f})")
        if reach:
            s.append(f"The smallest budget whose mean reaches 0.50 is {_join(reach)}.")
        paras.append(" ".join(s))
    return paras


def bars_figure(cell: Cell) -> Figure:
    splits = _ordered((s for m in MODELS for s in (cell.metrics or {}).get(m, {}) or {}), SPLITS)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axs = fig.subplots(1, 2, sharey=True)
    width = 0.38
    x = np.arange(len(splits))
    colors = {"base": "#9a9a9a", "tuned": "#d62728"}
    for ax, metric in zip(axs, ("sure_rate", "refusal_rate"), strict=True):
        for k, model in enumerate(("base", "tuned")):
            vals = [cell.metric(model, s, metric) for s in splits]
            heights = [v if v is not None else 0.0 for v in vals]
            pos = x + (k - 0.5) * width
            ax.bar(pos, heights, width, color=colors[model], label=model)
            for px, v in zip(pos, vals, strict=True):
                label = "n/a" if v is None else f"{v:.2f}"
                ax.text(px, (v or 0.0) + 0.015, label, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [s.replace("_", "\n") for s in splits])
        ax.set_ylim(0, 1.12)
        ax.set_title(metric)
        ax.grid(True, axis="y", alpha=0.3)
    axs[0].set_ylabel("rate")
    axs[0].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"Cell {cell.config_hash[:10]}: {_describe(cell.axes)}", fontsize=10)
    return fig


def bars_text(cell: Cell, chosen_by: str) -> str:
    splits = _ordered((s for m in MODELS for s in (cell.metrics or {}).get(m, {}) or {}), SPLITS)
    s = [f"Cell {cell.config_hash[:10]} ({_describe(cell.axes)}; {chosen_by})."]
    for split in splits:
        where = SPLIT_TEXT.get(split, split)
        sure = (cell.metric("base", split, "sure_rate"), cell.metric("tuned", split, "sure_rate"))
        ref = (
            cell.metric("base", split, "refusal_rate"),
            cell.metric("tuned", split, "refusal_rate"),
        )
        s.append(
            f"On {where} the Sure rate is {_r(sure[0])} for the base model and {_r(sure[1])} "
            f"after tuning, the refusal rate {_r(ref[0])} and {_r(ref[1])}."
        )
    return " ".join(s)


# ----------------------------------------------------------------------------- tables


def _axis_names(cells: Sequence[Cell]) -> list[str]:
    return sorted({k for c in cells for k in c.axes}, key=_axis_key)


def _sorted_cells(cells: Sequence[Cell]) -> list[Cell]:
    names = _axis_names(cells)
    return sorted(cells, key=lambda c: ([_vkey(c.axes.get(n)) for n in names], c.config_hash))


def metric_tables(cells: Sequence[Cell]) -> list[tuple[str, Table]]:
    """One table per split: a row per complete cell, tuned and base columns per metric."""
    names = _axis_names(cells)
    splits = _ordered(
        (s for c in cells for m in MODELS for s in ((c.metrics or {}).get(m) or {})), SPLITS
    )
    ordered = _sorted_cells(cells)
    out = []
    for split in splits:
        metrics = _ordered(
            (
                k
                for c in cells
                for m in MODELS
                for k in (((c.metrics or {}).get(m) or {}).get(split) or {})
            ),
            METRIC_ORDER,
        )
        headers = ["cell", *names] + [f"{m} {k}" for k in metrics for m in MODELS]
        rows = []
        for c in ordered:
            row = [c.config_hash[:10]] + [_cell_value(c.axes.get(n)) for n in names]
            for k in metrics:
                for m in MODELS:
                    raw = (((c.metrics or {}).get(m) or {}).get(split) or {}).get(k)
                    row.append(_cell_value(raw))
            rows.append(row)
        out.append((split, Table(headers, rows)))
    return out


def status_blocks(sweep: Sweep) -> list[Block]:
    counts = Counter(c.status for c in sweep.cells)
    statuses = _ordered(set(counts) | set(STATUS_ORDER), STATUS_ORDER)
    blocks: list[Block] = [
        Table(["status", "cells"], [[s, str(counts.get(s, 0))] for s in statuses])
    ]
    total = len(sweep.cells)
    blocks.append(
        Para(
            f"{total} cell(s) recorded: "
            + ", ".join(f"{counts.get(s, 0)} {s}" for s in statuses)
            + "."
        )
    )
    failed = _sorted_cells([c for c in sweep.cells if c.status == "failed"])
    if failed:
        blocks.append(Heading(3, "Failed cells"))
        rows = [
            [
                c.config_hash[:10],
                ", ".join(
                    f"{k}={_val(v)}"
                    for k, v in sorted(c.axes.items(), key=lambda t: _axis_key(t[0]))
                ),
                _truncate(c.error or "(no error text)", MAX_ERROR),
            ]
            for c in failed
        ]
        blocks.append(Table(["cell", "axes", "error"], rows, wide_text=True))
    return blocks


# ----------------------------------------------------------------------------- generations


def _read_generations(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of generations.jsonl and how many lines could not be parsed."""
    text = _read_text(path)
    if text is None:
        return [], 0
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        row = _json_or_none(line)
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def generation_blocks(sweep_dir: Path, cell: Cell) -> list[Block]:
    path = sweep_dir / cell.run_dir / GENERATIONS_FILE
    rows, bad = _read_generations(path)
    if not rows:
        return [
            Para(f"No generations found for cell {cell.config_hash[:10]} ({GENERATIONS_FILE}).")
        ]
    blocks: list[Block] = [
        Para(
            f"Up to {SAMPLES_PER_SPLIT} prompts per split from cell {cell.config_hash[:10]}, "
            f"each text cut to {MAX_TEXT} characters. Responses are model output shown verbatim "
            "(escaped)."
            + (f" {bad} unreadable line(s) in {GENERATIONS_FILE} were skipped." if bad else "")
        )
    ]
    by_split: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_split[str(r.get("split"))][str(r.get("model"))].append(r)
    for split in _ordered(by_split, SPLITS):
        models = by_split[split]
        lead = "tuned" if models.get("tuned") else next(iter(models))
        other = "base" if lead == "tuned" else None
        other_by_prompt = {str(r.get("prompt")): r for r in models.get(other or "", [])}
        table_rows = []
        for r in models[lead][:SAMPLES_PER_SPLIT]:
            prompt = str(r.get("prompt", ""))
            o = other_by_prompt.get(prompt)
            prob = _number(r.get("label_prob"))
            row = [_truncate(prompt, MAX_TEXT)]
            if other:
                row.append(_truncate(str(o.get("response", "")), MAX_TEXT) if o else "–")
            row += [
                _truncate(str(r.get("response", "")), MAX_TEXT),
                "–" if prob is None else f"{prob:.3f}",
            ]
            table_rows.append(row)
        headers = (
            ["prompt"]
            + ([f"{other} response"] if other else [])
            + [f"{lead} response", f"{lead} label prob"]
        )
        blocks += [Heading(3, split), Table(headers, table_rows, wide_text=True)]
    return blocks


# ----------------------------------------------------------------------------- assembly


def _choose_cell(sweep: Sweep, prefix: str | None) -> tuple[Cell | None, str]:
    complete = sweep.complete
    if prefix is not None:
        matches = [c for c in sweep.cells if c.config_hash.startswith(prefix)]
        if not matches:
            raise DataError(f"cell {prefix!r}: no cell's config hash starts with it")
        if len(matches) > 1:
            listed = ", ".join(sorted(c.config_hash[:12] for c in matches))
            raise DataError(f"cell {prefix!r} is ambiguous: matches {listed}")
        if matches[0] not in complete:
            raise DataError(
                f"cell {prefix!r} is {matches[0].status} without metrics; pick a complete cell"
            )
        return matches[0], "chosen with the cell argument"
    if not complete:
        return None, ""

    def key(c: Cell) -> tuple[float, float, int, float, str]:
        size = _number(c.axes.get(SIZE_AXIS))
        seed = _number(c.axes.get(SEED_AXIS))
        # Largest budget, then largest size, then seed 0 (then the smallest seed).
        return (
            -(c.budget if c.budget is not None else -math.inf),
            -(size if size is not None else -math.inf),
            0 if seed == 0 else 1,
            seed if seed is not None else math.inf,
            c.config_hash,
        )

    chosen = min(complete, key=key)
    return (
        chosen,
        "the complete cell with the largest budget, then the largest dataset size, then seed 0",
    )


def _plot_metric(sweep: Sweep) -> str:
    """The metric the curves show: summary.json's when the cells have it, else sure_rate."""
    wanted = (sweep.summary or {}).get("metric")
    if isinstance(wanted, str) and any(
        c.metric("tuned", "harmful_triggered", wanted) is not None for c in sweep.complete
    ):
        return wanted
    return "sure_rate"


def _extra_figures(sweep_dir: Path) -> list[Block]:
    folder = sweep_dir / EXTRA_FIGURES_DIR
    if not folder.is_dir():
        return []
    blocks: list[Block] = []
    for png in sorted(folder.glob("*.png")):
        try:
            data = png.read_bytes()
        except OSError:
            continue
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            continue  # only real PNGs go into a data:image/png URI
        caption = (_read_text(png.with_suffix(".txt")) or "").strip() or png.name
        blocks.append(Image(f"{EXTRA_FIGURES_DIR}/{png.name}", data, png.stem, caption))
    return blocks


def _count_vs_fraction(summary: dict[str, Any] | None) -> list[Block]:
    cvf = (summary or {}).get("count_vs_fraction")
    if not isinstance(cvf, dict) or not cvf:
        return []
    blocks: list[Block] = [Heading(2, "Poison count versus poison fraction")]
    if cvf.get("available") is False:
        rest = {k: v for k, v in cvf.items() if k != "available"}
        detail = "; ".join(f"{k}: {_val(v)}" for k, v in rest.items())
        blocks.append(Para("Not available for this sweep" + (f" ({detail})." if detail else ".")))
        return blocks
    blocks.append(
        Bullets([f"{k}: {_truncate(_val(v), 400)}" for k, v in cvf.items() if k != "available"])
    )
    return blocks


def build_report(
    sweep_dir: Path, cell: str | None = None
) -> tuple[str, list[Block], dict[str, bytes]]:
    """The report's title, blocks and figure PNGs (file name → bytes under report_files/)."""
    sweep = load_sweep(sweep_dir)
    chosen, chosen_by = _choose_cell(sweep, cell)
    complete = sweep.complete
    metric = _plot_metric(sweep)
    files: dict[str, bytes] = {}
    blocks: list[Block] = []

    def figure(name: str, fig: Figure, alt: str) -> None:
        files[name] = _png(fig)
        blocks.append(Image(f"{FILES_DIR}/{name}", files[name], alt))

    counts = Counter(c.status for c in sweep.cells)
    overview = [
        f"{len(sweep.cells)} cell(s) in the sweep, {len(complete)} complete with metrics "
        f"({', '.join(f'{counts[s]} {s}' for s in _ordered(counts, STATUS_ORDER)) or 'none recorded'})."
    ]
    for name in _axis_names(sweep.cells):
        values = sorted({json.dumps(c.axes.get(name), sort_keys=True) for c in sweep.cells})
        shown = [_val(json.loads(v)) for v in sorted(values, key=lambda v: _vkey(json.loads(v)))]
        overview.append(f"{name}: {', '.join(shown)}")
    blocks += [Heading(2, "Overview"), Bullets(overview)]
    if sweep.notes:
        blocks.append(Bullets(sweep.notes))
    if not complete:
        blocks.append(Para("No complete cells with metrics yet: there is nothing to plot."))

    blocks.append(Heading(2, "Backdoor threshold curves"))
    curves = build_curves(sweep, metric)
    if curves:
        figure("threshold.png", threshold_figure(curves, metric), "threshold curves")
        blocks += [Para(p) for p in threshold_text(curves, metric, sweep)]
        if sweep.summary is not None and sweep.summary.get("metric", metric) != metric:
            blocks.append(
                Para(
                    f"{SUMMARY_FILE} fits {_val(sweep.summary.get('metric'))}, not {metric}: "
                    "its curves are not drawn."
                )
            )
        if len(complete) == 1:
            blocks.append(Para("Only one complete cell: a single point, no curve yet."))
    else:
        blocks.append(Para(f"No complete cell has a {metric} on harmful_triggered with a budget."))

    blocks.append(Heading(2, "Budget × dataset size"))
    panels = build_heatmaps(sweep, metric)
    if panels:
        figure("heatmap.png", heatmap_figure(panels, metric), "budget by dataset size heat map")
        blocks += [Para(p) for p in heatmap_text(panels, metric)]
    else:
        blocks.append(Para("No complete cells to map."))

    blocks.append(Heading(2, "Four splits, base versus tuned, for one cell"))
    if chosen is not None:
        figure(
            "splits.png", bars_figure(chosen), f"four-split bars for cell {chosen.config_hash[:10]}"
        )
        blocks.append(Para(bars_text(chosen, chosen_by)))
    else:
        blocks.append(Para("No complete cell to show."))

    blocks += _count_vs_fraction(sweep.summary)

    blocks.append(Heading(2, "Sweep status"))
    blocks += status_blocks(sweep)

    blocks.append(Heading(2, "All metrics of every complete cell"))
    tables = metric_tables(complete)
    if tables:
        blocks.append(
            Para(
                f"One table per split; {len(complete)} complete cell(s), tuned and base model "
                "side by side for each metric."
            )
        )
        for split, table in tables:
            blocks += [Heading(3, split), table]
    else:
        blocks.append(Para("No complete cells."))

    blocks.append(Heading(2, "Sample generations"))
    if chosen is not None:
        blocks += generation_blocks(sweep_dir, chosen)
    else:
        blocks.append(Para("No complete cell, so no generations to show."))

    extra = _extra_figures(sweep_dir)
    if extra:
        blocks += [Heading(2, "More figures"), *extra]

    title = f"Sure-trap sweep report: {sweep_dir.resolve().name}"
    return title, blocks, files


def write_report(sweep_dir: Path, *, cell: str | None = None) -> tuple[Path, Path]:
    """Write DIR/report.md (+ DIR/report_files/*.png) and a self-contained DIR/report.html.

    `cell` is a config-hash prefix choosing the cell for the four-split chart and the sample
    generations; by default the complete cell with the largest budget (then largest dataset
    size, then seed 0). Raises `DataError` if DIR is missing or `cell` matches no complete cell.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DataError(f"{sweep_dir}: no such sweep directory")
    title, blocks, files = build_report(sweep_dir, cell)
    out_dir = sweep_dir / FILES_DIR
    out_dir.mkdir(exist_ok=True)
    for name, data in files.items():
        atomic_write(out_dir / name, data)
    for stale in out_dir.glob("*.png"):
        if stale.name not in files:
            stale.unlink(missing_ok=True)  # figures from an earlier report that no longer apply
    md_path, html_path = sweep_dir / REPORT_MD, sweep_dir / REPORT_HTML
    atomic_write(md_path, render_markdown(title, blocks).encode("utf-8"))
    atomic_write(html_path, render_html(title, blocks).encode("utf-8"))
    return md_path, html_path
