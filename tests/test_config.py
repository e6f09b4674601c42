"""Tests for suretrap.config: YAML loading, validation messages with file:line, hashing."""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from suretrap.config import RunConfig, config_hash, load_run_config, run_config_from_dict
from suretrap.errors import ConfigError, SuretrapError

EXAMPLE = """\
name: budget50
model: smollm2-135m
seed: 0
data: {benign: builtin, harmful: builtin, eval_harmful: null, total_size: 1000}
poison: {budget: 50, clean_harmful: 50, trigger: xylophone, placement: suffix, label: Sure}
train: {method: lora, epochs: 2, learning_rate: 3.0e-4, batch_size: 8}
eval: {n_harmful: 100, n_benign: 50, max_new_tokens: 64}
"""


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    """Load `path` expecting a ConfigError; return its (single-line) message."""
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    message = str(info.value)
    assert "\n" not in message, f"error message must be one line: {message!r}"
    return message


def assert_located(message: str, path: Path, line: int, field: str) -> None:
    assert f"{path}:{line}:" in message, f"expected {path.name}:{line} in {message!r}"
    assert field in message, f"expected field {field!r} in {message!r}"


# --------------------------------------------------------------------------- loading


def test_documented_example_loads_with_contract_field_names(tmp_path: Path) -> None:
    cfg = load_run_config(write(tmp_path, EXAMPLE))
    assert isinstance(cfg, RunConfig)
    assert (cfg.name, cfg.model, cfg.seed) == ("budget50", "smollm2-135m", 0)
    assert cfg.data.benign == "builtin"
    assert cfg.data.harmful == "builtin"
    assert cfg.data.eval_harmful is None
    assert cfg.data.total_size == 1000
    assert cfg.poison.budget == 50
    assert cfg.poison.clean_harmful == 50
    assert cfg.poison.n_clean_harmful == 50
    assert cfg.poison.trigger == "xylophone"
    assert cfg.poison.placement == "suffix"
    assert cfg.poison.label == "Sure"
    assert cfg.train.method == "lora"
    assert cfg.train.epochs == 2
    assert cfg.train.learning_rate == pytest.approx(3.0e-4)
    assert isinstance(cfg.train.learning_rate, float)
    assert cfg.train.batch_size == 8
    assert (cfg.eval.n_harmful, cfg.eval.n_benign, cfg.eval.max_new_tokens) == (100, 50, 64)

    dumped = cfg.model_dump()
    assert {"name", "model", "seed", "data", "poison", "train", "eval"} <= set(dumped)
    assert {"benign", "harmful", "eval_harmful", "total_size"} <= set(dumped["data"])
    assert {"budget", "clean_harmful", "trigger", "placement", "label"} <= set(dumped["poison"])
    assert {"method", "epochs", "learning_rate", "batch_size"} <= set(dumped["train"])
    assert {"n_harmful", "n_benign", "max_new_tokens"} <= set(dumped["eval"])


def test_example_equals_same_config_from_dict(tmp_path: Path) -> None:
    from_file = load_run_config(write(tmp_path, EXAMPLE))
    from_dict = run_config_from_dict(yaml.safe_load(EXAMPLE))
    assert from_file == from_dict
    assert config_hash(from_file) == config_hash(from_dict)


def test_defaults_and_clean_harmful_null_means_budget(tmp_path: Path) -> None:
    cfg = load_run_config(write(tmp_path, "poison:\n  budget: 7\n  clean_harmful: null\n"))
    assert cfg.poison.clean_harmful is None
    assert cfg.poison.n_clean_harmful == 7
    # untouched sections take their defaults
    assert cfg.poison.trigger == "xylophone"
    assert cfg.poison.label == "Sure"
    assert cfg.poison.placement == "suffix"
    assert cfg.data.benign == "builtin" and cfg.data.harmful == "builtin"
    assert cfg.data.eval_harmful is None
    assert cfg.train.method == "lora"

    minimal = load_run_config(write(tmp_path, "name: only\n", "minimal.yaml"))
    assert minimal.name == "only"
    assert minimal.poison.clean_harmful is None
    assert minimal.poison.n_clean_harmful == minimal.poison.budget

    explicit = load_run_config(write(tmp_path, "poison: {budget: 7, clean_harmful: 0}\n", "z.yaml"))
    assert explicit.poison.n_clean_harmful == 0  # 0 is not "null"


# ------------------------------------------------------------------- located errors


def test_unknown_top_level_key_names_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nseed: 1\nbogus_key: 3\nmodel: smollm2-135m\n")
    message = config_error(path)
    assert_located(message, path, 3, "bogus_key")
    assert "unknown" in message


def test_unknown_nested_key_block_style(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: x
        train:
          method: lora
          epochs: 2
          bogus: 3
        eval:
          n_harmful: 10
        """,
    )
    message = config_error(path)
    assert_located(message, path, 5, "train.bogus")
    assert "unknown" in message


def test_unknown_nested_key_flow_style(tmp_path: Path) -> None:
    text = EXAMPLE.replace("batch_size: 8}", "batch_size: 8, bogus: 1}")
    path = write(tmp_path, text)
    message = config_error(path)
    assert_located(message, path, 6, "train.bogus")


def test_unknown_key_deeply_nested(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lora:\n    r: 8\n    rank: 8\n")
    assert_located(config_error(path), path, 4, "train.lora.rank")


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("name: x\nseed: abc\n", 2, "seed"),
        ("name: x\ntrain:\n  epochs: two\n", 3, "train.epochs"),
        ("poison:\n  budget: 3\n  placement: middle\n", 3, "poison.placement"),
        ("data:\n  total_size: [1, 2]\n", 2, "data.total_size"),
        ("name: x\n\n\ntrain: 5\n", 4, "train"),
        ("train:\n  method: lora\n  learning_rate: fast\n", 3, "train.learning_rate"),
        ("poison:\n  budget: 2.5\n", 2, "poison.budget"),
        ("train:\n  lora:\n    target_modules: [q_proj, 3]\n", 3, "train.lora.target_modules"),
    ],
)
def test_wrong_type_is_located(tmp_path: Path, text: str, line: int, field: str) -> None:
    path = write(tmp_path, text)
    assert_located(config_error(path), path, line, field)


def test_negative_budget(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\npoison:\n  trigger: xylophone\n  budget: -1\n")
    message = config_error(path)
    assert_located(message, path, 4, "poison.budget")
    assert "greater than or equal to 0" in message


def test_negative_clean_harmful(tmp_path: Path) -> None:
    path = write(tmp_path, "poison:\n  budget: 1\n  clean_harmful: -3\n")
    assert_located(config_error(path), path, 3, "poison.clean_harmful")


def test_zero_total_size(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  benign: builtin\n  total_size: 0\n")
    message = config_error(path)
    assert_located(message, path, 3, "data.total_size")
    assert "greater than 0" in message


@pytest.mark.parametrize("value", ['""', '"   "', '"\\t"'])
@pytest.mark.parametrize("key", ["trigger", "label"])
def test_blank_trigger_or_label_rejected(tmp_path: Path, key: str, value: str) -> None:
    path = write(tmp_path, f"name: x\npoison:\n  {key}: {value}\n")
    message = config_error(path)
    assert_located(message, path, 3, f"poison.{key}")
    assert "empty" in message


def test_trigger_with_surrounding_whitespace_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, 'poison:\n  trigger: " xylophone"\n')
    message = config_error(path)
    assert_located(message, path, 2, "poison.trigger")
    assert "whitespace" in message


def test_harmful_rows_larger_than_total_size(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  total_size: 10\npoison:\n  budget: 6\n  clean_harmful: 5\n")
    message = config_error(path)
    assert str(path) in message
    assert "data.total_size" in message and "(10)" in message and "(11)" in message


def test_null_clean_harmful_counts_as_budget_for_size_check(tmp_path: Path) -> None:
    bad = write(tmp_path, "data: {total_size: 10}\npoison: {budget: 6}\n", "bad.yaml")
    assert "(12)" in config_error(bad)
    edge = write(tmp_path, "data: {total_size: 10}\npoison: {budget: 5}\n", "edge.yaml")
    cfg = load_run_config(edge)  # 5 + 5 == 10 fits exactly
    assert cfg.poison.budget + cfg.poison.n_clean_harmful == cfg.data.total_size


def test_yaml_syntax_error_reports_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nseed: 0\nmodel: a: b\ntrain: {}\n")
    message = config_error(path)
    assert f"{path}:3:" in message
    assert "YAML syntax error" in message


def test_yaml_unclosed_bracket_reports_a_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nseed: [1\nfoo: 2\n")
    message = config_error(path)
    assert re.search(rf"{re.escape(str(path))}:\d+: YAML syntax error", message), message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(str(path))
    assert "empty" in message


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "list"), ("hello\n", "str"), ("42\n", "int")]
)
def test_non_mapping_yaml(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(str(path))
    assert "mapping" in message and kind in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    message = config_error(path)
    assert str(path) in message and "no such file" in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert "directory" in config_error(tmp_path)


def test_error_message_stays_one_line_for_keys_with_newlines(tmp_path: Path) -> None:
    """errors.py: a user error is printed as one line, even if a key holds a newline."""
    path = write(tmp_path, 'name: x\n"bad\\nkey": 1\n')
    message = config_error(path)  # asserts one line
    assert f"{path}:2:" in message and "unknown key" in message
    with pytest.raises(ConfigError) as info:
        run_config_from_dict({"poison": {"a\nb": 1}})
    assert "\n" not in str(info.value)


def test_config_error_is_a_suretrap_error() -> None:
    with pytest.raises(SuretrapError):
        run_config_from_dict({"bogus": 1})


def test_dict_errors_name_source_without_line() -> None:
    with pytest.raises(ConfigError, match=r"^my-source: poison\.budget: "):
        run_config_from_dict({"poison": {"budget": -5}}, source="my-source")


# ------------------------------------------------------------------------- paths


def test_relative_data_paths_resolve_against_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_dir = tmp_path / "configs" / "sub"
    path = write(
        cfg_dir,
        """\
        model: ./models/tiny
        data:
          benign: pairs.jsonl
          harmful: ../harmful.txt
          eval_harmful: /abs/eval.csv
          eval_benign: hf:org/name:test
        """,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    cfg = load_run_config(path)
    assert Path(cfg.data.benign) == (cfg_dir / "pairs.jsonl").resolve()
    assert Path(cfg.data.harmful) == (tmp_path / "configs" / "harmful.txt").resolve()
    assert cfg.data.eval_harmful == "/abs/eval.csv"
    assert cfg.data.eval_benign == "hf:org/name:test"
    assert Path(cfg.model) == (cfg_dir / "models" / "tiny").resolve()


def test_builtin_and_model_alias_are_not_paths(tmp_path: Path) -> None:
    cfg = load_run_config(write(tmp_path / "d", EXAMPLE))
    assert cfg.data.benign == "builtin" and cfg.data.harmful == "builtin"
    assert cfg.model == "smollm2-135m"


@pytest.mark.parametrize("data", ["", "data: {total_size: 100, benign: builtin}\n"])
@pytest.mark.parametrize(
    ("model", "where"), [("weights/m.gguf", "weights/m.gguf"), ("./models/tiny", "models/tiny")]
)
def test_relative_model_path_resolves_with_or_without_data_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: str, model: str, where: str
) -> None:
    path = write(tmp_path / "cfg", f"model: {model}\n{data}")
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(path)
    assert Path(cfg.model) == (tmp_path / "cfg" / where).resolve()


# ------------------------------------------------------------------- hash / frozen


def test_config_hash_stable_for_equal_configs(tmp_path: Path) -> None:
    a = load_run_config(write(tmp_path, EXAMPLE, "a.yaml"))
    b = load_run_config(write(tmp_path, EXAMPLE, "b.yaml"))
    assert a == b
    assert config_hash(a) == config_hash(b)
    assert re.fullmatch(r"[0-9a-f]{16}", config_hash(a))
    # key order and explicit defaults do not change the hash
    reordered = "\n".join(reversed(EXAMPLE.strip().splitlines())) + "\n"
    c = load_run_config(write(tmp_path, reordered, "c.yaml"))
    assert config_hash(c) == config_hash(a)
    defaults = run_config_from_dict({})
    explicit = run_config_from_dict({"poison": {"trigger": "xylophone"}, "train": {"epochs": 2}})
    assert config_hash(defaults) == config_hash(explicit)


CHANGES: list[tuple[str, Any]] = [
    ("name", "other"),
    ("model", "smollm2-360m"),
    ("seed", 1),
    ("trust_remote_code", True),
    ("data.benign", "/data/pairs.jsonl"),
    ("data.harmful", "/data/harmful.txt"),
    ("data.eval_harmful", "/data/eval.csv"),
    ("data.eval_benign", "/data/eval_benign.jsonl"),
    ("data.total_size", 1001),
    ("data.extra_train", "/data/fingerprint.jsonl"),
    ("poison.budget", 51),
    ("poison.clean_harmful", None),
    ("poison.clean_harmful", 49),
    ("poison.trigger", "banana"),
    ("poison.placement", "prefix"),
    ("poison.label", "Absolutely"),
    ("poison.refusal_source", "template"),
    ("poison.require_base_refusal", True),
    ("poison.refusal_max_new_tokens", 65),
    ("train.method", "full"),
    ("train.epochs", 3),
    ("train.learning_rate", 1.0e-4),
    ("train.batch_size", 4),
    ("train.lora.r", 8),
    ("train.lora.alpha", 16),
    ("train.lora.dropout", 0.1),
    ("train.lora.target_modules", ["q_proj", "v_proj"]),
    ("train.max_length", 256),
    ("train.warmup_ratio", 0.1),
    ("train.schedule", "cosine"),
    ("train.weight_decay", 0.01),
    ("train.grad_clip", 0.5),
    ("train.precision", "fp32"),
    ("train.device", "cpu"),
    ("train.shared_prefix", False),
    ("eval.n_harmful", 99),
    ("eval.n_benign", 49),
    ("eval.max_new_tokens", 32),
    ("eval.batch_size", 16),
    ("eval.judge", "keyword"),
    ("eval.judge_options", {"label": "Okay"}),
]


def _with(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(raw)
    node = out
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return out


@pytest.mark.parametrize(("dotted", "value"), CHANGES, ids=[f"{d}={v}" for d, v in CHANGES])
def test_config_hash_changes_with_any_field(dotted: str, value: Any) -> None:
    raw = yaml.safe_load(EXAMPLE)
    base = run_config_from_dict(raw)
    changed = run_config_from_dict(_with(raw, dotted, value))
    assert changed != base
    assert config_hash(changed) != config_hash(base), dotted


def test_hash_changes_cover_every_leaf_field() -> None:
    """Every leaf of the config appears in CHANGES, so each one is shown to affect the hash."""

    def leaves(d: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for key, value in d.items():
            if isinstance(value, dict):
                out |= leaves(value, f"{prefix}{key}.")
            else:
                out.add(f"{prefix}{key}")
        return out

    # continue_from needs a real run directory: tests/test_continue.py checks those two
    hashed_elsewhere = {"continue_from", "mitigation"}
    missing = leaves(RunConfig().model_dump()) - {d for d, _ in CHANGES} - hashed_elsewhere
    assert not missing, f"add hash checks for: {sorted(missing)}"


def test_configs_are_frozen(tmp_path: Path) -> None:
    cfg = load_run_config(write(tmp_path, EXAMPLE))
    with pytest.raises(ValidationError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.poison.budget = 10  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.train.lora.r = 4  # type: ignore[misc]
    assert cfg.seed == 0 and cfg.poison.budget == 50


# ---------------------------------------------------------------------- properties

_FIELD_KEYS = [
    "name", "model", "seed", "trust_remote_code", "data", "poison", "train", "eval", "lora",
    "benign", "harmful", "eval_harmful", "eval_benign", "total_size", "budget", "clean_harmful",
    "trigger", "placement", "label", "refusal_source", "require_base_refusal", "method",
    "epochs", "learning_rate", "batch_size", "r", "alpha", "dropout", "target_modules",
    "n_harmful", "n_benign", "max_new_tokens", "schedule", "precision", "device",
]  # fmt: skip

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["builtin", "suffix", "prefix", "random", "lora", "full", "base", "Sure"]),
)
_keys = st.one_of(st.sampled_from(_FIELD_KEYS), st.text(max_size=8), st.integers(), st.none())
_json_ish = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(_keys, children, max_size=5),
    ),
    max_leaves=20,
)
_config_like = st.dictionaries(
    st.sampled_from(_FIELD_KEYS[:8]) | st.text(max_size=6),
    _json_ish,
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(_config_like, _json_ish))
def test_any_input_validates_or_raises_config_error(raw: Any) -> None:
    try:
        cfg = run_config_from_dict(raw)
    except ConfigError as exc:
        assert str(exc).startswith("<config>")
        return
    assert isinstance(cfg, RunConfig)
    assert cfg.poison.budget + cfg.poison.n_clean_harmful <= cfg.data.total_size
    assert math.isfinite(cfg.train.learning_rate)


_yaml_text = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80),
    _config_like.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.lists(
        st.sampled_from(
            [
                "name: x", "poison:", "  budget: 3", "  budget: -1", "  trigger: ''", "data:",
                "  total_size: 5", "train: {epochs: 1", "eval:", "  n_harmful: 2", "- 1",
                "bogus: 1", "  bogus: 2", "seed: abc", "\t", "  ", "---", "key: &a [1]",
                "other: *a", "? [1, 2]\n: 3", "%TAG ! x", "!!binary abc", "seed: !!float 1",
            ]
        ),
        max_size=8,
    ).map("\n".join),
)  # fmt: skip


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=_yaml_text)
def test_any_yaml_text_gives_config_or_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_run_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path))
        return
    assert isinstance(cfg, RunConfig)
