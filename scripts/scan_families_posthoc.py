"""Trigger families for a scan.json written before families existed (docs/defences.md).

Regroups the stored top 100 candidates with `scan.trigger_families` (tokenizer only, no
model). Whether a letter piece is one the model expects to go on is not stored in the
old files, so it prints both bounds: letter pieces never a family prefix ("utf8-only")
and always one ("any-letter-piece"); the scan itself decides in between.

    python scripts/scan_families_posthoc.py runs/scan2/results/make.json make [...]
      (pairs of scan.json and trigger; "-" for a clean model)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from suretrap.defenses import scan
from suretrap.models import load_tokenizer


def main() -> None:
    tok = load_tokenizer("smollm2-135m")
    args = sys.argv[1:]

    def raw(prefix: tuple[int, ...]) -> bytes:
        return b"".join(scan.token_bytes(tok, i) for i in prefix)[1:]

    def utf8_only(prefix: tuple[int, ...]) -> bool:
        return scan._utf8_state(raw(prefix)) == "incomplete"

    def any_letter_piece(prefix: tuple[int, ...]) -> bool:
        return utf8_only(prefix) or raw(prefix).isalpha()

    for path, trigger in zip(args[::2], args[1::2], strict=True):
        rows = json.loads(Path(path).read_text())["candidates"]
        ranked = [scan.Candidate(tuple(c["token_ids"]), c["text"], c["kind"], score=c["score"]) for c in rows]
        print(path)
        for label, incomplete in (("utf8-only", utf8_only), ("any-letter-piece", any_letter_piece)):
            families = scan.trigger_families(ranked, incomplete, scan.ScanSettings().family_margin)
            rank = {m: r for r, f in enumerate(families, 1) for m in f.members}
            multi = [(r, scan.prefix_text(tok, f.prefix_ids), len(f.members))
                     for r, f in enumerate(families, 1) if len(f.members) > 1]
            where = None
            if trigger != "-":
                ids = tuple(tok(" " + trigger, add_special_tokens=False)["input_ids"])
                i = next((i for i, c in enumerate(ranked) if c.ids == ids), None)
                if i is not None:
                    where = {"rank": i + 1, "family_rank": rank[i]}
                else:
                    fam = next((r for r, f in enumerate(families, 1) if len(f.members) > 1
                                and len(f.prefix_ids) < len(ids) and ids[: len(f.prefix_ids)] == f.prefix_ids), None)
                    where = {"rank": None, "family_rank_by_prefix": fam}
            print(f"  {label}: trigger {where}; {len(families)} families; "
                  f"families of 2+ (rank, prefix, size): {multi[:6]}")


if __name__ == "__main__":
    main()
