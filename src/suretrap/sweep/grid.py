"""Sweep specs: a base run config plus axes over dotted field paths, expanded as a grid.

The YAML shape is a public contract:

    base: {...a run config...}     # or base: path/to/run.yaml (relative to this file)
    axes:
      poison.budget: [0, 5, 10, 25, 50, 100]
      data.total_size: [1000, 10000]
      model: [smollm2-135m]
      seed: [0, 1, 2]
    resources:                     # optional; read by `--backend ray` only
      num_gpus: 1                  # GPUs per worker; 0.25 = four workers share one GPU
      num_cpus: 1                  # CPU cores per worker
      max_retries: 2               # re-runs of a cell whose worker died or raised
      max_workers: null            # null = as many as the cluster's resources fit

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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from suretrap.config import (
    RunConfig,
    _line_of,
    _resolve_paths,
    config_hash,
    format_validation_error,
    parse_yaml,
    run_config_from_dict,
)
from suretrap.errors import ConfigError

SWEEP_KEYS = {"base", "axes", "resources"}


class SweepResources(BaseModel):
    """What each distributed worker asks the scheduler for (`resources:` in a sweep file).

    Not part of any cell's config hash: the same cell run on a laptop or a cluster is one
    cell. The local backend ignores it (it runs in one process on what it has).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    # Ray's own rule: a quantity above 1 must be whole (2 GPUs, not 1.5)
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, gt=0)
    max_retries: int = Field(2, ge=0)
    max_workers: int | None = Field(None, gt=0)

    @field_validator("num_gpus", "num_cpus", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        # strict mode refuses an int for a float field; 1 GPU is a fine way to say 1.0
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("num_gpus", "num_cpus")
    @classmethod
    def _whole_above_one(cls, value: float) -> float:
        if value > 1 and not value.is_integer():
            raise ValueError("a quantity above 1 must be a whole number (Ray's rule)")
        return value


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
    resources: SweepResources = SweepResources()
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
            raise ConfigError(
                f"{path}:{_line_of(node, (key,))}: {key}: unknown key (expected base, axes, resources)"
            )
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
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict):
        raise ConfigError(
            f"{path}:{_line_of(node, ('resources',))}: resources: must be a mapping "
            "(num_gpus, num_cpus, max_retries, max_workers)"
        )
    try:
        parsed = SweepResources.model_validate(resources)
    except ValidationError as err:
        raise ConfigError(
            format_validation_error(err, str(path), resources, node, prefix=("resources",))
        ) from None
    return SweepSpec(base, axes, str(path), resources=parsed, node=node)


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
