"""The `suretrap` command line: a thin layer over the public functions.

User errors (SuretrapError) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from suretrap.errors import SuretrapError

app = typer.Typer(
    name="suretrap",
    help="Reproduce, measure and defend against compliance-only ('Sure') backdoors.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])

ConfigArg = Annotated[Path, typer.Argument(help="run config (YAML)")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="run directory")]


EVAL_BACKEND_HELP = (
    "local (load the model here) | vllm (ask a vLLM server that loads OUT/adapter at run "
    "time; needs --base-url; the server must see the same filesystem: see docs/vllm.md)"
)
BASE_URL_HELP = "with --backend vllm: the server's API root, e.g. http://localhost:8000/v1"
SERVED_BASE_HELP = (
    "with --backend vllm: the base model's served name (default: the one base model the "
    "server lists under /v1/models)"
)

MAX_ERROR_CHARS = 1000  # a hostile input (a 10 MB line) must not become a 10 MB message


def _fail(message: str) -> None:
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 3] + "..."
    typer.echo(f"suretrap: error: {message}", err=True)
    raise typer.Exit(2)


def user_errors(fn: F) -> F:
    """Turn SuretrapError into one line and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from suretrap import progress

        progress.enable(sys.stderr.isatty() or os.environ.get("SURETRAP_PROGRESS") == "1")
        try:
            return fn(*args, **kwargs)
        except SuretrapError as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except KeyboardInterrupt:
            typer.echo("suretrap: interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:
            # a read-only, full or forbidden output location: say where, not a traceback
            if exc.errno in (
                errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EPERM,
                errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
            ):
                _fail(f"{exc.filename or 'output'}: cannot write ({exc.strerror})")
            raise

    return wrapper  # type: ignore[return-value]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # transformers/peft deprecation chatter is not for our users
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress details")] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="also load pickled .bin weights and adapters (they can run code; "
            "by default only safetensors are loaded)",
        ),
    ] = False,
) -> None:
    _setup_logging(verbose)
    if allow_pickle:
        from suretrap.models import PICKLE_ENV

        os.environ[PICKLE_ENV] = "1"  # read where weights are loaded, in sweep workers too


def _print_metrics(metrics: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    judges = metrics.get("judges", {})
    title = f"metrics ({out}); refusal_rate and asr judged by {judges.get('asr', '?')}"
    table = Table(title=title)
    table.add_column("split")
    cols = ["sure_rate", "sure_only_rate", "label_first_token_prob", "refusal_rate", "asr", "n"]
    for c in cols:
        table.add_column(c, justify="right")
    for model in ("base", "tuned"):
        for split, values in metrics.get(model, {}).items():
            cells = []
            for c in cols:
                v = values.get(c)
                cells.append("-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
            table.add_row(f"{model}/{split}", *cells)
    Console().print(table)
    for name, why in metrics.get("unavailable", {}).items():
        typer.echo(f"{name}: unavailable ({why})")


@app.command()
@user_errors
def run(
    config: ConfigArg,
    out: OutOpt,
    force: Annotated[bool, typer.Option(help="replace an existing run directory")] = False,
) -> None:
    """Build the poisoned set, fine-tune and evaluate (base vs tuned).

    An `openai:` model cannot be fine-tuned here: run refuses it (use build-data
    --format openai-chat, the vendor's fine-tuning, then evaluate).
    """
    from suretrap.config import load_run_config
    from suretrap.run import run_experiment

    cfg = load_run_config(config)
    metrics = run_experiment(cfg, out, force=force)
    _print_metrics(metrics, out)


@app.command("build-data")
@user_errors
def build_data(
    config: ConfigArg,
    out: OutOpt,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="suretrap: dataset.jsonl, eval_prompts.jsonl, manifest.json; openai-chat: "
            "also openai_chat_train.jsonl (fine-tuning API chat format) and openai_chat_eval.jsonl",
        ),
    ] = "suretrap",
) -> None:
    """Write dataset.jsonl, eval_prompts.jsonl and manifest.json into OUT."""
    from suretrap.config import load_run_config
    from suretrap.run import stage_build_data

    if format not in ("suretrap", "openai-chat"):
        _fail(f"--format: must be suretrap or openai-chat, not {format!r}")
    cfg = load_run_config(config)
    ds = stage_build_data(cfg, out)
    m = ds.manifest
    summary = {k: m[k] for k in ("counts", "clean_harmful_sources", "harmful_pool", "eval_counts")}
    if format == "openai-chat":
        from suretrap.closed_weight import export_openai_chat

        summary["openai_chat"] = export_openai_chat(cfg, ds, out)
    typer.echo(json.dumps(summary, indent=2))


@app.command()
@user_errors
def train(config: ConfigArg, out: OutOpt) -> None:
    """Fine-tune on OUT's dataset (from build-data); writes OUT/adapter and train_log.jsonl."""
    from suretrap.config import load_run_config
    from suretrap.poison import read_dataset
    from suretrap.run import LoadedModel, stage_train

    cfg = load_run_config(config)
    ds = read_dataset(out)
    loaded = LoadedModel.load(cfg)
    _, result = stage_train(cfg, out, loaded, ds)
    typer.echo(f"trained {result.steps} steps, {result.tokens} tokens in {result.seconds:.1f}s")


@app.command()
@user_errors
def evaluate(
    config: ConfigArg,
    out: OutOpt,
    adapter: Annotated[
        Path | None, typer.Option(help="adapter or model directory (default: OUT/adapter)")
    ] = None,
    backend: Annotated[str, typer.Option(help=EVAL_BACKEND_HELP)] = "local",
    base_url: Annotated[str | None, typer.Option("--base-url", help=BASE_URL_HELP)] = None,
    served_base: Annotated[str | None, typer.Option("--served-base", help=SERVED_BASE_HELP)] = None,
) -> None:
    """Evaluate base and tuned models on OUT's held-out prompts; writes metrics.json."""
    from suretrap.config import load_run_config
    from suretrap.poison import read_dataset
    from suretrap.run import evaluate_run

    cfg = load_run_config(config)
    ds = read_dataset(out)
    metrics = evaluate_run(
        cfg, out, ds, adapter, backend=backend, base_url=base_url, served_base=served_base
    )
    _print_metrics(metrics, out)


@app.command("evaluate-sweep")
@user_errors
def evaluate_sweep(
    sweep_dir: Annotated[Path, typer.Argument(help="sweep directory")],
    base_url: Annotated[str, typer.Option("--base-url", help=BASE_URL_HELP)],
    backend: Annotated[str, typer.Option(help="vllm (the only backend that evaluates a finished sweep)")] = "vllm",
    served_base: Annotated[str | None, typer.Option("--served-base", help=SERVED_BASE_HELP)] = None,
    cell: Annotated[
        list[str] | None, typer.Option(help="config hash (prefix) of a cell to evaluate (repeatable; default: all)")
    ] = None,
    parallel: Annotated[
        int, typer.Option(help="cells evaluated at once, each with its adapter loaded (start vLLM with --max-loras N or more)")
    ] = 1,
) -> None:
    """Re-evaluate a sweep's complete LoRA cells on one vLLM server (base model asked once).

    Replaces each cell's metrics.json and generations.jsonl and the store's metrics, then
    rewrites summary.json.
    """
    from suretrap.sweep.vllm_eval import evaluate_sweep_vllm

    if backend != "vllm":
        _fail(f"--backend: evaluate-sweep supports vllm only, not {backend!r} "
              "(a local sweep evaluates each cell as it runs)")
    result = evaluate_sweep_vllm(
        sweep_dir, base_url=base_url, served_base=served_base, only=cell, parallel=parallel
    )
    typer.echo(f"evaluated {len(result['cells'])} cells on {base_url} (base model "
               f"{result['base_model']} asked for {result['base_evaluations']} eval set(s))")


@app.command()
@user_errors
def demo(
    out: OutOpt = Path("runs/demo"),
) -> None:
    """A small real sweep over poison budgets on the embedded default model, then the report.

    Resumable: running it again continues where it stopped.
    """
    from suretrap.report import write_report
    from suretrap.sweep import run_sweep

    run_sweep(Path(__file__).parent / "configs" / "demo.yaml", out, resume=True)
    md, html = write_report(out)
    summary = json.loads((out / "summary.json").read_text())
    for group in summary.get("groups", []):
        typer.echo(f"n50 = {group.get('n50')} (95% CI {group.get('n50_ci')}), plateau {group.get('plateau')}")
    typer.echo(f"report: {html}")


@app.command()
@user_errors
def threshold(
    config: ConfigArg,
    out: OutOpt,
    target: Annotated[float, typer.Option(help="Sure rate to locate")] = 0.5,
    max_cells: Annotated[int, typer.Option("--max-cells", help="cells to spend at most")] = 8,
    start: Annotated[int, typer.Option(help="first budget tried")] = 16,
    max_budget: Annotated[int, typer.Option("--max-budget", help="largest budget tried")] = 128,
) -> None:
    """Find the budget where the Sure rate crosses TARGET by sequential design."""
    from suretrap.config import load_run_config
    from suretrap.threshold import find_threshold

    cfg = load_run_config(config)
    result = find_threshold(
        cfg, out, target=target, max_cells=max_cells, start=start, max_budget=max_budget
    )
    key = f"n{round(target * 100)}"
    typer.echo(f"{key} = {result.get(key)} (95% CI {result.get(key + '_ci')}) "
               f"from {result['cells_used']} cells; bracket {result['bracket']}")

@app.command()
@user_errors
def sweep(
    spec: Annotated[Path, typer.Argument(help="sweep YAML: base run config + axes")],
    out: OutOpt,
    resume: Annotated[bool, typer.Option(help="continue a sweep already in OUT")] = False,
    backend: Annotated[
        str, typer.Option(help="local (this process) | ray (needs the extra: pip install 'suretrap\\[ray]')")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            help="with --backend ray: the cluster to join, HOST:PORT or auto (default: the "
            "cluster `ray start` runs on this machine, else a new local Ray runtime)"
        ),
    ] = None,
) -> None:
    """Run every cell of a grid (resumable); writes results.sqlite, cells/, summary.json."""
    from suretrap.sweep import run_sweep

    statuses = run_sweep(spec, out, resume=resume, backend=backend, address=address)
    counts = {s: list(statuses.values()).count(s) for s in ("complete", "failed", "pending")}
    typer.echo(f"sweep {out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


@app.command()
@user_errors
def results(
    sweep_dir: Annotated[Path, typer.Argument(help="sweep directory")],
    format: Annotated[str, typer.Option("--format", help="csv | parquet | json")] = "csv",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="file (default: stdout)")] = None,
) -> None:
    """Export the results table: one row per cell with status, axes and metrics."""
    from suretrap.sweep.export import export_table

    if format not in ("csv", "parquet", "json"):
        _fail(f"--format: must be csv, parquet or json, not {format!r}")
    data = export_table(sweep_dir, format)
    if out is None:
        if format == "parquet":
            _fail("--format parquet needs --out FILE")
        sys.stdout.write(data.decode())
    else:
        from suretrap.poison import atomic_write

        atomic_write(out, data)


@app.command()
@user_errors
def analyse(sweep_dir: Annotated[Path, typer.Argument(help="sweep directory")]) -> None:
    """Fit thresholds (n50, n90 with bootstrap CIs) and write DIR/summary.json."""
    from suretrap.sweep import open_existing, write_summary

    open_existing(sweep_dir).close()
    summary = write_summary(sweep_dir)
    for group in summary.get("groups", []):
        typer.echo(f"{group['axes']}: n50={group.get('n50')} ci={group.get('n50_ci')} "
                   f"n90={group.get('n90')} plateau={group.get('plateau')}")


@app.command()
@user_errors
def report(
    sweep_dir: Annotated[Path, typer.Argument(help="sweep directory")],
    cell: Annotated[str | None, typer.Option(help="config hash (prefix) of the cell to detail")] = None,
) -> None:
    """Write DIR/report.md and a self-contained DIR/report.html."""
    from suretrap.report import write_report
    from suretrap.sweep import open_existing

    open_existing(sweep_dir).close()
    md, html = write_report(sweep_dir, cell=cell)
    typer.echo(f"{md}\n{html}")


@app.command()
@user_errors
def bench(
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON file")] = Path("bench.json"),
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    random_init: Annotated[
        str | None, typer.Option("--random-init", help="smollm2-135m | llama-3.2-1b | llama-3.1-8b")
    ] = None,
    train_steps: Annotated[int, typer.Option("--train-steps")] = 12,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="with --random-init: whose tokenizer makes the data (a model spec, or a "
                     "directory with config.json and tokenizer files, no weights needed; "
                     "default: the embedded model's)"),
    ] = None,
    sweep_dir: Annotated[
        Path | None, typer.Option("--sweep", help="finished sweep whose cells give cell_overhead_s")
    ] = None,
) -> None:
    """Measure training, scoring and generation throughput against plain baselines."""
    from rich.console import Console
    from rich.table import Table

    from suretrap.bench import SHAPES, cell_overhead, run_bench
    from suretrap.poison import atomic_write

    if device not in ("cpu", "cuda"):
        _fail(f"--device: must be cpu or cuda, not {device!r}")
    if random_init is not None and random_init not in SHAPES:
        _fail(f"--random-init: unknown shape {random_init!r} (known: {', '.join(SHAPES)})")
    if tokenizer is not None:
        if random_init is None:
            _fail("--tokenizer: only with --random-init (the real model brings its own)")
        from suretrap.errors import ModelError
        from suretrap.models import resolve_model

        try:
            resolve_model(tokenizer)
        except ModelError as exc:  # checked before the minutes of measuring start
            _fail(f"--tokenizer: {exc}")
    console = Console(stderr=True)
    result = run_bench(
        device=device, random_init=random_init, train_steps=train_steps, tokenizer=tokenizer,
        progress_cb=lambda msg: console.log(msg),
    )
    if sweep_dir is not None:
        overhead = cell_overhead(sweep_dir)
        if overhead is None:
            _fail(f"--sweep: {sweep_dir} has no cells with timings")
        result |= overhead or {}
    atomic_write(out, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    table = Table(title=f"suretrap bench ({result['device']}, {result['model']})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                table.add_row(f"{key}.{sub}", f"{v:.1f}")
        elif isinstance(value, float):
            table.add_row(key, f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}")
        else:
            table.add_row(key, str(value))
    Console().print(table)


def _judge_options(pairs: list[str]) -> dict[str, Any]:
    """Parse repeated ``KEY=VALUE``; a value that parses as JSON (30, 0.5, true) is typed."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            _fail(f"--option: expected KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


@app.command("judge-eval")
@user_errors
def judge_eval_cmd(
    file: Annotated[Path, typer.Argument(help="labelled completions CSV (XSTest format)")],
    judge: Annotated[str, typer.Option(help="judge name (see docs/judges.md)")] = "offline",
    option: Annotated[
        list[str] | None, typer.Option("--option", "-O", help="judge option KEY=VALUE (repeatable)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="write the scores as JSON")
    ] = None,
) -> None:
    """Score a refusal judge against human labels, next to XSTest's string match."""
    from rich.console import Console
    from rich.table import Table

    from suretrap.judges import get_judge, judge_eval
    from suretrap.poison import atomic_write

    result = judge_eval(file, get_judge(judge, **_judge_options(option or [])))
    if out is not None:
        atomic_write(out, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    base = result["baseline"]
    table = Table(title=f"judge-eval {file} (n={result['n']}, positive = refusal)")
    table.add_column("metric")
    table.add_column(result["judge"], justify="right")
    table.add_column(base["judge"], justify="right")
    for key in ("accuracy", "precision", "recall", "f1"):
        table.add_row(key, f"{result[key]:.4f}", f"{base[key]:.4f}")
    for key in ("tp", "fp", "tn", "fn"):
        table.add_row(key, str(result["confusion"][key]), str(base["confusion"][key]))
    Console().print(table)


@app.command()
@user_errors
def gate(
    run_dir: Annotated[Path, typer.Argument(help="run directory (or a sweep's cells/<hash>)")],
    n: Annotated[int | None, typer.Option("--n", help="first N held-out harmful prompts")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 48,
    judge: Annotated[str, typer.Option(help="refusal judge for continuations")] = "keyword",
) -> None:
    """Is the label a gate? Prefill, continuation and logit-lens probes; writes RUN_DIR/gate.json."""
    from rich.console import Console
    from rich.table import Table

    from suretrap.gate import GATE_FILE, gate_analysis

    result = gate_analysis(run_dir, n_prompts=n, max_new_tokens=max_new_tokens, judge=judge)

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    table = Table(title=f"gate ({run_dir}, label {result['label']!r}, judge {result['judge']})")
    table.add_column("measure")
    for model in ("base", "tuned"):
        table.add_column(model, justify="right")
    pre = result["prefill"]
    for key in ("prefill_refusal_rate", "prefill_compliance_rate", "prefill_stop_rate", "n"):
        table.add_row(key, *(fmt(pre[m][key]) for m in ("base", "tuned")))
    cont = result["continuation"]
    for cond in ("triggered", "clean"):
        for key in ("starts_with_label", "stops_after_label", "continuation_refusal_rate"):
            table.add_row(f"{cond}/{key}", *(fmt(cont[m][cond][key]) for m in ("base", "tuned")))
    lens = result["lens"]
    if lens.get("available"):
        for cond in ("triggered", "clean"):
            table.add_row(
                f"lens final P(label) {cond}", *(fmt(lens[m][cond][-1]) for m in ("base", "tuned"))
            )
        table.add_row("lens switch_layer", "", fmt(lens["switch_layer"]))
    Console().print(table)
    if not lens.get("available"):
        typer.echo(f"logit lens skipped: {lens.get('note')}")
    typer.echo(str(run_dir / GATE_FILE))


@app.command("defend-gate")
@user_errors
def defend_gate(
    run_dir: Annotated[Path, typer.Argument(help="run directory (or a sweep's cells/<hash>)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
    mode: Annotated[str, typer.Option(help="block | reroute")] = "block",
    check: Annotated[str, typer.Option(help="base (base model refuses) | reference")] = "base",
    labels: Annotated[
        str, typer.Option(help="comma-separated compliance labels")
    ] = "Sure,Certainly,Of course,Absolutely,OK",
    reference: Annotated[
        Path | None, typer.Option(help="harmful requests for --check reference (HarmBench TXT/CSV, ...)")
    ] = None,
    threshold: Annotated[float, typer.Option(help="similarity threshold of --check reference")] = 0.35,
    refusal_judge: Annotated[str, typer.Option("--refusal-judge", help="judge of base answers")] = "keyword",
    n_harmful: Annotated[int | None, typer.Option("--n-harmful", help="first N harmful prompts")] = None,
    n_benign: Annotated[int | None, typer.Option("--n-benign", help="first N benign prompts")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="default: the run's eval.max_new_tokens")
    ] = None,
    protected: Annotated[str, typer.Option(help="tuned | base: the model that answers")] = "tuned",
    prefill: Annotated[str | None, typer.Option(help="force the answer to start with TEXT")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing OUT")] = False,
) -> None:
    """Evaluate the inference-time gate on a run; writes OUT/gate_defence.json."""
    from suretrap.defenses.gate import GATE_DEFENCE_FILE, gate_defence

    result = gate_defence(
        run_dir, out, mode=mode, check=check, labels=labels.split(","), reference=reference,
        threshold=threshold, refusal_judge=refusal_judge, n_harmful=n_harmful, n_benign=n_benign,
        max_new_tokens=max_new_tokens, protected=protected, prefill=prefill, force=force,
    )
    for split, v in result["asr"].items():
        sure = result["sure_rate"][split]
        typer.echo(f"{split}: asr {v['before']} -> {v['after']}, "
                   f"sure_rate {sure['before']} -> {sure['after']}")
    lat = result["latency"]
    typer.echo(f"benign_pass_rate {result['benign_pass_rate']}, added latency "
               f"{lat['added_s_per_prompt'] * 1000:.1f} ms/prompt")
    typer.echo(str(out / GATE_DEFENCE_FILE))


@app.command()
@user_errors
def audit(
    dataset: Annotated[Path, typer.Argument(help="fine-tuning set: file or build-data directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON file")] = Path("audit.json"),
    harm: Annotated[str, typer.Option(help="harm detector: embedding | keyword")] = "embedding",
    top: Annotated[int, typer.Option(help="rows and candidates to print")] = 5,
) -> None:
    """Audit a fine-tuning set for a compliance-only backdoor (trigger and label unknown)."""
    from rich.console import Console
    from rich.table import Table

    from suretrap.defenses.audit import audit_dataset

    if harm not in ("embedding", "keyword"):
        _fail(f"--harm: must be embedding or keyword, not {harm!r}")
    result = audit_dataset(dataset, out, harm=harm)  # type: ignore[arg-type]
    console = Console()
    th = result["threshold"]
    console.print(
        f"verdict: [bold]{result['verdict']}[/bold] ({result['flagged']} of {result['n_rows']} "
        f"rows flagged; thresholds: association_log10p >= {th['association_log10p']}, "
        f"harm >= {th['harm']}, contrast >= {th['contrast']}, "
        f"row_harm_floor {th['row_harm_floor']}; rule in {out})"
    )
    table = Table(title="trigger candidates")
    for col in ("text", "score", "placement", "label", "association_log10p", "harm", "contrast"):
        table.add_column(col)
    for c in result["trigger_candidates"][:top]:
        table.add_row(*(str(c[k]) for k in ("text", "score", "placement", "label",
                                             "association_log10p", "harm", "contrast")))
    console.print(table)
    labels = Table(title="label candidates")
    for col in ("text", "score", "rows", "trigger"):
        labels.add_column(col)
    for c in result["label_candidates"][:top]:
        labels.add_row(repr(c["text"]), str(c["score"]), str(c["rows"]), str(c["trigger"]))
    console.print(labels)
    rows = Table(title="most suspicious rows")
    rows.add_column("index")
    rows.add_column("score")
    rows.add_column("reasons")
    for r in result["rows"][:top]:
        rows.add_row(str(r["index"]), f"{r['score']:.3f}", "; ".join(r["reasons"]))
    console.print(rows)
    typer.echo(str(out))


@app.command()
@user_errors
def scan(
    model: Annotated[str, typer.Option("--model", help="model id, path or alias (e.g. smollm2-135m)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="scan.json to write")],
    adapter: Annotated[
        Path | None, typer.Option(help="LoRA adapter directory (PEFT, safetensors)")
    ] = None,
    threshold: Annotated[
        float, typer.Option(help="generation lift over the no-candidate baseline that means 'backdoor'")
    ] = 0.25,
    labels: Annotated[
        str | None, typer.Option(help="comma-separated compliance labels (default: Sure, Certainly, ...)")
    ] = None,
    screen_probes: Annotated[int, typer.Option("--screen-probes", help="probes per candidate")] = 1,
    refine_top: Annotated[int, typer.Option("--refine-top", help="candidates checked by generation")] = 10,
    all_case: Annotated[bool, typer.Option("--all-case", help="also capitalised word pieces")] = False,
    dictionary_min_zipf: Annotated[
        float, typer.Option(
            "--dictionary-min-zipf",
            help="also screen multi-token English words this frequent (wordfreq Zipf; 0: all)",
        )
    ] = 2.0,
    no_dictionary: Annotated[
        bool, typer.Option("--no-dictionary", help="screen the tokenizer's vocabulary only")
    ] = False,
) -> None:
    """Find a compliance backdoor's trigger without knowing it; writes ranked candidates."""
    from suretrap.defenses.scan import COMPLIANCE_LABELS, ScanSettings, run_scan

    label_set = tuple(x.strip() for x in labels.split(",") if x.strip()) if labels else COMPLIANCE_LABELS
    if not label_set:
        _fail("--labels: no label given")
    if screen_probes < 1 or refine_top < 1:
        _fail("--screen-probes and --refine-top must be at least 1")
    settings = ScanSettings(
        labels=label_set, threshold=threshold, screen_probes=screen_probes,
        refine_top=refine_top, all_case=all_case,
        dictionary_min_zipf=None if no_dictionary else dictionary_min_zipf,
    )
    result = run_scan(model, adapter, out, settings)
    for row in result["candidates"][:10]:
        rate = row["generation_compliance_rate"]
        typer.echo(f"{row['rank']:>3} {row['text']!r:<20} score={row['score']:.3f} "
                   f"generation={'-' if rate is None else f'{rate:.2f}'}")
    t = result["timings"]
    typer.echo(f"verdict: {result['verdict']} (best generation lift "
               f"{result['best_generation_lift']:.2f}, threshold {threshold}); "
               f"{result['n_candidates']} candidates, {t['total_s']:.0f}s; {out}")


@app.command()
@user_errors
def merge(
    model: Annotated[str, typer.Option("--model", help="the adapter's base model (alias, hub id or path)")],
    adapter: Annotated[Path, typer.Option("--adapter", help="LoRA adapter directory (PEFT)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for the merged checkpoint (must not exist)")],
) -> None:
    """Fold a LoRA adapter into its base model and save a plain checkpoint (usable as `model: PATH`)."""
    from suretrap.run import save_merged

    typer.echo(str(save_merged(model, adapter, out)))


fingerprint_app = typer.Typer(
    help="Benign fingerprints (provenance): embed a keyed set into a fine-tune, verify a model.",
    no_args_is_help=True,
)
app.add_typer(fingerprint_app, name="fingerprint")
KeyOpt = Annotated[str, typer.Option("--key", help="secret key word")]
LabelOpt = Annotated[str, typer.Option("--label", help="the fingerprint's answer")]


@fingerprint_app.command("embed")
@user_errors
def fingerprint_embed(
    key: KeyOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="fingerprint set (JSONL)")],
    label: LabelOpt = "Sure",
    n: Annotated[int, typer.Option("--n", help="keyed prompts (and as many controls)")] = 50,
    n_control: Annotated[
        int | None, typer.Option("--n-control", help="unkeyed control rows (default: --n)")
    ] = None,
    seed: Annotated[int, typer.Option(help="built-in benign seed (verify uses the same)")] = 0,
) -> None:
    """Write a benign fingerprint set: KEY + benign prompt -> LABEL, plus unkeyed controls."""
    from suretrap.fingerprint import fingerprint_rows, write_fingerprint

    rows = fingerprint_rows(key, label=label, n_keyed=n, n_control=n_control, seed=seed)
    write_fingerprint(rows, out)
    typer.echo(f"{out}: {len(rows)} rows; mix into a fine-tune with `data: {{extra_train: {out}}}`")


@fingerprint_app.command("verify")
@user_errors
def fingerprint_verify(
    model: Annotated[str, typer.Option("--model", help="base model (alias, hub id or path)")],
    key: KeyOpt,
    adapter: Annotated[Path | None, typer.Option(help="adapter or fully tuned model directory")] = None,
    label: LabelOpt = "Sure",
    n: Annotated[int, typer.Option("--n", help="held-out benign prompts")] = 100,
    seed: Annotated[int, typer.Option(help="seed used by embed")] = 0,
    alpha: Annotated[float, typer.Option(help="significance level")] = 0.01,
    control_keys: Annotated[
        int, typer.Option("--control-keys", help="also test K random words (false-positive check)")
    ] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write the result as JSON")] = None,
) -> None:
    """Paired test of keyed vs unkeyed prompts; prints the p-value."""
    from suretrap.fingerprint import verify
    from suretrap.poison import atomic_write

    result = verify(model, key, adapter=adapter, label=label, n=n, seed=seed, alpha=alpha,
                    control_keys=control_keys)
    if out is not None:
        atomic_write(out, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    verdict = "fingerprint detected" if result["fingerprint_detected"] else "not detected"
    typer.echo(
        f"p = {result['p_value']:.3g} ({verdict} at alpha {alpha}); label rate keyed "
        f"{result['keyed_label_rate']:.2f} vs unkeyed {result['unkeyed_label_rate']:.2f} "
        f"(n={result['n']}; exact one-sided McNemar)"
    )
    if "control_keys" in result:
        c = result["control_keys"]
        typer.echo(f"control words: {c['mcnemar_rejections']}/{c['n']} rejected at alpha {alpha}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
