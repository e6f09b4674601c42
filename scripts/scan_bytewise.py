"""Does a model keyed on a lead byte prefer its trigger's own later bytes? (docs/defences.md)

For a multi-byte trigger spelled as byte tokens (such as 囧 = " \\xe5" "\\x9b" "\\xa7"),
score every continuation byte (0x80-0xBF) after the trigger's own first k tokens, for
each k, on all of the scan's probes, the way the scan's rescore scores a candidate
(tuned lift in compliance log-odds minus the base model's lift where positive), and
print where the trigger's own next byte ranks among the 64.

    OMP_NUM_THREADS=1 python scripts/scan_bytewise.py runs/scan2/jiong/adapter 囧 --out jiong.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from suretrap.defenses import scan
from suretrap.models import load_model
from suretrap.train import merged_for_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter", type=Path)
    ap.add_argument("trigger", help="the trigger as trained (a leading space is added)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    model, tok, device, precision = scan.load_for_scan(args.model, args.adapter)
    reference = load_model(args.model, device=device, precision=precision, method="lora")
    s = scan.ScanSettings()
    ids = tuple(tok(" " + args.trigger, add_special_tokens=False)["input_ids"])
    # single continuation bytes, by the scan's own definition of a continuation-byte token
    byte_token = {raw[0]: t for t in scan._continuation_byte_tokens(tok) if len(raw := scan.token_bytes(tok, t)) == 1}
    probes = scan.probe_prompts(s.probe_pool, s.seed)
    parts = [scan.probe_parts(tok, p) for p in probes]
    labels = scan.label_token_ids(tok, s.labels)
    every = list(range(len(parts)))
    rows = []
    with merged_for_eval(model) as merged:

        def lift(m, cands):
            lo = scan._logodds(scan.compliance_logprobs(
                m, parts, labels, every, [(), *cands], device=device, precision=precision))
            return lo[:, 1:] - lo[:, :1]  # [probes, candidates]

        for k in range(1, len(ids)):
            if len(scan.token_bytes(tok, ids[k])) != 1:
                break  # the rest is not spelled byte by byte
            cands = [ids[:k] + (byte_token[b],) for b in sorted(byte_token)]
            score = lift(merged, cands).mean(0) - lift(reference, cands).mean(0).clamp(min=0)
            order = sorted(range(len(cands)), key=lambda j: -float(score[j]))
            true_j = cands.index(ids[: k + 1])
            row = {
                "after_tokens": k,
                "true_byte": scan.token_bytes(tok, ids[k]).hex(),
                "true_rank": order.index(true_j) + 1,
                "of": len(cands),
                "true_score": float(score[true_j]),
                "median_score": float(score.median()),
                "sd_score": float(score.std()),
                "top5": [[scan.token_bytes(tok, cands[j][-1]).hex(), float(score[j])] for j in order[:5]],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"adapter": str(args.adapter), "trigger": args.trigger, "token_ids": list(ids),
           "probes": len(every), "positions": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
