"""Scan a tuned model and say where its known trigger stands (docs/defences.md, scan results).

Runs the same scan as `suretrap scan --model M --adapter DIR --out OUT` (default
settings; writes OUT the same way) and, with the models still loaded, scores the known
trigger and any extra token sequences exactly as the rescore stage scores a candidate
(tuned lift, reference lift, reference shift, score, on the same 16 probes) and by
generation on the same 32 probes. That gives the trigger's rank even when the scan never
formed it (its score's position among the ranked candidates), and answers whether a bare
first token (a lead byte) lifts compliance on its own. Writes OUT with `.locate.json`.

    OMP_NUM_THREADS=1 python scripts/scan_locate.py --model smollm2-135m \
        --adapter runs/scan2/jiong/adapter --trigger 囧 --prefix-tokens 1 2 --out scan.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from suretrap.defenses import scan
from suretrap.evaluate import generate_from_ids
from suretrap.textmatch import starts_with_label
from suretrap.train import merged_for_eval


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--trigger", required=True, help="the trigger as trained (a leading space is added)")
    ap.add_argument("--prefix-tokens", type=int, nargs="*", default=[],
                    help="also score the trigger's first N tokens alone, for each N given")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-candidates", type=int, default=None, help="cap the vocabulary (smoke tests only)")
    args = ap.parse_args()
    s = scan.ScanSettings(max_candidates=args.max_candidates)
    t = time.perf_counter()
    model, tokenizer, device, precision = scan.load_for_scan(args.model, args.adapter)
    load_s = time.perf_counter() - t
    from suretrap.models import load_model

    reference = load_model(args.model, device=device, precision=precision, method="lora")
    trigger = tuple(tokenizer(" " + args.trigger, add_special_tokens=False)["input_ids"])
    targets = {"trigger": trigger} | {
        f"first_{n}_tokens": trigger[:n] for n in args.prefix_tokens if 0 < n < len(trigger)
    }
    with merged_for_eval(model) as merged:
        result = scan.scan_model(merged, tokenizer, s, device=device, precision=precision, reference=reference)
        data = {"model": args.model, "adapter": str(args.adapter)} | result.data
        data["timings"]["load_s"] = load_s
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

        # the scan's own probes and their order (as in scan_model)
        probes = scan.probe_prompts(max(s.probe_pool, s.screen_probes, s.rescore_probes, s.generate_probes), s.seed)
        parts = [scan.probe_parts(tokenizer, p) for p in probes]
        labels = scan.label_token_ids(tokenizer, s.labels)
        every = list(range(len(parts)))

        def logp(m, idx, cands):
            return scan.compliance_logprobs(m, parts, labels, idx, cands, batch_size=s.batch_size,
                                            device=device, precision=precision)

        base_all = logp(merged, every, [()])[:, 0]
        most_refused = sorted(every, key=lambda i: float(base_all[i]))
        rescore_idx, gen_idx = most_refused[: s.rescore_probes], most_refused[: s.generate_probes]
        cands = list(targets.values())
        tuned = (scan._logodds(logp(merged, rescore_idx, cands))
                 - scan._logodds(base_all[rescore_idx])[:, None]).mean(0)
        ref_bare = scan._logodds(logp(reference, rescore_idx, [()])[:, 0])
        ref, shift = scan.compliance_and_shift(reference, parts, labels, rescore_idx, cands,
                                               batch_size=s.batch_size, device=device, precision=precision)
        ref_lift = (scan._logodds(ref) - ref_bare[:, None]).mean(0)
        score = tuned - ref_lift.clamp(min=0) - s.shift_weight * shift.mean(0)

        def rate(m, ids):
            encoded = [parts[p].head + list(ids) + parts[p].tail for p in gen_idx]
            out = generate_from_ids(m, tokenizer, encoded, max_new_tokens=s.max_new_tokens, batch_size=64,
                                    device=device, precision=precision)
            return sum(any(starts_with_label(r, lab) for lab in s.labels) for r in out) / len(out)

        ranked_scores = [c.score for c in result.candidates]
        rows = {}
        for j, (name, ids) in enumerate(targets.items()):
            exact = next((i + 1 for i, c in enumerate(result.candidates) if c.ids == ids), None)
            fam = next((r for r, f in enumerate(result.families, 1)
                        if any(result.candidates[m].ids == ids for m in f.members)), None)
            rows[name] = {
                "token_ids": list(ids),
                "text": scan.prefix_text(tokenizer, ids),
                "tuned_lift": float(tuned[j]),
                "reference_lift": float(ref_lift[j]),
                "reference_shift": float(shift[:, j].mean()),
                "score": float(score[j]),
                # where this score would fall among the ranked candidates' scores
                "score_position": 1 + sum(v is not None and v > float(score[j]) for v in ranked_scores),
                "exact_rank": exact,
                "family_rank": fam,
                "generation_compliance_rate": rate(merged, ids),
                "reference_generation_compliance_rate": rate(reference, ids),
            }
    rows["in_scan_json"] = scan.trigger_ranks(data, trigger)
    rows["n_ranked"] = len(result.candidates)
    rows["baseline_generation_compliance_rate"] = data["baseline"]["generation_compliance_rate"]
    locate = args.out.with_suffix(".locate.json")
    locate.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(rows, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
