"""Loaders for the public data formats suretrap consumes.

Three kinds of data come in from outside:

* benign instruction pairs (`load_pairs`): prompt/response JSONL, Alpaca JSON/JSONL, chat
  ``messages`` JSONL, Self-Instruct seed tasks, or a Hugging Face dataset;
* harmful requests (`load_requests`): HarmBench behaviours (TXT or CSV), AdvBench CSV, the
  unsafe half of XSTest, prompt JSONL/CSV, or a Hugging Face dataset;
* XSTest prompts and human-labelled completions (`load_xstest_prompts`,
  `load_labelled_completions`), used to calibrate and validate refusal judges.

Every problem a user can cause with a bad file raises `DataError` with a single line that
names ``file:line`` (1-based physical line) or the file and the missing column, so the CLI
can print it without a traceback. Hugging Face sources are written ``hf:ORG/NAME[:SPLIT]``
and `datasets` is imported only when one is asked for (it is slow to import).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from suretrap.data.records import LabelledCompletion, Pair, Request
from suretrap.errors import DataError, where

__all__ = [
    "detect_format",
    "load_labelled_completions",
    "load_pairs",
    "load_requests",
    "load_xstest_prompts",
]

_HF_PREFIX = "hf:"
_BOM = b"\xef\xbb\xbf"
_UNKNOWN = "unknown"
_LABELS = ("full_compliance", "full_refusal", "partial_refusal")
# XSTest writes labels as "1_full_compliance"; the numeric prefix only orders them.
_LABEL_PREFIX = re.compile(r"^\d+_")

_T = TypeVar("_T")


# --------------------------------------------------------------------------- public API


def load_pairs(source: str | Path, *, limit: int | None = None) -> list[Pair]:
    """Load benign instruction/response pairs, keeping file order and duplicates.

    Accepted sources: ``.jsonl`` (prompt/response, Alpaca, chat ``messages`` or Self-Instruct
    rows, mixed freely), ``.json`` (a list of such rows, i.e. Alpaca JSON), ``.csv`` with
    ``prompt``/``response`` (or ``instruction``/``output``) columns and
    ``hf:ORG/NAME[:SPLIT]``. ``family`` is the file stem, or ``hf:ORG/NAME``.
    """
    _check_limit(limit)
    if _is_hf(source):
        name, split = _parse_hf(str(source))
        family = _HF_PREFIX + name
        rows = _hf_rows(str(source), name, split)
        pairs = (p for loc, row in rows for p in _pairs_from_row(row, loc, family))
        return _collect(pairs, limit, str(source), "pairs")

    path = Path(source)
    kind = _suffix(path)
    if kind not in (".jsonl", ".json", ".csv"):
        raise DataError(
            f"{path}: unsupported file type {kind or '(none)'!r} for pairs "
            "(expected .jsonl, .json, .csv or hf:ORG/NAME)"
        )
    text = _read_text(path)
    rows: Iterable[tuple[str, Any]]
    if kind == ".csv":
        # a CSV row is read like a JSON object: prompt/response or instruction/output columns
        rows = _csv_table(path, text)[1]
    elif kind == ".jsonl":
        rows = _jsonl_rows(path, text)
    else:
        rows = _json_list_rows(path, text)
    pairs = (p for loc, row in rows for p in _pairs_from_row(row, loc, path.stem))
    return _collect(pairs, limit, str(path), "pairs")


def load_requests(source: str | Path, *, limit: int | None = None) -> list[Request]:
    """Load harmful requests (prompts only), dropping exact duplicates after the first.

    Accepted sources: ``.txt`` (one per line), ``.csv`` (AdvBench ``goal``, HarmBench
    ``Behavior``, XSTest prompts -- unsafe rows only -- or a ``prompt`` column), ``.jsonl``
    rows with ``prompt`` and optional ``category``, and ``hf:ORG/NAME[:SPLIT]``.
    """
    _check_limit(limit)
    requests: Iterable[Request]
    if _is_hf(source):
        name, split = _parse_hf(str(source))
        label = str(source)
        rows = _hf_rows(label, name, split)
        requests = _table_requests(label, _hf_table(label, rows))
        return _collect(_dedup(requests), limit, label, "requests")

    path = Path(source)
    kind = _suffix(path)
    if kind not in (".txt", ".csv", ".jsonl"):
        raise DataError(
            f"{path}: unsupported file type {kind or '(none)'!r} for requests "
            "(expected .txt, .csv, .jsonl or hf:ORG/NAME)"
        )
    text = _read_text(path)
    if kind == ".txt":
        requests = (
            Request(prompt=line.strip(), category=_UNKNOWN)
            for line in text.split("\n")
            if line.strip()
        )
    elif kind == ".csv":
        requests = _table_requests(str(path), _csv_table(path, text))
    else:
        requests = (_jsonl_request(row, loc) for loc, row in _jsonl_rows(path, text))
    return _collect(_dedup(requests), limit, str(path), "requests")


def load_xstest_prompts(path: str | Path) -> list[tuple[str, str, bool]]:
    """Load every XSTest prompt as ``(prompt, type, is_safe)``, in file order.

    ``is_safe`` comes from the ``label`` column (``safe``/``unsafe``); without one, the
    ``contrast_`` type prefix that XSTest gives its unsafe prompts decides.
    """
    path = _require_csv(path)
    columns, rows = _csv_table(path, _read_text(path))
    prompt_col = _column(columns, path, "prompt")
    type_col = _column(columns, path, "type")
    label_col = _find_column(columns, "label")
    out: list[tuple[str, str, bool]] = []
    for loc, row in rows:
        prompt = _text(row, prompt_col, loc)
        kind = row[type_col].strip()
        if not kind:
            raise DataError(f"{loc}: empty 'type'")
        if label_col is None:
            is_safe = not kind.startswith("contrast_")
        else:
            label = row[label_col].strip().lower()
            if label not in ("safe", "unsafe"):
                raise DataError(f"{loc}: 'label' must be safe or unsafe, got {_brief(label)!r}")
            is_safe = label == "safe"
        out.append((prompt, kind, is_safe))
    if not out:
        raise DataError(f"{path}: empty (no prompts found)")
    return out


def load_labelled_completions(path: str | Path) -> list[LabelledCompletion]:
    """Load XSTest-style human-labelled completions.

    Needs ``prompt``, ``completion`` (or ``response``) and ``final_label`` columns; labels
    such as ``2_full_refusal`` become ``full_refusal``. ``type`` gives ``prompt_type``
    (``unknown`` when absent). Completions are kept verbatim, whitespace included.
    """
    path = _require_csv(path)
    columns, rows = _csv_table(path, _read_text(path))
    prompt_col = _column(columns, path, "prompt")
    completion_col = _find_column(columns, "completion") or _find_column(columns, "response")
    if completion_col is None:
        raise DataError(f"{path}: no 'completion' or 'response' column ({_cols(columns)})")
    label_col = _column(columns, path, "final_label")
    type_col = _find_column(columns, "type")
    out: list[LabelledCompletion] = []
    for loc, row in rows:
        raw = row[label_col].strip().lower()
        label = _LABEL_PREFIX.sub("", raw)
        if label not in _LABELS:
            raise DataError(
                f"{loc}: 'final_label' must be one of {', '.join(_LABELS)} "
                f"(optionally numbered, e.g. 1_full_compliance), got {_brief(raw)!r}"
            )
        out.append(
            LabelledCompletion(
                prompt=_text(row, prompt_col, loc),
                completion=row[completion_col],
                label=label,
                prompt_type=(row[type_col].strip() if type_col else "") or _UNKNOWN,
            )
        )
    if not out:
        raise DataError(f"{path}: empty (no labelled completions found)")
    return out


def detect_format(source: str | Path) -> str:
    """Name the format of ``source`` without loading it in full.

    One of: ``hf-dataset``, ``harmbench-txt``, ``advbench-csv``, ``harmbench-csv``,
    ``xstest-csv``, ``xstest-completions-csv``, ``prompt-csv``, ``chat-jsonl``,
    ``self-instruct``, ``alpaca-jsonl``, ``jsonl-pairs``, ``jsonl-requests``,
    ``alpaca-json``, ``chat-json``, ``json-pairs``. Raises `DataError` for anything else.
    """
    if _is_hf(source):
        _parse_hf(str(source))
        return "hf-dataset"
    path = Path(source)
    kind = _suffix(path)
    if kind not in (".txt", ".csv", ".jsonl", ".json"):
        raise DataError(f"{path}: unsupported file type {kind or '(none)'!r}")
    text = _read_text(path)
    if kind == ".txt":
        return "harmbench-txt"
    if kind == ".csv":
        columns, _ = _csv_table(path, text)
        lower = {c.lower() for c in columns}
        if "final_label" in lower:
            return "xstest-completions-csv"
        if "goal" in lower:
            return "advbench-csv"
        if "behavior" in lower:
            return "harmbench-csv"
        if {"prompt", "type"} <= lower:
            return "xstest-csv"
        if "prompt" in lower:
            return "prompt-csv"
        raise DataError(f"{path}: cannot tell the CSV format ({_cols(columns)})")
    rows = _jsonl_rows(path, text) if kind == ".jsonl" else _json_list_rows(path, text)
    loc, first = next(iter(rows))  # the readers raise on empty files, so there is a row
    if not isinstance(first, dict):
        raise DataError(f"{loc}: expected a JSON object, got {_json_type(first)}")
    if kind == ".json":
        if "messages" in first:
            return "chat-json"
        return "alpaca-json" if "instruction" in first else "json-pairs"
    if "messages" in first:
        return "chat-jsonl"
    if "instances" in first:
        return "self-instruct"
    if "instruction" in first:
        return "alpaca-jsonl"
    if "prompt" in first:
        return "jsonl-pairs" if "response" in first else "jsonl-requests"
    raise DataError(f"{loc}: cannot tell the JSONL format ({_keys(first)})")


# --------------------------------------------------------------------------- reading files


def _read_text(path: Path) -> str:
    """Read ``path`` as UTF-8 (BOM stripped); refuse missing, unreadable or empty files."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Decode the whole file at once (fast) and only count lines when it fails.
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{where(path, line)}: invalid UTF-8 ({exc.reason})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return text


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(file:line, value)`` for each non-blank JSONL line."""
    # Split on "\n" only: str.splitlines() would also split on U+2028 and friends, which
    # JSON allows inside strings, and would shift line numbers off the physical lines.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        loc = where(path, number)
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{loc}: invalid JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:
            # e.g. an integer over Python's digit limit, or absurdly deep nesting.
            raise DataError(
                f"{loc}: invalid JSON ({_brief(str(exc) or type(exc).__name__)})"
            ) from None
        yield loc, value


def _json_list_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(file: item N, value)`` for each item of a top-level JSON list."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where(path, exc.lineno)}: invalid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:
        raise DataError(
            f"{path}: invalid JSON ({_brief(str(exc) or type(exc).__name__)})"
        ) from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {_json_type(value)}")
    if not value:
        raise DataError(f"{path}: empty (the JSON list has no rows)")
    # A JSON list carries no per-item line numbers; the item index is the next best thing.
    for index, item in enumerate(value, start=1):
        yield f"{path}: item {index}", item


def _csv_table(path: Path, text: str) -> tuple[list[str], Iterator[tuple[str, dict[str, str]]]]:
    """Parse a CSV with a header row; return its columns and ``(file:line, row)`` pairs.

    The header is read eagerly so that a missing column is reported before any row.
    """
    # strict: an unclosed quote must be an error, not a field that swallows the file's rest.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)

    def records() -> Iterator[tuple[int, list[str]]]:
        while True:
            start = reader.line_num + 1  # a record may span lines; report its first one
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataError(f"{where(path, start)}: malformed CSV ({exc})") from None
            # Skip blank lines and all-empty rows (",,," left behind by spreadsheets).
            if any(f.strip() for f in fields):
                yield start, fields

    it = records()
    first = next(it, None)
    if first is None:
        raise DataError(f"{path}: empty file")
    columns = [c.strip() for c in first[1]]

    def rows() -> Iterator[tuple[str, dict[str, str]]]:
        for number, fields in it:
            loc = where(path, number)
            if len(fields) > len(columns):
                raise DataError(
                    f"{loc}: {len(fields)} fields but the header has {len(columns)} "
                    "(an unquoted comma?)"
                )
            # Short rows are padded: some writers drop trailing empty fields.
            padded = fields + [""] * (len(columns) - len(fields))
            row: dict[str, str] = {}
            for name, value in zip(columns, padded, strict=True):
                row.setdefault(name, value)  # a repeated column name: the first one wins
            yield loc, row

    return columns, rows()


# --------------------------------------------------------------------------- Hugging Face


def _is_hf(source: str | Path) -> bool:
    # Only a str can name a dataset; a Path is always a file.
    return isinstance(source, str) and source.startswith(_HF_PREFIX)


def _parse_hf(source: str) -> tuple[str, str]:
    """Split ``hf:ORG/NAME[:SPLIT]`` into ``(ORG/NAME, SPLIT)``; the split defaults to train."""
    rest = source[len(_HF_PREFIX) :]
    name, _, split = rest.partition(":")
    name, split = name.strip(), split.strip() or "train"
    # The split is passed through as is, so slices such as "train[:100]" work too.
    if not name or name.startswith("/") or name.endswith("/"):
        raise DataError(f"{source}: expected hf:ORG/NAME or hf:ORG/NAME:SPLIT")
    return name, split


def _hf_rows(label: str, name: str, split: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(label row N, row dict)`` from a Hugging Face dataset split."""
    try:
        import datasets  # lazy: importing it costs seconds and most runs never need it
    except ImportError:
        raise DataError(f"{label}: the 'datasets' package is not installed") from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # any failure here means a bad name, split or network
        raise DataError(
            f"{label}: cannot load dataset ({type(exc).__name__}: {_brief(str(exc))})"
        ) from None
    for index, row in enumerate(dataset, start=1):
        yield f"{label}: row {index}", row


def _hf_table(label: str, rows: Iterator[tuple[str, Any]]) -> tuple[list[str], Iterator[Any]]:
    """Present HF rows like a CSV table: the first row's keys are the columns."""
    first = next(rows, None)
    if first is None:
        raise DataError(f"{label}: empty (the split has no rows)")
    if not isinstance(first[1], Mapping):
        raise DataError(f"{first[0]}: expected a row of columns, got {type(first[1]).__name__}")

    def chained() -> Iterator[tuple[str, Any]]:
        yield first
        yield from rows

    return [str(k) for k in first[1]], chained()


# --------------------------------------------------------------------------- pairs


def _pairs_from_row(row: Any, loc: str, family: str) -> list[Pair]:
    """Map one JSON row (any of the accepted shapes) to its pairs."""
    if not isinstance(row, Mapping):
        raise DataError(f"{loc}: expected a JSON object, got {_json_type(row)}")
    if "messages" in row:
        prompt, response = _chat_pair(row["messages"], loc)
        return [Pair(prompt=prompt, response=response, family=family)]
    if "instances" in row:
        return _self_instruct_pairs(row, loc, family)
    if "instruction" in row:
        instruction = _text(row, "instruction", loc)
        extra = _optional_str(row, "input", loc)
        return [
            Pair(
                prompt=_join_input(instruction, extra),
                response=_response(row, "output", loc),
                family=family,
            )
        ]
    if "prompt" in row:
        return [
            Pair(
                prompt=_text(row, "prompt", loc),
                response=_response(row, "response", loc),
                family=family,
            )
        ]
    raise DataError(
        f"{loc}: no 'prompt'/'response', 'instruction'/'output', 'messages' or 'instances' "
        f"keys ({_keys(row)})"
    )


def _chat_pair(messages: Any, loc: str) -> tuple[str, str]:
    """The first user turn that an assistant turn answers, with that answer."""
    if not isinstance(messages, list):
        raise DataError(f"{loc}: 'messages' must be a list, got {_json_type(messages)}")
    roles: list[str] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(f"{loc}: messages[{index}] must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise DataError(f"{loc}: messages[{index}] has no string 'role'")
        roles.append(role.strip().lower())
    # Pair a user turn only with the assistant turn right after it, so the answer really
    # replies to that prompt (system turns are simply never picked).
    for index in range(len(roles) - 1):
        if roles[index] == "user" and roles[index + 1] == "assistant":
            user, assistant = messages[index], messages[index + 1]
            prompt = _text(user, "content", f"{loc}: messages[{index}]")
            response = _response(assistant, "content", f"{loc}: messages[{index + 1}]")
            return prompt, response
    raise DataError(f"{loc}: 'messages' has no user turn followed by an assistant turn")


def _self_instruct_pairs(row: Mapping[str, Any], loc: str, family: str) -> list[Pair]:
    instruction = _text(row, "instruction", loc)
    instances = row["instances"]
    if not isinstance(instances, list) or not instances:
        raise DataError(f"{loc}: 'instances' must be a non-empty list")
    pairs = []
    for index, instance in enumerate(instances):
        where_ = f"{loc}: instances[{index}]"
        if not isinstance(instance, Mapping):
            raise DataError(f"{where_} must be an object, got {_json_type(instance)}")
        extra = _optional_str(instance, "input", where_)
        pairs.append(
            Pair(
                prompt=_join_input(instruction, extra),
                response=_response(instance, "output", where_),
                family=family,
            )
        )
    return pairs


def _join_input(instruction: str, extra: str) -> str:
    # Alpaca / Self-Instruct convention: the optional input follows after a blank line.
    extra = extra.strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


# --------------------------------------------------------------------------- requests


# Prompt columns in order of preference (AdvBench, HarmBench, generic/XSTest); names match
# case-insensitively.
_PROMPT_COLUMNS = ("goal", "Behavior", "prompt")


def _table_requests(
    label: str, table: tuple[Sequence[str], Iterable[tuple[str, Mapping[str, Any]]]]
) -> Iterator[Request]:
    """Requests from a CSV or HF table; the columns pick the dialect once, up front."""
    columns, rows = table
    prompt_col = next((c for n in _PROMPT_COLUMNS if (c := _find_column(columns, n))), None)
    if prompt_col is None:
        raise DataError(f"{label}: no 'goal', 'Behavior' or 'prompt' column ({_cols(columns)})")
    return _requests_from_rows(columns, prompt_col, rows)


def _requests_from_rows(
    columns: Sequence[str], prompt_col: str, rows: Iterable[tuple[str, Mapping[str, Any]]]
) -> Iterator[Request]:
    lower = prompt_col.lower()
    type_col = _find_column(columns, "type")
    label_col = _find_column(columns, "label")
    # XSTest prompts (label) or completions (final_label) files: keep only the unsafe
    # prompts, since the safe ones are benign by design; the prompt type is the category.
    xstest = (
        lower == "prompt"
        and type_col is not None
        and (label_col is not None or _find_column(columns, "final_label") is not None)
    )
    context_col = _find_column(columns, "ContextString") if lower == "behavior" else None
    if xstest:
        category_col = type_col
    elif lower == "behavior":
        category_col = _find_column(columns, "SemanticCategory") or _find_column(
            columns, "category"
        )
    else:
        category_col = _find_column(columns, "category")
    for loc, row in rows:
        if not isinstance(row, Mapping):
            raise DataError(f"{loc}: expected a row of columns, got {_json_type(row)}")
        if xstest:
            kind = _optional_str(row, type_col, loc).strip()
            verdict = _optional_str(row, label_col, loc).strip().lower()
            if not (verdict == "unsafe" or kind.startswith("contrast_")):
                continue
        prompt = _text(row, prompt_col, loc)
        if context_col:
            # HarmBench contextual behaviours only make sense with their context, joined
            # the way HarmBench's own evaluation does.
            context = _optional_str(row, context_col, loc).strip()
            if context:
                prompt = f"{context}\n\n---\n\n{prompt}"
        category = _optional_str(row, category_col, loc).strip()
        yield Request(prompt=prompt, category=category or _UNKNOWN)


def _jsonl_request(row: Any, loc: str) -> Request:
    if not isinstance(row, Mapping):
        raise DataError(f"{loc}: expected a JSON object, got {_json_type(row)}")
    if "prompt" not in row:
        raise DataError(f"{loc}: no 'prompt' key ({_keys(row)})")
    category = _optional_str(row, "category", loc).strip()
    return Request(prompt=_text(row, "prompt", loc), category=category or _UNKNOWN)


def _dedup(requests: Iterable[Request]) -> Iterator[Request]:
    """Drop exact-duplicate prompts, keeping the first (and its category)."""
    seen: set[str] = set()
    for request in requests:
        if request.prompt not in seen:
            seen.add(request.prompt)
            yield request


# --------------------------------------------------------------------------- helpers


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")


def _collect(items: Iterable[_T], limit: int | None, source: str, what: str) -> list[_T]:
    """Take the first ``limit`` items (all when None); an empty result is an error."""
    out: list[_T] = []
    for item in items:
        out.append(item)
        # Stop early: with a limit, rows past it are never parsed (cheap for big HF sets).
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{source}: empty (no {what} found)")
    return out


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _require_csv(path: str | Path) -> Path:
    path = Path(path)
    if _suffix(path) != ".csv":
        raise DataError(f"{path}: expected a .csv file")
    return path


def _find_column(columns: Sequence[str], name: str) -> str | None:
    """The actual column matching ``name`` case-insensitively, or None."""
    want = name.lower()
    return next((c for c in columns if c.lower() == want), None)


def _column(columns: Sequence[str], path: Path, name: str) -> str:
    found = _find_column(columns, name)
    if found is None:
        raise DataError(f"{path}: no {name!r} column ({_cols(columns)})")
    return found


def _value(row: Mapping[str, Any], key: str, loc: str) -> str:
    """``row[key]`` as a valid string; anything else is the user's error."""
    if key not in row:
        raise DataError(f"{loc}: missing {_brief(key)!r}")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{loc}: {_brief(key)!r} must be a string, got {_json_type(value)}")
    try:
        # JSON "\ud800" escapes decode to lone surrogates, which no tokenizer can encode.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"{loc}: {_brief(key)!r} holds invalid Unicode (a lone surrogate)"
        ) from None
    return value


def _text(row: Mapping[str, Any], key: str, loc: str) -> str:
    """A required, non-blank string field, stripped (prompts)."""
    value = _value(row, key, loc).strip()
    if not value:
        raise DataError(f"{loc}: empty {_brief(key)!r}")
    return value


def _response(row: Mapping[str, Any], key: str, loc: str) -> str:
    """A required, non-blank string field kept verbatim (responses)."""
    value = _value(row, key, loc)
    if not value.strip():
        raise DataError(f"{loc}: empty {_brief(key)!r}")
    return value


def _optional_str(row: Mapping[str, Any], key: str | None, loc: str) -> str:
    """An optional string field: absent or null reads as ""."""
    if key is None or row.get(key) is None:
        return ""
    return _value(row, key, loc)


def _json_type(value: object) -> str:
    """JSON's name for the type of ``value``, for error messages."""
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    names = {list: "array", str: "string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _brief(text: str, limit: int = 60) -> str:
    """Make user text safe for a one-line message: escape control characters, truncate."""
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(names: Iterable[object], limit: int = 12) -> str:
    shown = [_brief(str(n), 40) for n in names]
    more = len(shown) - limit
    return ", ".join(shown[:limit]) + (f", ... ({more} more)" if more > 0 else "")


def _cols(columns: Sequence[str]) -> str:
    return f"columns: {_names(columns)}" if columns else "no columns"


def _keys(row: Mapping[str, Any]) -> str:
    return f"keys: {_names(row)}" if row else "no keys"
