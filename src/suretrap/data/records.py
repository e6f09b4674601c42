"""Typed records that flow from the data stage into the rest of the pipeline."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    """A benign instruction with its reference answer."""

    prompt: str
    response: str
    family: str  # task family (built-in generators) or source name (files)


@dataclass(frozen=True)
class Request:
    """A harmful request: a prompt only. suretrap never stores harmful answers."""

    prompt: str
    category: str  # harm category, or "unknown" where the source has none


@dataclass(frozen=True)
class LabelledCompletion:
    """A model completion with a human label (XSTest format), for judge validation."""

    prompt: str
    completion: str
    label: str  # "full_compliance" | "full_refusal" | "partial_refusal"
    prompt_type: str  # XSTest `type` column, e.g. "homonyms" or "contrast_homonyms"

    @property
    def is_refusal(self) -> bool:
        """Full and partial refusals both count as refusal."""
        return self.label != "full_compliance"
