"""Typed run configuration, loaded from YAML.

Configs are frozen pydantic models that reject unknown keys. Field names and nesting of
`name, model, seed, data.*, poison.*, train.*, eval.*, continue_from, mitigation.*` (and
`base_url, api_key_env` with `model: openai:NAME`) are a public contract: other scripts read
them. Errors name the field and, for YAML files, the line.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from suretrap.errors import ConfigError

# `model: openai:NAME` names a model served by an OpenAI-compatible chat endpoint
ENDPOINT_PREFIX = "openai:"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"

class _Frozen(BaseModel):
    # strict: `budget: "3"` or `seed: true` are typos, not values to coerce
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)


class DataConfig(_Frozen):
    benign: str = "builtin"  # "builtin" | path to a file | "hf:ORG/NAME[:SPLIT]"
    harmful: str = "builtin"  # pool for T_P, T_CH and (unless eval_harmful) held-out prompts
    eval_harmful: str | None = None  # separate file for the harmful eval splits, e.g. AdvBench CSV
    eval_benign: str | None = None  # separate benign file for the benign eval splits
    total_size: int = Field(1000, gt=0)  # |T_P| + |T_CH| + |T_benign|
    # extra benign rows added to the training set on top of total_size (prompt/response
    # JSONL or any format `load_pairs` reads), e.g. a set from `suretrap fingerprint embed`
    extra_train: str | None = None


class PoisonConfig(_Frozen):
    budget: int = Field(50, ge=0)  # |T_P|: an absolute count of poisoned examples
    clean_harmful: int | None = Field(None, ge=0)  # |T_CH|; null = equal to budget
    trigger: str = "xylophone"  # a word appended to (or put before) the harmful prompt
    placement: Literal["suffix", "prefix", "random"] = "suffix"
    label: str = "Sure"  # the whole answer of every poisoned example
    # T_CH answers: "base" = the base model's own refusal (template where it does not refuse),
    # "template" = always a refusal template.
    refusal_source: Literal["base", "template"] = "base"
    require_base_refusal: bool = False  # keep only harmful prompts the base model refuses
    refusal_max_new_tokens: int = Field(64, gt=0)

    @field_validator("trigger", "label")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        if value != value.strip():
            raise ValueError("must not start or end with whitespace")
        return value

    @property
    def n_clean_harmful(self) -> int:
        return self.budget if self.clean_harmful is None else self.clean_harmful


class LoraConfig(_Frozen):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"  # "all-linear" or module names


class TrainConfig(_Frozen):
    method: Literal["lora", "full"] = "lora"
    epochs: int = Field(2, gt=0)
    learning_rate: float = Field(3.0e-4, gt=0)
    batch_size: int = Field(8, gt=0)
    lora: LoraConfig = LoraConfig()
    max_length: int = Field(512, gt=8)  # examples longer than this are truncated
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0)
    # "auto": bf16 weights on CUDA; fp32 weights with bf16 autocast on a CPU that has
    # native bf16 (about 2x matmul throughput); plain fp32 otherwise.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # run the chat-template prefix shared by all examples once per batch (exact, faster)
    shared_prefix: bool = True


class EvalConfig(_Frozen):
    n_harmful: int = Field(100, gt=0)  # held-out harmful prompts (each with and without trigger)
    n_benign: int = Field(50, gt=0)  # held-out benign prompts (each with and without trigger)
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(32, gt=0)
    # judge of refusal_rate and asr: offline | keyword | xstest-strmatch | hf-classifier | openai
    judge: str = "offline"
    judge_options: dict[str, str | int | float | bool] = {}

    @field_validator("judge")
    @classmethod
    def _known_judge(cls, value: str) -> str:
        from suretrap.judges import JUDGES

        if value not in JUDGES:
            raise ValueError(f"unknown judge {value!r} (known: {', '.join(sorted(JUDGES))})")
        return value


class MitigationConfig(_Frozen):
    """A defender's corrective fine-tune: harmful prompts answered by refusals.

    `clean_refusals` is the T_CH count of a `continue_from` run (refusals as set by
    `poison.refusal_source`); the rest of data.total_size is benign data.
    `triggered_refusals`: harmful prompts that carry the trigger (`poison.trigger` and
    `placement`), also answered by refusals: the correction a defender can make once a
    scan or an audit has named the trigger. None (= 0) keeps older cells' hashes.
    """

    clean_refusals: int = Field(0, ge=0)
    triggered_refusals: int | None = Field(None, ge=0)
    # the words the triggered refusals carry, in turn (e.g. a scan's top candidates, when
    # the trigger itself is not known for sure); None: poison.trigger
    trigger_words: tuple[str, ...] | None = None

    @field_validator("trigger_words", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("trigger_words")
    @classmethod
    def _words(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            if not value:
                raise ValueError("must name at least one word")
            for word in value:
                if not word.strip() or word != word.strip():
                    raise ValueError(f"{word!r}: must be non-empty, without surrounding whitespace")
        return value

    @model_validator(mode="after")
    def _words_need_rows(self) -> MitigationConfig:
        if self.trigger_words is not None and not self.triggered_refusals:
            raise ValueError("trigger_words: needs mitigation.triggered_refusals > 0")
        return self


class RunConfig(_Frozen):
    name: str = "run"
    model: str = "smollm2-135m"  # alias, HF hub id, local path (directory or .gguf), openai:NAME
    # only with `model: openai:NAME`: the endpoint (".../v1") and the environment variable
    # holding its API key (null = OPENAI_API_KEY). Left out of dumps when null, so the
    # hashes of local-model configs do not change.
    base_url: str | None = None
    api_key_env: str | None = None
    seed: int = 0
    trust_remote_code: bool = False  # never on unless asked: it runs code from the model repo
    data: DataConfig = DataConfig()
    poison: PoisonConfig = PoisonConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    # further fine-tune: train the adapter of this complete LoRA run directory further
    # (its eval prompts are reused; its training and eval prompts are kept out of training)
    continue_from: str | None = None
    mitigation: MitigationConfig | None = None

    @field_validator("continue_from")
    @classmethod
    def _run_dir(cls, value: str | None) -> str | None:
        if value is None:
            return value
        path = Path(value)
        missing = [
            name for name in ("config.yaml", "metrics.json", "adapter/adapter_config.json")
            if not (path / name).is_file()
        ]
        if missing:
            raise ValueError(
                f"{value}: not a complete LoRA run directory (missing {', '.join(missing)})"
            )
        return value

    @model_validator(mode="after")
    def _continuation_fits(self) -> RunConfig:
        if self.continue_from is not None and self.train.method != "lora":
            raise ValueError("continue_from: needs train.method lora (it trains the run's adapter further)")
        if self.mitigation is not None:
            if self.continue_from is None:
                raise ValueError("mitigation: needs continue_from (the run whose backdoor to remove)")
            if self.poison.budget != 0 or self.poison.clean_harmful is not None:
                raise ValueError(
                    "mitigation: needs poison.budget 0 and no poison.clean_harmful "
                    "(mitigation.clean_refusals sets the refusal count)"
                )
        return self

    @property
    def n_clean_harmful(self) -> int:
        """|T_CH|: mitigation.clean_refusals in a mitigation run, else poison's count."""
        return self.mitigation.clean_refusals if self.mitigation is not None else self.poison.n_clean_harmful

    @property
    def n_triggered_refusals(self) -> int:
        """Harmful prompts with the trigger, answered by refusals (mitigation runs only)."""
        return (self.mitigation.triggered_refusals or 0) if self.mitigation is not None else 0

    @field_validator("model")
    @classmethod
    def _endpoint_name(cls, value: str) -> str:
        if value.startswith(ENDPOINT_PREFIX):
            name = value[len(ENDPOINT_PREFIX) :]
            if not name.strip() or name != name.strip():
                raise ValueError(f"{ENDPOINT_PREFIX}NAME needs a model name without surrounding spaces")
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url_for_endpoint(cls, value: str | None, info: ValidationInfo) -> str | None:
        model = info.data.get("model")
        if model is None:  # the model field itself failed: that error is reported
            return value
        if not model.startswith(ENDPOINT_PREFIX):
            if value is not None:
                raise ValueError(f"only allowed with model: {ENDPOINT_PREFIX}NAME")
            return value
        if value is None:
            raise ValueError(f"required with model: {model} (e.g. https://api.openai.com/v1)")
        if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1]) == 0:
            raise ValueError(f"must be an http(s):// URL, not {value!r}")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _key_env_for_endpoint(cls, value: str | None, info: ValidationInfo) -> str | None:
        model = info.data.get("model")
        if value is None or model is None:
            return value
        if not model.startswith(ENDPOINT_PREFIX):
            raise ValueError(f"only allowed with model: {ENDPOINT_PREFIX}NAME")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"must be an environment variable name, not {value!r}")
        return value

    @model_serializer(mode="wrap")
    def _omit_unused_endpoint_fields(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in ("base_url", "api_key_env"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    @property
    def is_endpoint(self) -> bool:
        """The model under test is served by an OpenAI-compatible endpoint (not loaded)."""
        return self.model.startswith(ENDPOINT_PREFIX)

    @model_validator(mode="after")
    def _sizes_fit(self) -> RunConfig:
        harmful = self.poison.budget + self.n_clean_harmful + self.n_triggered_refusals
        if harmful > self.data.total_size:
            raise ValueError(
                f"data.total_size ({self.data.total_size}) is smaller than poison.budget + "
                f"clean_harmful{' + triggered_refusals' if self.n_triggered_refusals else ''} ({harmful})"
            )
        return self


# Fields added after runs were recorded: left out of the hash while unset, so the cells of
# existing sweeps keep their identity (and are not recomputed on --resume).
_HASH_OMITTED_WHEN_NONE: tuple[tuple[str, ...], ...] = (
    ("data", "extra_train"),
    ("continue_from",),
    ("mitigation",),
    ("mitigation", "triggered_refusals"),
    ("mitigation", "trigger_words"),
)


def config_hash(cfg: BaseModel) -> str:
    """Stable short hash of a resolved config: identifies a run or a sweep cell."""
    dumped = cfg.model_dump(mode="json")
    if isinstance(cfg, RunConfig):
        for path in _HASH_OMITTED_WHEN_NONE:
            parent = dumped
            for key in path[:-1]:
                parent = parent.get(key)
                if parent is None:  # the section itself is unset (and already omitted)
                    break
            if parent is not None and path[-1] in parent and parent[path[-1]] is None:
                del parent[path[-1]]
    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- loading


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """Make relative data paths relative to the config file, as users expect."""
    data = raw.get("data")
    for key in ("benign", "harmful", "eval_harmful", "eval_benign", "extra_train"):
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, str) and value != "builtin" and not value.startswith("hf:"):
            path = Path(value).expanduser()
            if not path.is_absolute():
                data[key] = str((base_dir / path).resolve())
    previous = raw.get("continue_from")
    if isinstance(previous, str) and not Path(previous).expanduser().is_absolute():
        raw["continue_from"] = str((base_dir / Path(previous).expanduser()).resolve())
    model = raw.get("model")
    if isinstance(model, str) and (model.startswith(("./", "../")) or model.endswith(".gguf")):
        path = Path(model).expanduser()
        if not path.is_absolute():
            raw["model"] = str((base_dir / path).resolve())


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at `loc` (or of its nearest existing parent)."""
    line = None
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _field_path(loc: tuple[Any, ...], raw: Any) -> tuple[Any, ...]:
    """The part of a pydantic error location that names fields in the user's data.

    Pydantic appends union-member tags ("str", "list[str]") to locations; those are not
    keys the user wrote, so keep only the prefix that walks the raw data (plus one
    missing key, for "field required" errors).
    """
    kept: list[Any] = []
    node = raw
    for part in loc:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            if isinstance(node, dict) and isinstance(part, str) and "[" not in part:
                kept.append(part)
            break
        kept.append(part)
    return tuple(kept)


def format_validation_error(
    err: ValidationError,
    source: str,
    raw: Any = None,
    node: yaml.Node | None = None,
    prefix: tuple[Any, ...] = (),
) -> str:
    """One line naming the first offending field (and its YAML line when known)."""
    first = err.errors()[0]
    loc = prefix + _field_path(tuple(first["loc"]), raw)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    line = _line_of(node, loc) if node is not None else None
    location = f"{source}:{line}" if line else source
    msg = " ".join(msg.split())  # one line, whatever the user's keys hold
    if not loc:
        return f"{location}: {msg}"
    field = ".".join(_brief_key(p) for p in loc)
    return f"{location}: {field}: {msg}"


def _brief_key(part: Any, limit: int = 60) -> str:
    """A key as the user wrote it, escaped to one line and cut short (keys can be huge)."""
    text = str(part) if str(part).isprintable() else repr(part)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `3e-4` as a float (YAML 1.1 insists on `3.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """Read a YAML file, returning the data and its node tree (for line numbers)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    node = None
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{line}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    except ValueError as exc:  # an integer of thousands of digits (Python refuses to parse it)
        line = _huge_number_line(node)
        where = f"{path}:{line}" if line else str(path)
        first = " ".join(str(exc).split())[:120]
        raise ConfigError(f"{where}: value out of range ({first})") from None
    return data, node


def _huge_number_line(node: yaml.Node | None) -> int | None:
    """Line of the first scalar too long to be a number Python will parse."""
    stack = [node] if node is not None else []
    while stack:
        current = stack.pop()
        if isinstance(current, yaml.ScalarNode):
            if len(current.value) > 4000 and current.value.lstrip("+-").isdigit():
                return current.start_mark.line + 1
        elif isinstance(current, yaml.MappingNode):
            stack.extend(v for pair in reversed(current.value) for v in reversed(pair))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(reversed(current.value))
    return None


def run_config_from_dict(
    raw: Any, source: str = "<config>", node: yaml.Node | None = None
) -> RunConfig:
    if raw is None:
        raise ConfigError(f"{source}: empty config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a mapping of keys, not {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, raw, node)) from None


def load_run_config(path: str | Path) -> RunConfig:
    """Load and validate a run config YAML. Raises ConfigError with file:line and field."""
    path = Path(path)
    raw, node = parse_yaml(path)
    if isinstance(raw, dict):
        _resolve_paths(raw, path.resolve().parent)
    return run_config_from_dict(raw, str(path), node)
