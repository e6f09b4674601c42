"""Sweep specs: a base run config plus axes over dotted field paths, expanded as a grid.

The YAML shape is a public contract:

    base: {...a run config...}     # or base: path/to/run.yaml (relative to this file)
    axes:
      poison.budget: [0, 5, 10, 25, 50, 100]
      data.total_size: [1000, 10000]
      model: [smollm2-135m]
      seed: [0, 1, 2]

Each cell is identified by the hash of its full resolved run config, so the same cell
reached from two sweep files (or from `suretrap threshold`) is one cell.
"""

from __future__ import annotations

import copy
import itertools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from suretrap.config import (
    RunConfig,
    _line_of,
    _resolve_paths,
    config_hash,
    parse_yaml,
    run_config_from_dict,
)
from suretrap.errors import ConfigError

SWEEP_KEYS = {"base", "axes"}


@dataclass(frozen=True)
class Cell:
    """One grid point: its resolved config, its axis values, and its identity."""

    config: RunConfig
    axes: dict[str, Any]
    config_hash: str


@dataclass(frozen=True)
class SweepSpec:
    base: dict[str, Any]  # raw run config (paths already resolved)
    axes: dict[str, list[Any]]
    source: str = "<sweep>"
    node: yaml.Node | None = field(default=None, compare=False, repr=False)


def _field_exists(dotted: str) -> bool:
    model: type[BaseModel] | None = RunConfig
    for part in dotted.split("."):
        if model is None or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        # an optional section (`mitigation: MitigationConfig | None`) is walked into too
        members = typing.get_args(annotation) or (annotation,)
        model = next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), None)
    return True


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep YAML; errors name the file, line and key."""
    path = Path(path)
    raw, node = parse_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep must be a mapping with keys 'base' and 'axes'")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{path}:{_line_of(node, (key,))}: {key}: unknown key (expected base, axes)")
    base = raw.get("base")
    if isinstance(base, str):
        base_path = (path.parent / base).resolve()
        base, _ = parse_yaml(base_path)
        if isinstance(base, dict):
            _resolve_paths(base, base_path.parent)
    elif isinstance(base, dict):
        _resolve_paths(base, path.resolve().parent)
    else:
        raise ConfigError(f"{path}: base: must be a run config mapping or a path to one")
    axes = raw.get("axes") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"{path}: axes: must map dotted field names to lists of values")
    for name, values in axes.items():
        line = _line_of(node, ("axes", name))
        if not isinstance(name, str) or not _field_exists(name):
            raise ConfigError(f"{path}:{line}: axes.{name}: not a run config field")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}:{line}: axes.{name}: must be a non-empty list")
    return SweepSpec(base, axes, str(path), node)


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating intermediate mappings."""
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def expand(spec: SweepSpec) -> list[Cell]:
    """All grid cells, in axis order, validated; duplicates (same hash) dropped."""
    names = list(spec.axes)
    cells: list[Cell] = []
    seen: set[str] = set()
    for values in itertools.product(*(spec.axes[n] for n in names)):
        raw = copy.deepcopy(spec.base)
        axes = dict(zip(names, values, strict=True))
        for name, value in axes.items():
            set_dotted(raw, name, value)
        where = ", ".join(f"{k}={v}" for k, v in axes.items())
        try:
            cfg = run_config_from_dict(raw, f"{spec.source} [{where}]")
        except ConfigError as exc:
            raise ConfigError(str(exc)) from None
        digest = config_hash(cfg)
        if digest not in seen:
            seen.add(digest)
            cells.append(Cell(cfg, axes, digest))
    return cells


def cell_for(base: RunConfig, axes: dict[str, Any]) -> Cell:
    """The cell of `base` with `axes` overridden (used by the adaptive threshold search)."""
    raw = base.model_dump(mode="json")
    for name, value in axes.items():
        set_dotted(raw, name, value)
    cfg = run_config_from_dict(raw)
    return Cell(cfg, dict(axes), config_hash(cfg))
