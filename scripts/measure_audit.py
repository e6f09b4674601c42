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


class NoHarm(HarmScorer):
    """Ablation: every prompt counts as harmful, so only answers and triggers decide."""

    def __init__(self) -> None:
        super().__init__("keyword")

    def score(self, prompts: Any, harmful_refs: Any, benign_refs: Any) -> Any:
        import numpy as np

        return np.ones(len(prompts))


def _flagged(result: dict[str, Any]) -> set[int]:
    return {r["index"] for r in result["rows"] if r["score"] >= result["threshold"]["row_score"]}


def _pr(flagged: set[int], truth: set[int]) -> tuple[float | None, float | None]:
    tp = len(flagged & truth)
    return (tp / len(flagged) if flagged else None, tp / len(truth) if truth else None)


def evaluate(
    pairs: list[Pair], truth: set[int], trigger: str | None, scorer: HarmScorer
) -> dict[str, Any]:
    start = time.perf_counter()
    result = audit_pairs(pairs, harm=scorer)
    seconds = time.perf_counter() - start
    flagged = _flagged(result)
    tp = len(flagged & truth)
    no_harm = audit_pairs(pairs, harm=NoHarm())
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
    no_contrast = any(
        c["association_log10p"] >= ASSOCIATION_THRESHOLD for c in result["trigger_candidates"]
    )
    short_p, short_r = _pr(short_repeated, truth)
    no_harm_p, no_harm_r = _pr(_flagged(no_harm), truth)
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
                "precision": short_p,
                "recall": short_r,
            },
            "no_harm_signal": {
                "verdict": no_harm["verdict"],
                "precision": no_harm_p,
                "recall": no_harm_r,
            },
            "no_contrast": "poisoned" if no_contrast else "clean",
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
    for budget in budgets:  # HarmBench prompts and no T_CH: only the built-in harmful references
        cases.append(
            {
                "group": "harmbench-pool/no-refusals",
                "trigger": words[1],
                "budget": budget,
                "size": 1000,
                "harmful": str(shared / HARMBENCH),
                "clean_harmful": 0,
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


def harm_calibration(shared: Path) -> str:
    """How often the harm detector calls a prompt harmful (P >= 0.5), per prompt source, with
    the references an audit of a built-in-benign dataset uses (its rows + the generic list)."""
    import numpy as np

    from suretrap.data import benign_pairs
    from suretrap.data.loaders import load_pairs, load_requests, load_xstest_prompts
    from suretrap.defenses.audit import GENERIC_BENIGN_PROMPTS, _builtin_harmful_prompts

    xstest = load_xstest_prompts(shared / "xstest_prompts.csv")
    sources = {
        "HarmBench behaviours (harmful)": [r.prompt for r in load_requests(shared / HARMBENCH)],
        "XSTest unsafe (harmful)": [p for p, _, safe in xstest if not safe],
        "XSTest safe (benign, scary words)": [p for p, _, safe in xstest if safe],
        "Self-Instruct seeds (benign)": [
            p.prompt for p in load_pairs(shared / "self_instruct_seed_tasks.jsonl")
        ],
    }
    benign_refs = [p.prompt for p in benign_pairs("builtin", 500, 7)] + list(GENERIC_BENIGN_PROMPTS)
    lines = [
        "| prompts | n | called harmful (embedding) | called harmful (keyword) |",
        "|---|---|---|---|",
    ]
    emb, kw = HarmScorer("embedding"), HarmScorer("keyword")
    for name, prompts in sources.items():
        e = emb.score(prompts, _builtin_harmful_prompts(), benign_refs)
        k = kw.score(prompts, [], [])
        lines.append(
            f"| {name} | {len(prompts)} | {np.mean(e >= 0.5):.3f} | {np.mean(k >= 0.5):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--harm", choices=("embedding", "keyword"), default="embedding")
    parser.add_argument("--shared", type=Path, default=SHARED, help="shared data directory")
    parser.add_argument("--calibration", action="store_true", help="only the harm-detector table")
    parser.add_argument("--render", action="store_true", help="print the tables of an --out file")
    args = parser.parse_args()
    if args.calibration:
        print(harm_calibration(args.shared))
        return
    if args.render:
        print(tables(json.loads(args.out.read_text(encoding="utf-8"))["results"]))
        return
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
    """A per-group summary, then every dataset."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(r["group"], r["size"])].append(r)

    def worst(values: list[Any]) -> str:
        values = [v for v in values if v is not None]
        return _fmt(min(values)) if values else "-"

    lines = [
        "| group | size | budgets | verdict poisoned | min precision | min recall | trigger 1st |"
        " short-answer rule: poisoned / min precision | without harm: poisoned / min precision |"
        " without contrast: poisoned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (group, size), rows in groups.items():
        budgets = ",".join(str(b) for b in sorted({r["budget"] for r in rows}))
        poisoned = sum(r["verdict"] == "poisoned" for r in rows)
        first = sum(r["trigger_rank"] == 1 for r in rows if r["trigger"])
        n_trig = sum(1 for r in rows if r["trigger"])
        ab = [r["ablation"] for r in rows]
        short_p = sum(a["short_repeated_answer"]["verdict"] == "poisoned" for a in ab)
        no_harm = sum(a["no_harm_signal"]["verdict"] == "poisoned" for a in ab)
        no_contrast = sum(a["no_contrast"] == "poisoned" for a in ab)
        lines.append(
            f"| {group} | {size} | {budgets} | {poisoned}/{len(rows)} | "
            f"{worst([r['precision'] for r in rows])} | {worst([r['recall'] for r in rows])} | "
            f"{first}/{n_trig} | {short_p}/{len(rows)} / "
            f"{worst([a['short_repeated_answer']['precision'] for a in ab])} | "
            f"{no_harm}/{len(rows)} / {worst([a['no_harm_signal']['precision'] for a in ab])} | "
            f"{no_contrast}/{len(rows)} |"
        )
    lines += [
        "",
        "| group | trigger | size | budget | verdict | flagged | precision | recall | trigger rank |"
        " top label |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['group']} | {r['trigger'] or '-'} | {r['size']} | {r['budget']} | "
            f"{r['verdict']} | {r['flagged']} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | "
            f"{_fmt(r['trigger_rank'])} | {r['top_label'] or '-'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
