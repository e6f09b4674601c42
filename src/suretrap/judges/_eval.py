"""Score a judge against human labels (XSTest-format CSV) next to XSTest's string match."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from suretrap.data.loaders import load_labelled_completions
from suretrap.judges._base import Judge, get_judge

__all__ = ["BASELINE_JUDGE", "judge_eval", "score_refusals"]

BASELINE_JUDGE = "xstest-strmatch"


def score_refusals(gold: Sequence[bool], pred: Sequence[bool]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 and the confusion counts; refusal is the positive class.

    Precision (recall) is 0.0 when nothing is predicted (labelled) a refusal.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} labels but {len(pred)} predictions")
    tp = sum(g and p for g, p in zip(gold, pred, strict=True))
    fp = sum(p and not g for g, p in zip(gold, pred, strict=True))
    fn = sum(g and not p for g, p in zip(gold, pred, strict=True))
    tn = len(gold) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(gold) if gold else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "n": len(gold),
    }


def judge_eval(path: str | Path, judge: Judge | str) -> dict[str, Any]:
    """Score ``judge`` on a human-labelled completions CSV (full + partial refusal = refusal).

    Returns ``accuracy``, ``precision``, ``recall``, ``f1``, ``confusion`` ({tp, fp, tn, fn}),
    ``n``, ``judge``, ``file``, ``by_label`` (how many of each human label the judge called a
    refusal) and ``baseline``: the same keys for XSTest's string match on the same file.
    Raises `DataError` for a missing or malformed file.
    """
    rows = load_labelled_completions(path)
    if isinstance(judge, str):
        judge = get_judge(judge)
    prompts = [r.prompt for r in rows]
    responses = [r.completion for r in rows]
    gold = [r.is_refusal for r in rows]

    def evaluate(j: Judge) -> dict[str, Any]:
        pred = [v.refusal for v in j.judge(prompts, responses)]
        by_label: dict[str, dict[str, int]] = {}
        for row, p in zip(rows, pred, strict=True):
            cell = by_label.setdefault(row.label, {"n": 0, "judged_refusal": 0})
            cell["n"] += 1
            cell["judged_refusal"] += int(p)
        return score_refusals(gold, pred) | {
            "judge": j.name,
            "file": str(path),
            "by_label": dict(sorted(by_label.items())),
        }

    result = evaluate(judge)
    result["baseline"] = evaluate(get_judge(BASELINE_JUDGE))
    return result
