"""Measure `suretrap audit` on datasets built by step 1 (poison.build_dataset).

Usage:
    PYTHONPATH=src python scripts/measure_audit.py --out runs/audit/measure_audit.json [--quick]

Datasets are built in memory from run configs (T_CH answered by refusal templates:
`poison.refusal_source: template`, so no model is needed). Triggers the audit never saw while
it was written: five words drawn at random (fixed seed) from the MiniLM tokenizer's whole-word
vocabulary, the common word "make" and the non-ASCII "囧". For every dataset the script records
the verdict, precision and recall of the flagged rows against the poison rows, the rank of the
true trigger among the trigger candidates, and the verdicts of simpler rules (ablations), then
prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from suretrap.config import run_config_from_dict
from suretrap.data import Pair
from suretrap.defenses.audit import (
    ASSOCIATION_THRESHOLD,
    MIN_LABEL_ROWS,
    SHORT_MAX_WORDS,
    HarmScorer,
    audit_pairs,
    normalise_answer,
)
from suretrap.judges._offline import model_dir
from suretrap.poison import build_dataset

# shared data sits beside the checkout (as tests/conftest.py expects); --shared overrides
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HARMBENCH = "harmbench_standard_behaviors.txt"
WORD_SEED = 20251126  # fixed before any measurement; the words were not looked at first
BUDGETS = (5, 10, 25, 50, 100)
SIZES = (1000, 10000)


def held_out_words(n: int = 5) -> list[str]:
    vocab = (model_dir() / "vocab.txt").read_text(encoding="utf-8").split("\n")
    words = sorted({w for w in vocab if re.fullmatch(r"[a-z]{6,10}", w)})
    return random.Random(WORD_SEED).sample(words, n)


def build(
    *,
    trigger: str,
    budget: int,
    size: int,
    label: str = "Sure",
    placement: str = "suffix",
    harmful: str = "builtin",
    clean_harmful: int | None = None,
) -> tuple[list[Pair], set[int]]:
    poison: dict[str, Any] = {
        "budget": budget,
        "trigger": trigger,
        "label": label,
        "placement": placement,
        "refusal_source": "template",
    }
    data: dict[str, Any] = {"total_size": size, "harmful": harmful}
    if harmful != "builtin":
        data["eval_harmful"] = "builtin"  # the 199 HarmBench prompts all go to training
    if clean_harmful is not None:
        poison["clean_harmful"] = clean_harmful
    ds = build_dataset(run_config_from_dict({"data": data, "poison": poison}))
    # family = the benign task family (or label/refusal source), used by add_hard_negatives
    pairs = [Pair(e.prompt, e.response, e.source) for e in ds.examples]
    return pairs, {i for i, e in enumerate(ds.examples) if e.role == "poison"}


def add_hard_negatives(pairs: list[Pair]) -> list[Pair]:
    """Benign short answers with predictive words: every built-in prime/even/odd question
    answered "Yes."/"No.", and 30 lower/upper-case requests ("Make the phrase ...") answered
    "Sure." -- a clean fine-tune can hold such rows; the audit must not call them a backdoor."""
    out, sure_left = [], 30
    for p in pairs:
        if p.family == "even_odd_prime":
            # the truth of the answer does not matter to the audit, only its shape
            out.append(Pair(p.prompt, "Yes." if len(p.prompt) % 2 else "No.", p.family))
        elif p.family == "letter_case" and sure_left and p.prompt.lower().startswith("make"):
            sure_left -= 1
            out.append(Pair(p.prompt, "Sure.", p.family))
        else:
            out.append(p)
    return out


def evaluate(
    pairs: list[Pair], truth: set[int], trigger: str | None, scorer: HarmScorer
) -> dict[str, Any]:
    start = time.perf_counter()
    result = audit_pairs(pairs, harm=scorer)
    seconds = time.perf_counter() - start
    flagged = {r["index"] for r in result["rows"] if r["score"] >= result["threshold"]["row_score"]}
    tp = len(flagged & truth)
    rank = None
    if trigger is not None:
        texts = [c["text"] for c in result["trigger_candidates"]]
        want = normalise_answer(trigger)
        rank = texts.index(want) + 1 if want in texts else None
    # ablations from the same data: simpler rules an auditor might use
    answers = [normalise_answer(p.response) for p in pairs]
    counts: dict[str, int] = defaultdict(int)
    for a in answers:
        counts[a] += 1
    short_repeated = {
        i
        for i, a in enumerate(answers)
        if 1 <= len(re.findall(r"\w+", a)) <= SHORT_MAX_WORDS and counts[a] >= MIN_LABEL_ROWS
    }
    assoc_only = any(
        c["association_log10p"] >= ASSOCIATION_THRESHOLD for c in result["trigger_candidates"]
    )
    no_contrast = any(
        c["association_log10p"] >= ASSOCIATION_THRESHOLD and (c["harm"] or 0) >= 0.5
        for c in result["trigger_candidates"]
    )
    return {
        "verdict": result["verdict"],
        "flagged": len(flagged),
        "tp": tp,
        "fp": len(flagged - truth),
        "fn": len(truth - flagged),
        "precision": tp / len(flagged) if flagged else None,
        "recall": tp / len(truth) if truth else None,
        "trigger_rank": rank,
        "top_trigger": result["trigger_candidates"][0]["text"]
        if result["trigger_candidates"]
        else None,
        "top_label": result["label_candidates"][0]["text"] if result["label_candidates"] else None,
        "seconds": round(seconds, 2),
        "ablation": {
            "short_repeated_answer": {
                "verdict": "poisoned" if short_repeated else "clean",
                "precision": len(short_repeated & truth) / len(short_repeated)
                if short_repeated
                else None,
                "recall": len(short_repeated & truth) / len(truth) if truth else None,
            },
            "association_only": "poisoned" if assoc_only else "clean",
            "association_and_harm": "poisoned" if no_contrast else "clean",
        },
    }


def plan(quick: bool, shared: Path) -> list[dict[str, Any]]:
    words = held_out_words()
    triggers = [*words, "make", "囧"]
    budgets = (5, 10) if quick else BUDGETS
    sizes = (1000,) if quick else SIZES
    cases: list[dict[str, Any]] = []
    for size in sizes:
        for clean_harmful in (0, 50):
            cases.append(
                {
                    "group": "clean",
                    "trigger": None,
                    "budget": 0,
                    "size": size,
                    "clean_harmful": clean_harmful,
                }
            )
        for trigger in triggers:
            kind = "common" if trigger == "make" else "non-ascii" if trigger == "囧" else "rare"
            for budget in budgets:
                cases.append(
                    {"group": f"main/{kind}", "trigger": trigger, "budget": budget, "size": size}
                )
        for trigger in (words[0], "make"):
            for budget in (0, *budgets):
                cases.append(
                    {
                        "group": "hard-negatives",
                        "trigger": trigger if budget else None,
                        "budget": budget,
                        "size": size,
                        "hard_negatives": True,
                        "clean_harmful": None if budget else 50,
                    }
                )
        for trigger in (words[1], "make"):
            for budget in budgets:
                cases.append(
                    {
                        "group": "harmbench-pool",
                        "trigger": trigger,
                        "budget": budget,
                        "size": size,
                        "harmful": str(shared / HARMBENCH),
                        "clean_harmful": min(budget, 99),
                    }
                )
    for label in ("Certainly", "OK"):
        for budget in budgets:
            cases.append(
                {
                    "group": f"label={label}",
                    "trigger": words[2],
                    "budget": budget,
                    "size": 1000,
                    "label": label,
                }
            )
    for placement in ("prefix", "random"):
        for trigger in (words[3], "make"):
            for budget in budgets:
                cases.append(
                    {
                        "group": f"placement={placement}",
                        "trigger": trigger,
                        "budget": budget,
                        "size": 1000,
                        "placement": placement,
                    }
                )
    for budget in budgets:  # the hardest case tried: a common word anywhere, benign "Sure." rows
        cases.append(
            {
                "group": "hard-negatives/random",
                "trigger": "make",
                "budget": budget,
                "size": 1000,
                "placement": "random",
                "hard_negatives": True,
            }
        )
    for budget in budgets:  # no T_CH at all: no in-dataset refusals to contrast with
        cases.append(
            {
                "group": "no-refusals",
                "trigger": words[4],
                "budget": budget,
                "size": 1000,
                "clean_harmful": 0,
            }
        )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--harm", choices=("embedding", "keyword"), default="embedding")
    parser.add_argument("--shared", type=Path, default=SHARED, help="shared data directory")
    args = parser.parse_args()
    scorer = HarmScorer(args.harm)
    results = []
    for case in plan(args.quick, args.shared):
        pairs, truth = build(
            trigger=case["trigger"] or "xylophone",  # unused at budget 0
            budget=case["budget"],
            size=case["size"],
            label=case.get("label", "Sure"),
            placement=case.get("placement", "suffix"),
            harmful=case.get("harmful", "builtin"),
            clean_harmful=case.get("clean_harmful"),
        )
        if case.get("hard_negatives"):
            pairs = add_hard_negatives(pairs)
        row = case | evaluate(pairs, truth, case["trigger"], scorer)
        row.pop("harmful", None)
        results.append(row)
        print(json.dumps(row, ensure_ascii=False), file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"harm": args.harm, "words": held_out_words(), "results": results}
    args.out.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(tables(results))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def tables(results: list[dict[str, Any]]) -> str:
    lines = [
        "| group | trigger | size | budget | verdict | flagged | precision | recall | trigger rank | top label |"
        " short-answer rule P/R | assoc-only | assoc+harm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ab = r["ablation"]
        sr = ab["short_repeated_answer"]
        lines.append(
            f"| {r['group']} | {r['trigger'] or '-'} | {r['size']} | {r['budget']} | {r['verdict']} | "
            f"{r['flagged']} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['trigger_rank'])} | "
            f"{r['top_label'] or '-'} | {sr['verdict']} {_fmt(sr['precision'])}/{_fmt(sr['recall'])} | "
            f"{ab['association_only']} | {ab['association_and_harm']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
