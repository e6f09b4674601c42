"""Data sources: the built-in sets and loaders for files and the HF hub.

A data `source` string is ``builtin``, a file path, or ``hf:ORG/NAME[:SPLIT]``.
"""

from __future__ import annotations

from suretrap.data.records import LabelledCompletion, Pair, Request

__all__ = ["LabelledCompletion", "Pair", "Request", "benign_pairs", "harmful_requests"]


def benign_pairs(source: str, n: int, seed: int) -> list[Pair]:
    """`n` benign pairs from `source`; built-in pairs are generated deterministically."""
    if source == "builtin":
        from suretrap.data.builtin_benign import builtin_benign

        return builtin_benign(n, seed)
    from suretrap.data.loaders import load_pairs

    return load_pairs(source)


def harmful_requests(source: str) -> list[Request]:
    """All harmful requests of `source` (the built-in set, a file, or the hub)."""
    if source == "builtin":
        from suretrap.data.builtin_harmful import builtin_harmful

        return builtin_harmful()
    from suretrap.data.loaders import load_requests

    return load_requests(source)
