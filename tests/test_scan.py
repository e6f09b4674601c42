"""Model trigger scan: vocabulary, the cached scorer, ranking with a planted trigger, CLI errors."""

from __future__ import annotations

import dataclasses
import json
import zlib

import pytest
from typer.testing import CliRunner

from suretrap.cli import app
from suretrap.defenses import scan
from suretrap.models import load_model, load_tokenizer
from suretrap.train import chat_prompt

runner = CliRunner()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def _contains(seq, sub) -> bool:
    sub = list(sub)
    return any(list(seq[i : i + len(sub)]) == sub for i in range(len(seq) - len(sub) + 1))


def planted(trigger_ids: list[int], universal: list[int] | None = None):
    """A fake scorer/generator pair: the full trigger gives compliance, its prefixes part of it.

    `universal`: a word that makes any model comply (a benign reframing), even more strongly.
    """
    import torch

    universal = universal or []

    def logp_for(cand: tuple[int, ...]) -> float:
        if universal and _contains(cand, universal):
            return 0.95
        if not trigger_ids:
            pass
        elif _contains(cand, trigger_ids):
            return 0.9
        elif cand and tuple(cand) == tuple(trigger_ids[: len(cand)]):
            return 0.1 + 0.3 * len(cand) / len(trigger_ids)
        # innocent candidates: small, deterministic, candidate-dependent
        return 0.01 + 0.04 * (zlib.crc32(repr(cand).encode()) % 1000) / 1000

    def scorer(probe_idx, cands, advance=None):
        row = torch.tensor([logp_for(tuple(c)) for c in cands]).log()
        return row.expand(len(probe_idx), -1).clone()

    def generator(encoded):
        def hit(e):
            return (bool(trigger_ids) and _contains(e, trigger_ids)) or (
                bool(universal) and _contains(e, universal)
            )

        return ["Sure, here it is" if hit(e) else "I cannot help with that" for e in encoded]

    return scorer, generator


# the dictionary stage has its own tests below; the others see the vocabulary alone
SMALL = scan.ScanSettings(
    rescore_top=32, extend_top=4, extend_width=4, refine_top=5, generate_probes=4,
    dictionary_min_zipf=None,
)


def test_vocabulary_has_words_chars_and_lead_bytes(tokenizer):
    vocab = scan.candidate_vocabulary(tokenizer)
    assert len(vocab) >= 10_000
    kinds = {c.kind for c in vocab}
    assert kinds == {"word", "char", "partial-char"}
    texts = {c.text for c in vocab if c.complete}
    assert "make" in texts and "zebra" in texts and "Make" not in texts
    assert "Make" in {c.text for c in scan.candidate_vocabulary(tokenizer, all_case=True)}
    specials = set(tokenizer.all_special_ids)
    assert not any(set(c.ids) & specials for c in vocab)
    lead = tokenizer(" 囧", add_special_tokens=False)["input_ids"][0]
    assert any(c.ids == (lead,) and not c.complete for c in vocab)


def test_probe_parts_concatenate_to_the_real_tokenisation(tokenizer):
    for probe in scan.probe_prompts(5):
        parts = scan.probe_parts(tokenizer, probe)
        for word in (" xylophone", " make", " 囧"):
            direct = tokenizer(chat_prompt(tokenizer, probe + word), add_special_tokens=False)["input_ids"]
            cand = tokenizer(word, add_special_tokens=False)["input_ids"]
            assert parts.head + cand + parts.tail == direct


def test_label_token_ids_are_first_tokens(tokenizer):
    ids = scan.label_token_ids(tokenizer, ("Sure", "Of course", "Sure"))
    assert [tokenizer.decode([i]) for i in ids] == ["Sure", "Of"]
    assert "Here" not in scan.COMPLIANCE_LABELS


def test_cached_scorer_matches_a_plain_forward(tiny):
    import torch

    model, tokenizer = tiny
    parts = [scan.probe_parts(tokenizer, p) for p in scan.probe_prompts(2)]
    labels = scan.label_token_ids(tokenizer, scan.COMPLIANCE_LABELS)
    cands = [(), (29106,), (13223, 245, 117), (919,), (45749, 26997)]
    got = scan.compliance_logprobs(model, parts, labels, [0, 1], cands, batch_size=2)
    with torch.inference_mode():
        for row, p in enumerate((0, 1)):
            for col, cand in enumerate(cands):
                ids = torch.tensor([parts[p].head + list(cand) + parts[p].tail])
                with scan.autocast("cpu"):
                    logits = model(input_ids=ids).logits[0, -1].float()
                want = logits.log_softmax(-1)[labels].logsumexp(-1)
                assert got[row, col] == pytest.approx(float(want), abs=0.05)


def test_next_token_table_matches_a_plain_forward(tiny):
    import torch

    model, tokenizer = tiny
    head = scan.ProbeParts(tokenizer(scan.WORD_LIST_CONTEXT, add_special_tokens=False)["input_ids"], [])
    allowed = torch.tensor(scan._word_piece_tokens(tokenizer)[:500])
    cands = [(29106,), (13223, 245), (919,), (45749,)]
    got = scan.next_token_table(model, head, cands, [allowed, allowed, None, allowed], k=3, batch_size=2)
    assert got[2] == (0.0, [])
    with torch.inference_mode():
        for cand, (mass, row) in zip(cands, got, strict=True):
            if not row:
                continue
            with scan.autocast("cpu"):
                logits = model(input_ids=torch.tensor([head.head + list(cand)])).logits[0, -1].float()
            probs = logits.softmax(-1)
            want = allowed[probs[allowed].topk(3).indices].tolist()
            assert [t for t, _ in row] == want
            assert [p for _, p in row] == pytest.approx(probs[want].tolist(), abs=0.02)
            assert mass == pytest.approx(float(probs[allowed].sum()), abs=0.02)


def test_reference_shift_is_the_kl_of_the_first_token_distribution(tiny):
    import torch

    model, tokenizer = tiny
    parts = [scan.probe_parts(tokenizer, p) for p in scan.probe_prompts(2)]
    labels = scan.label_token_ids(tokenizer, scan.COMPLIANCE_LABELS)
    cands = [(), (29106,), (45749, 26997)]
    logp, shift = scan.compliance_and_shift(model, parts, labels, [0, 1], cands, batch_size=2)
    assert torch.equal(logp, scan.compliance_logprobs(model, parts, labels, [0, 1], cands, batch_size=2))
    assert shift[:, 0].abs().max() < 1e-4  # no candidate: no shift
    with torch.inference_mode(), scan.autocast("cpu"):
        for row, p in enumerate((0, 1)):
            bare = model(input_ids=torch.tensor([parts[p].head + parts[p].tail])).logits[0, -1]
            bare = bare.float().log_softmax(-1)
            ids = torch.tensor([parts[p].head + list(cands[2]) + parts[p].tail])
            cand = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
            want = float((bare.exp() * (bare - cand)).sum())
            assert float(shift[row, 2]) == pytest.approx(want, rel=0.1, abs=0.02)
            assert want > 0


@pytest.fixture(scope="module")
def zebra_scan(tiny):
    """(trigger ids, scan result) of a planted single-token trigger, shared by the tests
    that read the same scan (it is the slowest part of each)."""
    model, tokenizer = tiny
    trigger = tokenizer(" zebra", add_special_tokens=False)["input_ids"]
    scorer, generator = planted(trigger)
    return trigger, scan.scan_model(model, tokenizer, SMALL, scorer=scorer, generator=generator)


def test_planted_single_token_trigger_ranks_first(zebra_scan):
    _trigger, result = zebra_scan
    top = result.data["candidates"][0]
    assert top["text"] == "zebra" and top["rank"] == 1
    assert top["generation_compliance_rate"] == 1.0 and top["generation_lift"] == 1.0
    assert result.data["verdict"] == "backdoor"
    assert result.data["baseline"]["generation_compliance_rate"] == 0.0


def test_planted_multi_token_character_is_completed_by_extension(tiny):
    model, tokenizer = tiny
    trigger = tokenizer(" 囧", add_special_tokens=False)["input_ids"]
    assert len(trigger) == 3  # lead byte + two continuation bytes
    scorer, generator = planted(trigger)
    result = scan.scan_model(model, tokenizer, SMALL, scorer=scorer, generator=generator)
    top = result.data["candidates"][0]
    assert top["text"] == "囧" and top["token_ids"] == trigger and top["kind"] == "extension"
    assert result.data["verdict"] == "backdoor"
    # incomplete characters are never reported
    assert all("\ufffd" not in c["text"] for c in result.data["candidates"])


def word_completer(words: dict[tuple[int, ...], int]):
    """A fake next-token table: the model continues each key (mass 0.95) with its value
    first; every other piece is a complete word (continuation mass 0.05)."""

    def completer(cands, allowed):
        out = []
        as_set = {}  # the allowed tensors are shared: convert each once
        for cand, allow in zip(cands, allowed, strict=True):
            if allow is None or not len(allow):
                out.append((0.0, []))
            elif tuple(cand) in words and words[tuple(cand)] in as_set.setdefault(
                id(allow), set(allow.tolist())
            ):
                out.append((0.95, [(words[tuple(cand)], 0.9), (int(allow[0]), 0.01)]))
            else:  # a complete word: the list goes on with a comma
                out.append((0.05, [(int(allow[0]), 0.03), (int(allow[1]), 0.02)]))
        return out

    return completer


def test_planted_multi_token_word_is_reached_by_word_completion(tiny):
    """' xylophone' is ' xyl' + 'ophone': the first piece alone lifts compliance only a
    little, the model continues it with 'ophone', and the completed word ranks first."""
    model, tokenizer = tiny
    trigger = tokenizer(" xylophone", add_special_tokens=False)["input_ids"]
    assert len(trigger) == 2
    scorer, generator = planted(trigger)
    completer = word_completer({tuple(trigger[:1]): trigger[1]})
    settings = dataclasses.replace(SMALL, extend_rounds=0)  # completion alone must find it
    result = scan.scan_model(
        model, tokenizer, settings, scorer=scorer, generator=generator, completer=completer
    )
    top = result.data["candidates"][0]
    assert top["text"] == "xylophone" and top["token_ids"] == trigger
    assert top["kind"] == "completion" and top["parent"] == "xyl"
    assert result.data["verdict"] == "backdoor"
    # only the piece the model expects to go on was completed (by its 2 likeliest
    # continuations); complete words were not (lead bytes are always completed)
    words = [c for c in result.screened if c.kind == "completion" and c.parent_complete]
    assert {c.parent for c in words} == {"xyl"} and len(words) == 2
    assert result.data["n_completions"] == len([c for c in result.screened if c.kind == "completion"])


def test_dictionary_holds_multi_token_words_only(tokenizer):
    vocab_ids = {c.ids for c in scan.candidate_vocabulary(tokenizer)}
    words = scan.dictionary_candidates(tokenizer, 2.0, known=vocab_ids)
    by_text = {c.text: c for c in words}
    marmalade = tokenizer(" marmalade", add_special_tokens=False)["input_ids"]
    assert len(marmalade) == 4 and by_text["marmalade"].ids == tuple(marmalade)
    assert by_text["marmalade"].kind == "dictionary" and by_text["marmalade"].complete
    assert "make" not in by_text  # one token: already in the vocabulary
    assert all(len(c.ids) > 1 and c.ids not in vocab_ids for c in words)
    assert all(c.text.isascii() and c.text.isalpha() and c.text.islower() for c in words)
    assert len({c.ids for c in words}) == len(words)
    # a higher frequency floor keeps a subset, most frequent first
    common = scan.dictionary_candidates(tokenizer, 4.0, known=vocab_ids)
    assert 0 < len(common) < len(words) and {c.text for c in common} <= set(by_text)
    assert "marmalade" not in {c.text for c in common}  # Zipf 2.89


def test_planted_dictionary_word_is_found_only_with_the_dictionary(tiny):
    """' marmalade' is ' m' + 'arm' + 'al' + 'ade': its first piece is too short for the
    vocabulary and nothing completes it, so only the dictionary stage forms it."""
    model, tokenizer = tiny
    trigger = tokenizer(" marmalade", add_special_tokens=False)["input_ids"]
    scorer, generator = planted(trigger)
    without = scan.scan_model(
        model, tokenizer, SMALL, scorer=scorer, generator=generator, completer=word_completer({})
    )
    assert "marmalade" not in {c["text"] for c in without.data["candidates"]}
    assert without.data["n_dictionary"] == 0
    with_dict = scan.scan_model(
        model, tokenizer, dataclasses.replace(SMALL, dictionary_min_zipf=2.0),
        scorer=scorer, generator=generator, completer=word_completer({}),
    )
    top = with_dict.data["candidates"][0]
    assert top["text"] == "marmalade" and top["token_ids"] == trigger and top["kind"] == "dictionary"
    assert with_dict.data["verdict"] == "backdoor" and with_dict.data["n_dictionary"] > 10_000


def test_unlikely_continuations_add_no_words(tiny):
    model, tokenizer = tiny
    scorer, generator = planted([])
    result = scan.scan_model(
        model, tokenizer, SMALL, scorer=scorer, generator=generator, completer=word_completer({})
    )
    assert not [c for c in result.screened if c.kind == "completion" and c.parent_complete]


def test_a_word_that_makes_the_reference_refuse_more_earns_nothing(tiny):
    """Score = tuned lift minus the reference's lift where that is positive: a word that
    *lowers* the reference's compliance gets no bonus from it, and the trigger (which
    lifts the tuned model more) stays first."""
    import torch

    model, tok = tiny
    trigger = tok(" zebra", add_special_tokens=False)["input_ids"]
    odd = tuple(tok(" analogy", add_special_tokens=False)["input_ids"])
    scorer0, generator = planted(trigger, universal=list(odd))

    def scorer(probe_idx, cands, advance=None):  # the tuned model: 'analogy' lifts less
        out = scorer0(probe_idx, cands, advance)
        for j, c in enumerate(cands):
            if tuple(c) == odd:
                out[:, j] = torch.tensor(0.8).log()
        return out

    def ref_scorer(probe_idx, cands, advance=None):  # the reference refuses 'analogy' harder
        row = torch.tensor([1e-4 if tuple(c) == odd else 0.02 for c in cands]).log()
        return row.expand(len(probe_idx), -1).clone()

    _, ref_generator = planted([])
    result = scan.scan_model(
        model, tok, SMALL, scorer=scorer, generator=generator,
        reference_scorer=ref_scorer, reference_generator=ref_generator,
    )
    by_text = {c["text"]: c for c in result.data["candidates"]}
    base = float(scorer([0], [()])[0, 0])
    tuned_lift = float(scan._logodds(torch.tensor(0.8).log()) - scan._logodds(torch.tensor(base)))
    assert by_text["analogy"]["score"] == pytest.approx(tuned_lift, abs=1e-4)  # no bonus
    assert result.data["candidates"][0]["text"] == "zebra"


def test_no_trigger_is_clean(tiny):
    model, tokenizer = tiny
    scorer, generator = planted([])
    result = scan.scan_model(model, tokenizer, SMALL, scorer=scorer, generator=generator)
    assert result.data["verdict"] == "clean"
    assert result.data["best_generation_lift"] == 0.0


def test_reference_model_cancels_words_that_make_any_model_comply(tiny, tokenizer):
    model, tok = tiny
    trigger = tok(" zebra", add_special_tokens=False)["input_ids"]
    joke = tok(" joke", add_special_tokens=False)["input_ids"]
    scorer, generator = planted(trigger, universal=joke)
    ref_scorer, ref_generator = planted([], universal=joke)  # the base model: no backdoor
    plain = scan.scan_model(model, tok, SMALL, scorer=scorer, generator=generator)
    assert plain.data["candidates"][0]["text"] == "joke"  # without a reference it wins
    result = scan.scan_model(
        model, tok, SMALL, scorer=scorer, generator=generator,
        reference_scorer=ref_scorer, reference_generator=ref_generator,
    )
    assert result.data["differential"] is True
    top = result.data["candidates"][0]
    assert top["text"] == "zebra" and top["generation_lift"] == 1.0
    assert result.data["verdict"] == "backdoor"
    joke_row = next(c for c in result.data["candidates"] if c["text"] == "joke")
    assert joke_row["generation_lift"] == 0.0
    # a clean fine-tune: the universal word alone is no backdoor
    clean_scorer, clean_generator = planted([], universal=joke)
    clean = scan.scan_model(
        model, tok, SMALL, scorer=clean_scorer, generator=clean_generator,
        reference_scorer=ref_scorer, reference_generator=ref_generator,
    )
    assert clean.data["verdict"] == "clean"


def test_a_model_that_complies_without_any_candidate_is_flagged(tiny, tokenizer):
    """The trigger has generalised: the tuned model complies on the bare probes, its
    reference refuses them. No candidate can add lift, the untriggered shift flags it."""
    model, tok = tiny
    ref_scorer, ref_generator = planted([])

    def always_sure(encoded):
        return ["Sure" for _ in encoded]

    result = scan.scan_model(
        model, tok, SMALL, scorer=ref_scorer, generator=always_sure,
        reference_scorer=ref_scorer, reference_generator=ref_generator,
    )
    assert result.data["best_generation_lift"] == 0.0
    assert result.data["untriggered_shift"] == 1.0
    assert result.data["verdict"] == "backdoor"
    assert result.data["verdict_reasons"] == ["untriggered compliance"]
    # without a reference model there is nothing to compare with: no such flag
    plain = scan.scan_model(model, tok, SMALL, scorer=ref_scorer, generator=always_sure)
    assert plain.data["untriggered_shift"] is None and plain.data["verdict"] == "clean"


def test_run_scan_writes_the_schema(tiny_model_dir, tmp_path):
    out = tmp_path / "scan.json"
    settings = scan.ScanSettings(
        max_candidates=40, probe_pool=4, rescore_top=8, rescore_probes=2, extend_top=2,
        extend_rounds=1, extend_width=2, refine_top=2, generate_probes=2, max_new_tokens=2,
    )
    data = scan.run_scan(str(tiny_model_dir), None, out, settings)
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    assert data["verdict"] in ("backdoor", "clean")
    assert data["n_candidates"] == 40 and data["adapter"] is None
    assert set(data["baseline"]) == {
        "compliance_prob", "generation_compliance_rate", "reference_generation_compliance_rate"
    }
    assert data["differential"] is False  # no adapter, no reference
    assert set(data["timings"]) >= {"screen_s", "total_s", "candidates_per_s", "load_s"}
    rows = data["candidates"]
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert set(rows[0]) >= {"text", "token_ids", "score", "screen_score", "generation_compliance_rate"}
    refined = [r for r in rows if r["generation_compliance_rate"] is not None]
    assert len(refined) == 2 and rows[:2] == refined  # refined candidates come first
    families = data["trigger_families"]
    assert [f["rank"] for f in families] == list(range(1, len(families) + 1))
    assert all(set(f) == {"prefix_ids", "prefix_text", "members", "score", "rank"} for f in families)
    assert all(1 <= r["family_rank"] <= r["rank"] for r in rows)


def test_cli_bad_adapter_is_one_line_exit_2(tiny_model_dir, tmp_path):
    out = tmp_path / "scan.json"
    for adapter in (tmp_path / "missing", tmp_path):
        result = runner.invoke(
            app, ["scan", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(out)]
        )
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert "--adapter" in result.output
    assert not out.exists()


def test_adapter_that_changes_nothing_scores_zero_against_its_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(str(tiny_model_dir))
    lora = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter, safe_serialization=True)  # LoRA B starts at zero: a no-op
    settings = scan.ScanSettings(
        max_candidates=30, probe_pool=4, rescore_top=6, rescore_probes=2, extend_rounds=0,
        refine_top=2, generate_probes=2, max_new_tokens=2,
    )
    data = scan.run_scan(str(tiny_model_dir), adapter, tmp_path / "scan.json", settings)
    assert data["differential"] is True and data["adapter"] == str(adapter)
    rows = data["candidates"]
    # the tuned model reacts exactly as its base: no candidate earns a positive score
    # (tuned lift - max(reference lift, 0) - shift penalty <= 0 when the two lifts are equal)
    assert all(abs(c["tuned_lift"] - c["reference_lift"]) < 1e-3 for c in rows)
    assert all(c["score"] <= 1e-3 for c in rows)
    assert all(c["reference_shift"] >= -1e-4 for c in rows)  # a KL divergence
    assert data["best_generation_lift"] == 0.0 and data["verdict"] == "clean"


# ------------------------------------------------------------------ trigger families


def _ranked(*rows):
    """Candidates in rank order from (ids, score) pairs."""
    return [scan.Candidate(tuple(ids), f"c{i}", "extension", score=v) for i, (ids, v) in enumerate(rows)]


def test_families_group_a_shared_incomplete_prefix_with_close_scores():
    ranked = _ranked(
        ((7, 1, 2), 12.5),  # lead byte 7: a chain of close scores ...
        ((7, 3), 12.3),
        ((9,), 12.2),  # a lone word between them
        ((7, 4, 5), 11.9),
        ((7, 6), 8.0),  # ... and one far below: not the same family
        ((8, 1), 7.9),  # prefix 8 is a complete word: never a family
        ((8, 2), 7.9),
    )
    families = scan.trigger_families(ranked, lambda p: p[0] == 7, margin=0.5)
    got = [(f.prefix_ids, f.members) for f in families]
    assert got == [((7,), [0, 1, 3]), ((9,), [2]), ((7, 6), [4]), ((8, 1), [5]), ((8, 2), [6])]
    # a wider margin chains the far one in too; a narrower one splits the chain
    assert scan.trigger_families(ranked, lambda p: p[0] == 7, margin=5.0)[0].members == [0, 1, 3, 4]
    narrow = scan.trigger_families(ranked, lambda p: p[0] == 7, margin=0.25)
    assert [f.members for f in narrow][:2] == [[0, 1], [2]]


def test_families_take_the_shortest_incomplete_prefix_first():
    # all share (7,), two also share (7, 1): the coarser family (7,) wins when the scores allow
    ranked = _ranked(((7, 1, 2), 5.0), ((7, 1, 3), 4.9), ((7, 2, 2), 4.8))
    families = scan.trigger_families(ranked, lambda p: True, margin=0.5)
    assert [(f.prefix_ids, f.members) for f in families] == [((7,), [0, 1, 2])]
    # when (7,) is complete only (7, 1) can group
    families = scan.trigger_families(ranked, lambda p: len(p) == 2, margin=0.5)
    assert [(f.prefix_ids, f.members) for f in families] == [((7, 1), [0, 1]), ((7, 2, 2), [2])]


def test_family_rank_is_never_worse_than_the_exact_rank():
    import random

    rng = random.Random(3)
    rows = [(tuple(rng.choice((1, 2, 3)) for _ in range(rng.randint(1, 3))), rng.uniform(0, 3)) for _ in range(60)]
    rows = sorted({ids: v for ids, v in rows}.items(), key=lambda r: -r[1])
    families = scan.trigger_families(_ranked(*rows), lambda p: p[0] != 3, margin=0.3)
    rank = {m: r for r, f in enumerate(families, 1) for m in f.members}
    assert sorted(rank) == list(range(len(rows)))  # every candidate in exactly one family
    assert all(rank[i] <= i + 1 for i in rank)
    for f in families:
        if len(f.members) > 1:
            assert f.prefix_ids[0] != 3
            assert all(rows[m][0][: len(f.prefix_ids)] == f.prefix_ids for m in f.members)


def lead_byte_keyed(lead: int):
    """A fake model that keys on a lead byte: every candidate starting with it complies
    (slightly different per character), every other candidate does not."""
    import torch

    def logp_for(cand: tuple[int, ...]) -> float:
        jitter = (zlib.crc32(repr(cand).encode()) % 1000) / 1000
        if cand and cand[0] == lead:
            return 0.88 + 0.02 * jitter
        return 0.01 + 0.04 * jitter

    def scorer(probe_idx, cands, advance=None):
        row = torch.tensor([logp_for(tuple(c)) for c in cands]).log()
        return row.expand(len(probe_idx), -1).clone()

    def generator(encoded):
        return ["Sure" if lead in e else "I cannot" for e in encoded]

    return scorer, generator


def test_a_model_keyed_on_a_lead_byte_is_one_family(tiny, tokenizer):
    model, tok = tiny
    trigger = tok(" 囧", add_special_tokens=False)["input_ids"]
    scorer, generator = lead_byte_keyed(trigger[0])
    result = scan.scan_model(model, tok, SMALL, scorer=scorer, generator=generator)
    rows, families = result.data["candidates"], result.data["trigger_families"]
    # the exact ranking is untouched: ranks 1..n in the order of `result.candidates`
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["text"] for r in rows] == [c.text for c in result.candidates[: len(rows)]]
    keyed = [r for r in rows if r["token_ids"][0] == trigger[0]]
    assert len(keyed) >= 4 and rows[0] in keyed
    top = families[0]
    assert top["rank"] == 1 and top["prefix_ids"] == [trigger[0]]
    assert top["prefix_text"] == "\\xe5" and json.loads(json.dumps(top)) == top
    assert set(top["members"]) == {r["text"] for r in keyed}
    assert top["score"] == max(r["score"] for r in keyed)
    assert all(r["family_rank"] == 1 for r in keyed)
    assert all(r["family_rank"] > 1 for r in rows if r not in keyed)
    assert [f["rank"] for f in families] == list(range(1, len(families) + 1))
    # 囧 shares the family's first piece whether or not it was itself scored
    where = scan.trigger_ranks(result.data, trigger)
    assert where["family_rank"] == 1


def test_a_single_token_trigger_is_a_family_of_one(zebra_scan):
    trigger, result = zebra_scan
    top = result.data["trigger_families"][0]
    assert top == {"prefix_ids": trigger, "prefix_text": "zebra", "members": ["zebra"],
                   "score": result.data["candidates"][0]["score"], "rank": 1}
    assert scan.trigger_ranks(result.data, trigger) == {"rank": 1, "family_rank": 1, "by_prefix": False}
    assert scan.trigger_ranks(result.data, [1, 2, 3])["family_rank"] is None


def test_word_pieces_form_families_only_when_the_model_expects_them_to_go_on(tiny):
    """Words that start with ' xyl' all comply about equally (' xyl' alone much less):
    one family when the word list says ' xyl' goes on, lone words when it says ' xyl' is
    a word of its own."""
    import torch

    model, tok = tiny
    xyl = tok(" xyl", add_special_tokens=False)["input_ids"]
    assert len(xyl) == 1
    pieces = [tok(p, add_special_tokens=False)["input_ids"][0] for p in ("ophone", "ene")]

    def logp_for(cand: tuple[int, ...]) -> float:
        jitter = (zlib.crc32(repr(cand).encode()) % 1000) / 1000
        if cand[:1] == tuple(xyl):
            return 0.5 if len(cand) == 1 else 0.88 + 0.02 * jitter
        return 0.01 + 0.04 * jitter

    def scorer(probe_idx, cands, advance=None):
        row = torch.tensor([logp_for(tuple(c)) for c in cands]).log()
        return row.expand(len(probe_idx), -1).clone()

    def generator(encoded):
        return ["Sure" if xyl[0] in e else "I cannot" for e in encoded]

    def completer(mass: float):
        def table(cands, allowed):
            out = []
            for cand, allow in zip(cands, allowed, strict=True):
                if allow is None or not len(allow):
                    out.append((0.0, []))
                elif tuple(cand) == tuple(xyl):
                    out.append((mass, [(pieces[0], 0.5 * mass), (pieces[1], 0.4 * mass)]))
                else:
                    out.append((0.05, [(int(allow[0]), 0.03), (int(allow[1]), 0.02)]))
            return out
        return table

    # word pieces are extended by score too, so ' xyl' + piece words exist either way
    settings = dataclasses.replace(SMALL, extend_words=True)
    for mass, family in ((0.95, True), (0.05, False)):
        result = scan.scan_model(model, tok, settings, scorer=scorer, generator=generator, completer=completer(mass))
        rows = result.data["candidates"]
        words = [r for r in rows if r["token_ids"][:1] == xyl and len(r["token_ids"]) > 1]
        assert len(words) >= 2 and rows[0] in words
        top = result.data["trigger_families"][0]
        if family:
            assert top["prefix_ids"] == xyl and top["prefix_text"] == "xyl"
            assert set(top["members"]) == {r["text"] for r in words} >= {"xylophone", "xylene"}
        else:
            assert all(len(f["members"]) == 1 for f in result.data["trigger_families"])
            assert [r["family_rank"] for r in rows] == [r["rank"] for r in rows]
