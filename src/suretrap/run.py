"""One experiment: build the poisoned set, fine-tune, evaluate base vs tuned.

A run directory holds:
  config.yaml        the resolved config (what ran, exactly)
  env.json           versions of suretrap/torch/transformers/peft and the model's file hashes
  dataset.jsonl      T_P ∪ T_CH ∪ T_benign, one row per example with its role
  eval_prompts.jsonl held-out prompts (disjoint from training)
  manifest.json      counts, seed, trigger, label, content hashes
  adapter/           PEFT LoRA adapter, safetensors (or model/ for full fine-tuning)
  train_log.jsonl    one line per optimiser step
  metrics.json       {"tuned": {split: {metric: value}}, "base": {...}}
                     (an openai: endpoint: "tuned", "judges", "unavailable", "endpoint";
                     see docs/closed-weight.md)
  generations.jsonl  model, split, prompt, response

`run_experiment` works in `<out>.partial` and renames it to `<out>` only when every file
is in place, so a directory named `<out>` is always complete; a leftover `.partial` is
never trusted and is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suretrap import __version__
from suretrap.config import RunConfig, config_hash, config_to_yaml, load_run_config
from suretrap.crashpoints import crash_point
from suretrap.errors import ConfigError, SuretrapError
from suretrap.evaluate import apply_judge, eval_items, evaluate_model, generate
from suretrap.models import (
    file_sha256,
    load_model,
    load_tokenizer,
    model_fingerprint,
    pick_device,
    pickle_allowed,
    release_memory,
    resolve_model,
    save_checkpoint,
)
from suretrap.poison import (
    DATASET_FILE,
    EVAL_FILE,
    MANIFEST_FILE,
    PoisonedDataset,
    atomic_write,
    build_dataset,
    dataset_complete,
    read_dataset,
    write_dataset,
)
from suretrap.train import (
    ADAPTER_DIR,
    MODEL_DIR,
    TRAIN_LOG,
    merged_for_eval,
    prepare_model,
    save_trained,
    train,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"
METRICS_FILE = "metrics.json"
GENERATIONS_FILE = "generations.jsonl"


@dataclass
class LoadedModel:
    """A base model and tokenizer kept in memory and reused (sweeps reuse it across cells)."""

    spec: str
    model: Any
    tokenizer: Any
    device: str
    precision: str
    method: str = "lora"
    # greedy base responses by (prompt, max_new_tokens): T_CH refusals are reused across cells
    responses: dict[tuple[str, int], str] = field(default_factory=dict)
    # base-model evaluation by eval-set key: computed once per model and eval set
    base_evals: dict[str, Any] = field(default_factory=dict)
    generation_s: float = 0.0  # time spent generating base responses (for timings)
    judges: dict[str, Any] = field(default_factory=dict)  # loaded judges, by name + options

    def judge(self, cfg: RunConfig) -> Any:
        key = json.dumps([cfg.eval.judge, judge_options(cfg)], sort_keys=True)
        if key not in self.judges:
            self.judges[key] = make_judge(cfg)
        return self.judges[key]

    @classmethod
    def load(cls, cfg: RunConfig) -> LoadedModel:
        device = pick_device(cfg.train.device)
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        model = load_model(
            cfg.model, device=device, precision=cfg.train.precision, method=cfg.train.method,
            trust_remote_code=cfg.trust_remote_code,
        )
        return cls(cfg.model, model, tokenizer, device, cfg.train.precision, cfg.train.method)

    def fits(self, cfg: RunConfig) -> bool:
        """Can a cell with `cfg` reuse this loaded base model?"""
        return (self.spec, self.precision, self.method) == (
            cfg.model, cfg.train.precision, cfg.train.method
        ) and self.device == pick_device(cfg.train.device)

    def responder(self, batch_size: int) -> Any:
        def respond(prompts: Any, max_new_tokens: int) -> list[str]:
            todo = [p for p in dict.fromkeys(prompts) if (p, max_new_tokens) not in self.responses]
            if todo:
                started = time.perf_counter()
                fresh = generate(
                    self.model, self.tokenizer, todo, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, device=self.device, precision=self.precision,
                    description="base responses",
                )
                self.responses.update(((p, max_new_tokens), r) for p, r in zip(todo, fresh, strict=True))
                self.generation_s += time.perf_counter() - started
            return [self.responses[(p, max_new_tokens)] for p in prompts]

        return respond


def judge_options(cfg: RunConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"label": cfg.poison.label} if cfg.eval.judge == "prefix" else {}
    return options | dict(cfg.eval.judge_options)


def make_judge(cfg: RunConfig) -> Any:
    """The run's judge (`eval.judge` with `eval.judge_options`)."""
    from suretrap.judges import get_judge

    return get_judge(cfg.eval.judge, **judge_options(cfg))


def _dump(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    atomic_write(path, data)


def environment(cfg: RunConfig, device: str) -> dict[str, Any]:
    """Versions and the model's file hashes, for provenance."""
    import peft
    import torch
    import transformers

    return {
        "suretrap": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "model": cfg.model,
        "model_files": model_fingerprint(resolve_model(cfg.model)),
        "allow_pickle": pickle_allowed(),
    }


# ---------------------------------------------------------------------------- stages


def stage_build_data(cfg: RunConfig, out: Path, loaded: LoadedModel | None = None) -> PoisonedDataset:
    """Write dataset.jsonl, eval_prompts.jsonl and manifest.json into `out` (skip if done)."""
    if dataset_complete(out) and _same_config(out, cfg):
        return read_dataset(out)
    needs_model = cfg.poison.require_base_refusal or (
        cfg.poison.refusal_source == "base" and cfg.n_clean_harmful > 0
    )
    previous = previous_run(cfg)
    model: Any = loaded
    if needs_model and model is None:
        if cfg.is_endpoint:  # base refusals come from the endpoint's model
            from suretrap.closed_weight import EndpointModel

            model = EndpointModel.load(cfg)
        else:
            model = LoadedModel.load(cfg)
    respond = model.responder(cfg.eval.batch_size) if model is not None else None
    ds = build_dataset(cfg, respond, previous[1] if previous else None)
    _write_config(cfg, out)
    manifest = write_dataset(ds, out)
    return PoisonedDataset(ds.examples, ds.eval_harmful, ds.eval_benign, manifest)


def previous_run(cfg: RunConfig) -> tuple[RunConfig, PoisonedDataset] | None:
    """The config and dataset of the run `continue_from` names, checked against `cfg`."""
    if cfg.continue_from is None:
        return None
    where = Path(cfg.continue_from)
    prev = load_run_config(where / CONFIG_FILE)
    if prev.model != cfg.model:
        raise ConfigError(f"continue_from: {where} was trained on model {prev.model!r}, not {cfg.model!r}")
    if prev.train.method != "lora":
        raise ConfigError(f"continue_from: {where} is not a LoRA run")
    if prev.train.lora != cfg.train.lora:
        raise ConfigError(
            f"train.lora: must equal the continued run's ({where}): its adapter is trained further"
        )
    if cfg.mitigation is not None:
        # the defender does not know the trigger, but measuring the backdoor does
        for key in ("trigger", "placement", "label"):
            if getattr(prev.poison, key) != getattr(cfg.poison, key):
                raise ConfigError(
                    f"poison.{key}: must equal the continued run's ({getattr(prev.poison, key)!r}) "
                    "so the backdoor is measured with its own trigger"
                )
    return prev, read_dataset(where)


def stage_train(cfg: RunConfig, out: Path, loaded: LoadedModel, ds: PoisonedDataset) -> Any:
    """Fine-tune an adapter on the dataset; writes adapter/ and train_log.jsonl.

    A fresh adapter, or with `continue_from` that run's adapter, trained further.
    """
    start = Path(cfg.continue_from) / ADAPTER_DIR if cfg.continue_from else None
    model = prepare_model(loaded.model, cfg.train, cfg.seed, init_adapter=start)
    log_tmp = out / f".{TRAIN_LOG}.tmp"
    result = train(
        model, loaded.tokenizer, ds.examples, cfg.train,
        seed=cfg.seed, device=loaded.device, log_path=log_tmp,
    )
    staging = out / ".trained.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    saved = save_trained(model, loaded.tokenizer, cfg.train.method, staging)
    crash_point("save")
    final = out / saved.name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(saved, final)
    shutil.rmtree(staging, ignore_errors=True)
    os.replace(log_tmp, out / TRAIN_LOG)
    return model, result


def stage_evaluate(
    cfg: RunConfig,
    out: Path,
    ds: PoisonedDataset,
    base: Any,
    tuned: Any,
    loaded: LoadedModel,
    base_metrics: tuple[dict[str, Any], list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Evaluate base and tuned models on the four splits; writes metrics + generations."""
    items = eval_items(ds, cfg.poison.trigger, cfg.poison.placement, cfg.seed)
    kw = {"device": loaded.device, "precision": loaded.precision}
    if base_metrics is None:
        base_metrics = _eval_base(cfg, ds, base, loaded)
    with merged_for_eval(tuned) as merged:
        tuned_m, tuned_rows = evaluate_model(
            merged, loaded.tokenizer, items, cfg.poison.label, cfg.eval, tag="tuned", **kw
        )
    judges = apply_judge(tuned_m, tuned_rows, loaded.judge(cfg))
    metrics = {"tuned": tuned_m, "base": base_metrics[0], "judges": judges}
    crash_point("evaluate")
    _write_jsonl(out / GENERATIONS_FILE, base_metrics[1] + tuned_rows)
    crash_point("evaluate")
    _dump(out / METRICS_FILE, metrics)
    return metrics


def _eval_base(
    cfg: RunConfig, ds: PoisonedDataset, base: Any, loaded: LoadedModel
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Base-model metrics, computed once per model and eval set (cached on `loaded`)."""
    p = cfg.poison
    key = base_eval_key(cfg, ds)
    if key not in loaded.base_evals:
        items = eval_items(ds, p.trigger, p.placement, cfg.seed)
        base_m, base_rows = evaluate_model(
            base, loaded.tokenizer, items, p.label, cfg.eval, tag="base",
            device=loaded.device, precision=loaded.precision,
        )
        apply_judge(base_m, base_rows, loaded.judge(cfg))
        loaded.base_evals[key] = (base_m, base_rows)
    return loaded.base_evals[key]


def base_eval_key(cfg: RunConfig, ds: PoisonedDataset) -> str:
    """What the base model's evaluation depends on: cells that share it share the metrics."""
    p = cfg.poison
    return json.dumps(
        [ds.manifest.get("eval_hash"), p.trigger, p.placement, p.label, cfg.seed,
         cfg.eval.model_dump(mode="json")],
        sort_keys=True,
    )


def _write_config(cfg: RunConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / CONFIG_FILE, config_to_yaml(cfg).encode())


def _same_config(out: Path, cfg: RunConfig) -> bool:
    try:
        return config_hash(load_run_config(out / CONFIG_FILE)) == config_hash(cfg)
    except SuretrapError:
        return False


# every file a finished run directory holds (besides adapter/ or model/)
RUN_FILES = (
    CONFIG_FILE, ENV_FILE, DATASET_FILE, EVAL_FILE, MANIFEST_FILE, TRAIN_LOG, GENERATIONS_FILE,
    METRICS_FILE,
)


def run_complete(out: Path) -> bool:
    """True if `out` holds every file of a finished run and its dataset matches its hashes.

    `run_experiment` only ever renames a finished directory into place, so this is a check
    against directories left by other means (stage commands, older versions, hand edits).
    """
    trained = trained_dir(out)
    return (
        all((out / name).is_file() for name in RUN_FILES)
        and trained is not None
        and any(trained.glob("*.safetensors"))
        and dataset_complete(out)
    )


def complete_for(out: Path, cfg: RunConfig) -> bool:
    """True if `out` holds a complete run of exactly this config."""
    return run_complete(out) and _same_config(out, cfg)


# ------------------------------------------------------------------------------ run


def run_experiment(
    cfg: RunConfig, out: Path | str, *, loaded: LoadedModel | None = None, force: bool = False
) -> dict[str, Any]:
    """build → train → evaluate, atomically into `out`. Returns metrics.json's content."""
    out = Path(out)
    if out.exists():
        if complete_for(out, cfg) and not force:
            log.info("%s is already complete for this config", out)
            return json.loads((out / METRICS_FILE).read_text())
        if not force and not _unfinished_same_run(out, cfg):
            raise ConfigError(
                f"{out}: exists and holds another run (or no complete run); "
                "choose a new --out or pass --force to replace it"
            )
    resolve_model(cfg.model)  # fail on a bad model path before creating anything
    partial = out.with_name(out.name + ".partial")
    aside = out.with_name(out.name + ".old")
    for leftover in (partial, aside):  # a crash's leftovers: never trusted, rebuilt
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError(f"{partial}: cannot create the run directory ({exc.strerror})") from None
    try:
        metrics = _run_stages(cfg, partial, loaded)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # bad input, full disk, ^C: leave nothing
        raise
    crash_point("rename")
    if out.exists():
        # Move the old run aside rather than delete it in place: a crash mid-delete would
        # leave a directory named `out` that is neither run.
        os.replace(out, aside)
        crash_point("rename")
    os.replace(partial, out)
    shutil.rmtree(aside, ignore_errors=True)
    return metrics


def _unfinished_same_run(out: Path, cfg: RunConfig) -> bool:
    """`out` is empty, or an unfinished run of this very config: safe to rebuild over."""
    if not out.is_dir():
        return False
    return not any(out.iterdir()) or _same_config(out, cfg)


def _run_stages(cfg: RunConfig, partial: Path, loaded: LoadedModel | None) -> dict[str, Any]:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if loaded is None:
        loaded = LoadedModel.load(cfg)
    timings["load_s"] = time.perf_counter() - started
    _write_config(cfg, partial)
    _dump(partial / ENV_FILE, environment(cfg, loaded.device))

    t = time.perf_counter()
    generated = loaded.generation_s
    ds = stage_build_data(cfg, partial, loaded)
    timings["build_data_s"] = time.perf_counter() - t
    timings["refusal_generation_s"] = loaded.generation_s - generated

    t = time.perf_counter()
    base_metrics = _eval_base(cfg, ds, loaded.model, loaded)
    release_memory()
    timings["eval_base_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tuned, result = stage_train(cfg, partial, loaded, ds)
    release_memory()
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics = stage_evaluate(cfg, partial, ds, loaded.model, tuned, loaded, base_metrics)
    timings["eval_tuned_s"] = time.perf_counter() - t
    _unwrap(loaded, tuned, cfg)
    release_memory()

    timings["total_s"] = time.perf_counter() - started
    _dump(
        partial / "timings.json",
        timings | {"train_loop_s": result.seconds, "train_tokens": result.tokens, "train_steps": result.steps,
                   "train_tokens_per_s": result.tokens / max(result.seconds, 1e-9)},
    )
    return metrics


def read_timings(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "timings.json").read_text())
    except (OSError, ValueError):
        return {}


def _unwrap(loaded: LoadedModel, tuned: Any, cfg: RunConfig) -> None:
    """Restore the shared base model after a LoRA run so the next run starts clean."""
    if cfg.train.method == "lora":
        loaded.model = tuned.unload()
    else:  # full fine-tuning changed the weights: the base must be reloaded
        loaded.model = load_model(
            cfg.model, device=loaded.device, precision=loaded.precision, method="full",
            trust_remote_code=cfg.trust_remote_code,
        )


def trained_dir(out: Path) -> Path | None:
    for name in (ADAPTER_DIR, MODEL_DIR):
        if (out / name).is_dir():
            return out / name
    return None


EVAL_BACKENDS = ("local", "vllm")


def evaluate_run(
    cfg: RunConfig,
    out: Path,
    ds: PoisonedDataset,
    trained: Path | None = None,
    *,
    backend: str = "local",
    base_url: str | None = None,
    served_base: str | None = None,
) -> dict[str, Any]:
    """Evaluate base and a saved adapter (or full model) on a run's held-out prompts.

    For ``model: openai:NAME`` the endpoint is the model under test (`evaluate_endpoint_run`).
    ``backend="vllm"``: the base model and the run's LoRA adapter are asked through a vLLM
    server at `base_url` that loads the adapter at run time (`suretrap.vllm_backend`).
    """
    from suretrap.errors import ModelError

    if backend not in EVAL_BACKENDS:
        raise ConfigError(f"--backend: unknown backend {backend!r} (available: {', '.join(EVAL_BACKENDS)})")
    if backend == "vllm":
        if base_url is None:
            raise ConfigError("--base-url: required with --backend vllm (e.g. http://localhost:8000/v1)")
        from suretrap.vllm_backend import VLLMBackend

        return VLLMBackend.connect(base_url, served_base).evaluate_run(cfg, out, ds, trained)
    for option, value in (("--base-url", base_url), ("--served-base", served_base)):
        if value is not None:
            raise ConfigError(f"{option}: only with --backend vllm")
    if cfg.is_endpoint:
        if trained is not None:
            raise ConfigError(f"--adapter: model {cfg.model} is evaluated as served; it takes no adapter")
        return evaluate_endpoint_run(cfg, out, ds)
    trained = trained or trained_dir(out)
    if trained is None or not trained.is_dir():
        raise ModelError(f"{out}: no adapter/ or model/ directory (run `suretrap train` first)")
    loaded = LoadedModel.load(cfg)
    base_metrics = _eval_base(cfg, ds, loaded.model, loaded)
    tuned = load_trained(loaded, trained)
    return stage_evaluate(cfg, out, ds, loaded.model, tuned, loaded, base_metrics)


def evaluate_endpoint_run(cfg: RunConfig, out: Path, ds: PoisonedDataset) -> dict[str, Any]:
    """Evaluate an OpenAI-compatible endpoint on a run's held-out prompts.

    metrics.json: the endpoint's metrics under "tuned" (the model under test: typically the
    vendor fine-tune of the exported set), no "base" entry, "judges" as for local runs,
    "unavailable" ({metric: why it is null}) and "endpoint" (what answered).
    """
    from suretrap.closed_weight import EndpointModel, evaluate_endpoint

    endpoint = EndpointModel.load(cfg)
    judge = make_judge(cfg)  # a bad judge option fails before any request is sent
    items = eval_items(ds, cfg.poison.trigger, cfg.poison.placement, cfg.seed)
    tuned_m, rows, unavailable = evaluate_endpoint(endpoint, items, cfg.poison.label, cfg.eval)
    judges = apply_judge(tuned_m, rows, judge)
    metrics = {
        "tuned": tuned_m,
        "judges": judges,
        "unavailable": unavailable,
        "endpoint": {
            "base_url": endpoint.base_url,
            "model": endpoint.name,
            "served_model": endpoint.served_model,
        },
    }
    _write_jsonl(out / GENERATIONS_FILE, rows)
    _dump(out / METRICS_FILE, metrics)
    return metrics


MERGE_FILE = "suretrap_merge.json"


def save_merged(model_spec: str, adapter: Path, out: Path) -> Path:
    """Fold a LoRA adapter into its base model's weights and save a plain checkpoint.

    Why: a model that is passed on, or stolen, is usually merged and then fine-tuned again
    with a fresh adapter or in full, which `continue_from` (the same adapter trained
    further) does not cover; the saved directory is an ordinary `model:` path. Merged in
    fp32 (no bf16 rounding of the folded weights), written to a temporary sibling and
    renamed, so `out` is either complete or absent.
    """
    from suretrap.errors import ModelError

    if out.exists():
        raise ConfigError(f"--out: {out}: already exists")
    if not adapter.is_dir() or not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"--adapter: {adapter}: no adapter_config.json (not a PEFT adapter directory)")
    tokenizer = load_tokenizer(model_spec)
    base = load_model(model_spec, device="cpu", precision="fp32")
    peft_model = load_trained(LoadedModel(model_spec, base, tokenizer, "cpu", "fp32"), adapter)
    merged = peft_model.merge_and_unload()
    record = {"base_model": model_spec, "adapter": str(adapter.resolve()),
              "adapter_weights_sha256": next((file_sha256(adapter / n) for n in (
                  "adapter_model.safetensors", "adapter_model.bin") if (adapter / n).is_file()), None),
              "suretrap_version": __version__}
    save_checkpoint(merged, tokenizer, out, {MERGE_FILE: json.dumps(record, indent=2) + "\n"})
    umask = os.umask(0)
    os.umask(umask)
    out.chmod(0o777 & ~umask)  # the temporary directory's 0700 would hide it from other users
    return out


def load_trained(loaded: LoadedModel, trained: Path) -> Any:
    """Attach a saved PEFT adapter to the loaded base, or load a fully fine-tuned model."""
    from suretrap.errors import ModelError

    if (trained / "adapter_config.json").is_file():
        from peft import PeftModel

        if not (trained / "adapter_model.safetensors").is_file() and not pickle_allowed():
            raise ModelError(
                f"{trained}: no adapter_model.safetensors (pickled adapter weights are not "
                "loaded unless --allow-pickle is given)"
            )
        try:
            return PeftModel.from_pretrained(loaded.model, str(trained), is_trainable=False)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{trained}: adapter does not fit model {loaded.spec} ({first})") from None
    return load_model(str(trained), device=loaded.device, precision=loaded.precision)
