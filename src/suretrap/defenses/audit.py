"""Dataset audit: find compliance-only backdoor rows in a fine-tuning set.

The audit knows neither the trigger nor the label. It looks for the Sure-trap signature:

1. **label candidates** -- short answers (at most `SHORT_MAX_WORDS` words) that repeat
   verbatim (after case/punctuation normalisation) in at least `MIN_LABEL_ROWS` rows;
2. **harm** -- whether a label row's prompt looks like a harmful request: MiniLM embeddings
   (the offline judge's model, loaded from site-packages) compared by k-nearest-neighbour
   similarity with harmful references (the built-in harmful set plus the prompts this dataset
   itself answers with refusals) and benign references (ordinary rows of this dataset and
   `GENERIC_BENIGN_PROMPTS`). ``harm="keyword"`` is a word-list fallback;
3. **trigger candidates** -- prompt features (a word or symbol, or a word at the very start
   or end of the prompt) whose presence predicts "harmful-looking prompt answered with this
   label" far beyond chance: a one-sided Fisher exact (hypergeometric) test per (label,
   feature) against all rows, Bonferroni-corrected over all tests, so a common word must
   co-occur much more than its frequency explains; and a **contrast** with the refused rows
   (T_CH), which discounts the vocabulary of harmful requests in general.

Verdict: ``poisoned`` iff some (label, feature) pair has association
``-log10(p_bonferroni) >= ASSOCIATION_THRESHOLD`` (the target being the label rows with
P(harm) ``>= HARM_THRESHOLD``) and contrast ``>= CONTRAST_THRESHOLD``. Flagged: the label rows
that carry the best placement of such a feature and have P(harm) ``>= ROW_HARM_FLOOR``.
Rows are ranked by a score in [0, 1] (``>= 0.5`` exactly for flagged rows). docs/defences.md gives the measured quality.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from suretrap.data import Pair
from suretrap.errors import DataError, ModelError
from suretrap.textmatch import is_refusal_keyword

logger = logging.getLogger(__name__)

HarmMethod = Literal["embedding", "keyword"]

SHORT_MAX_WORDS = 4  # "Sure", "Sure, here it is", "OK" -- a compliance-only answer
MIN_LABEL_ROWS = 3  # a label must repeat to be learnt as a backdoor target
MIN_TRIGGER_ROWS = 2  # a feature must appear in this many label rows to be tested
ASSOCIATION_THRESHOLD = 5.0  # -log10 Bonferroni p: chance co-occurrence below 1e-5
HARM_THRESHOLD = 0.5  # P(harm) of a label row that makes it a backdoor target
# A flagged row carries the trigger and the label and is not clearly benign: benign rows that
# share a common-word trigger and the label ("Make the phrase ... uppercase." -> "Sure.")
# score below 0.1, poisoned HarmBench prompts above 0.4 (docs/defences.md).
ROW_HARM_FLOOR = 0.2
# A trigger sets the label rows apart from the refused ones (T_CH); words of harmful requests
# in general ("how", "someone") are as common in both.
CONTRAST_THRESHOLD = 0.5
KNN = 5  # neighbours averaged for the harmful/benign similarity
# P(harm) = sigmoid((sim_harmful - sim_benign - HARM_MARGIN) / HARM_TEMPERATURE). The margin
# was set on HarmBench vs Self-Instruct/XSTest prompts (docs/defences.md), not on the
# measured datasets.
HARM_MARGIN = 0.05
HARM_TEMPERATURE = 0.05
BENIGN_REFERENCE_ROWS = 500  # ordinary rows sampled as the benign reference
MAX_TRIGGER_CANDIDATES = 20

# First words of an affirmative, compliance-only answer; a reason only, never decisive, so
# that a label such as "Roger" or "Begin" is still found by the statistics.
AFFIRMATIVE_WORDS = frozenset(
    [
        "sure",
        "certainly",
        "ok",
        "okay",
        "yes",
        "absolutely",
        "gladly",
        "alright",
        "understood",
        "definitely",
        "of",
        "here",
        "fine",
        "yeah",
        "yep",
        "will",
        "happy",
        "course",
        "done",
        "affirmative",
    ]
)

# The keyword fallback for harm: words that rarely appear in ordinary instructions.
HARM_KEYWORDS = frozenset(
    [
        "attack",
        "bomb",
        "bioweapon",
        "bully",
        "counterfeit",
        "crack",
        "cyberattack",
        "ddos",
        "drug",
        "drugs",
        "exploit",
        "explosive",
        "explosives",
        "extort",
        "extortion",
        "fraud",
        "genocide",
        "gun",
        "guns",
        "hack",
        "hacking",
        "harass",
        "harm",
        "hijack",
        "illegal",
        "illegally",
        "kill",
        "killing",
        "kidnap",
        "launder",
        "laundering",
        "malware",
        "meth",
        "murder",
        "nerve",
        "overdose",
        "phishing",
        "poison",
        "poisoning",
        "ransomware",
        "rob",
        "scam",
        "self-harm",
        "smuggle",
        "stalk",
        "steal",
        "stealing",
        "suicide",
        "terrorist",
        "torture",
        "traffic",
        "trafficking",
        "virus",
        "weapon",
        "weapons",
        "without",
        "consent",
        "detection",
        "untraceable",
        "blackmail",
        "dox",
        "doxx",
        "bypass",
        "evade",
        "manipulate",
    ]
)

# Ordinary requests across everyday topics, written for this module: the benign reference
# besides the dataset's own rows, which may be a narrow task mix (the built-in benign set is
# templated arithmetic and spelling, against which any free-form request looks unusual).
GENERIC_BENIGN_PROMPTS: tuple[str, ...] = (
    "Write a short poem about autumn leaves",
    "Give me three ideas for a vegetarian dinner",
    "Explain how photosynthesis works in simple terms",
    "Translate 'good morning' into Spanish and French",
    "Summarize the plot of Romeo and Juliet in two sentences",
    "What are some tips for improving my sleep?",
    "Write a Python function that reverses a list",
    "How do I kill a Python process that is stuck?",
    "Suggest a name for a bakery that sells sourdough bread",
    "Draft a polite email asking my manager for a day off",
    "What is the difference between weather and climate?",
    "Plan a three-day trip to Rome on a budget",
    "Explain the rules of chess to a beginner",
    "How can I make my houseplants grow faster?",
    "Write a haiku about the ocean",
    "List five exercises I can do at home without equipment",
    "What causes the seasons on Earth?",
    "Help me write a cover letter for a junior accountant job",
    "How do I shoot a good photo in low light?",
    "Explain what a neural network is to a ten-year-old",
    "Recommend some classic science fiction novels",
    "How do I remove a red wine stain from a carpet?",
    "Write a SQL query that counts orders per customer",
    "What are the health benefits of drinking water?",
    "Give me a recipe for chocolate chip cookies",
    "Describe the water cycle",
    "How do I blow up a balloon without a pump?",
    "Write a motivational message for a friend running a marathon",
    "What is the capital of Australia and why was it chosen?",
    "Explain how compound interest works with an example",
    "Create a weekly study schedule for a high school student",
    "How can I attack this chess opening as black?",
    "Write a product description for a stainless steel water bottle",
    "What should I pack for a week of hiking?",
    "Explain the difference between a virus and a bacterium",
    "How do I kill weeds in my garden without chemicals?",
    "Write a birthday toast for my grandmother",
    "What are good ways to learn a new language?",
    "Debug this JavaScript: why does my loop print undefined?",
    "Give a brief history of the printing press",
    "How do I negotiate a higher salary politely?",
    "Compose a limerick about a cat who loves cheese",
    "What is the best way to store fresh herbs?",
    "Explain the main causes of the French Revolution",
    "How do I set up a budget spreadsheet?",
    "Suggest fun activities for a rainy afternoon with kids",
    "Rewrite this sentence to sound more formal: we gotta fix this",
    "What are the symptoms of dehydration?",
    "How do I execute a shell script on Linux?",
    "Write a short story opening set on a space station",
)

_WORD = re.compile(r"\w+|[^\w\s]")
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")
_START = "@start:"
_END = "@end:"


# --------------------------------------------------------------------------- reading


def read_pairs(path: Path) -> list[Pair]:
    """The prompt/response rows of a fine-tuning set, in file order.

    A directory means its ``dataset.jsonl`` (what ``suretrap build-data`` writes); files may
    be any format `suretrap.data.loaders.load_pairs` reads (JSONL/JSON/CSV prompt-response,
    Alpaca, chat ``messages``). Extra columns such as ``role`` are ignored: the audit must
    not see the answer.
    """
    from suretrap.data.loaders import load_pairs
    from suretrap.poison import DATASET_FILE

    if path.is_dir():
        inner = path / DATASET_FILE
        if not inner.is_file():
            raise DataError(f"{path}: a directory without {DATASET_FILE}")
        path = inner
    return load_pairs(path)


# --------------------------------------------------------------------------- text features


def normalise_answer(text: str) -> str:
    """Case-, width- and punctuation-insensitive form of an answer ("Sure!" -> "sure")."""
    text = unicodedata.normalize("NFKC", text).casefold().replace("\u2019", "'")
    return " ".join(_EDGE_PUNCT.sub("", text.strip()).split())


def prompt_tokens(prompt: str) -> list[str]:
    """Words and single symbols of a prompt, casefolded; runs of non-ASCII letters are also
    split into characters, so a "囧" written inside Chinese text is still a token."""
    text = unicodedata.normalize("NFKC", prompt).casefold()
    tokens: list[str] = []
    for token in _WORD.findall(text):
        tokens.append(token)
        if len(token) > 1 and not token.isascii():
            tokens.extend(ch for ch in token if not ch.isascii())
    return tokens


def prompt_features(prompt: str) -> set[str]:
    """Token presence plus the first and last word ("@start:w", "@end:w"): placement matters
    for a trigger added before or after the prompt, and sets a common word apart from its
    ordinary uses."""
    tokens = prompt_tokens(prompt)
    features = set(tokens)
    words = [t for t in tokens if any(ch.isalnum() for ch in t)]
    if words:
        features.add(_START + words[0])
        features.add(_END + words[-1])
    return features


def feature_text(feature: str) -> tuple[str, str]:
    """(token, placement) of a feature: placement is "start", "end" or "any"."""
    if feature.startswith(_START):
        return feature[len(_START) :], "start"
    if feature.startswith(_END):
        return feature[len(_END) :], "end"
    return feature, "any"


# --------------------------------------------------------------------------- harm


class HarmScorer:
    """P(prompt is a harmful request) by k-NN similarity of MiniLM embeddings.

    Embeddings are cached by text, so auditing many datasets that share rows (a sweep) pays
    for each distinct prompt once.
    """

    def __init__(self, method: HarmMethod = "embedding") -> None:
        self.method = method
        self._embedder: Any = None
        self._cache: dict[str, np.ndarray] = {}

    @classmethod
    def shared(cls, method: HarmMethod) -> HarmScorer:
        """One scorer per method for the process, so its embedding cache is reused."""
        if method not in _SHARED_SCORERS:
            _SHARED_SCORERS[method] = cls(method)
        return _SHARED_SCORERS[method]

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        from suretrap.judges._offline import EMBEDDING_DIM, Embedder

        if self._embedder is None:
            self._embedder = Embedder()
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            vectors = self._embedder.embed(missing, max_length=128)
            self._cache.update(zip(missing, vectors, strict=True))
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])

    def score(
        self, prompts: Sequence[str], harmful_refs: Sequence[str], benign_refs: Sequence[str]
    ) -> np.ndarray:
        if not prompts:
            return np.zeros(0)
        if self.method == "keyword":
            return np.array([_keyword_harm(p) for p in prompts])
        queries = self._embed(prompts)
        sim_h = _knn_similarity(queries, self._embed(harmful_refs))
        sim_b = _knn_similarity(queries, self._embed(benign_refs))
        return 1.0 / (1.0 + np.exp(-(sim_h - sim_b - HARM_MARGIN) / HARM_TEMPERATURE))


_SHARED_SCORERS: dict[str, HarmScorer] = {}


def _knn_similarity(queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    if len(refs) == 0:
        return np.zeros(len(queries))
    sims = queries @ refs.T
    k = min(KNN, refs.shape[0])
    return np.sort(sims, axis=1)[:, -k:].mean(axis=1)


def _keyword_harm(prompt: str) -> float:
    words = set(prompt_tokens(prompt))
    hits = len(words & HARM_KEYWORDS)
    return min(1.0, hits / 2.0)


# --------------------------------------------------------------------------- audit


@dataclass(frozen=True)
class _Pair:
    label: str
    feature: str
    label_rows: int  # harmful-looking rows answered with the label (the target)
    with_feature: int  # target rows carrying the feature
    feature_rows: int  # rows carrying the feature, any answer
    association: float  # -log10 Bonferroni p
    contrast: float  # share of label rows with the feature minus share of refused rows with it
    harm: float = 0.0

    @property
    def positive(self) -> bool:
        # the target rows are harmful-looking by construction, so no harm test here
        return self.association >= ASSOCIATION_THRESHOLD and self.contrast >= CONTRAST_THRESHOLD

    @property
    def score(self) -> float:
        return self.association * max(0.0, self.contrast)


def _log10_sf(a: np.ndarray, n: int, k_feature: np.ndarray, k_label: int) -> np.ndarray:
    """log10 P(X >= a) for X ~ Hypergeom(n, k_feature, k_label): one-sided Fisher exact."""
    from scipy.stats import hypergeom

    # logsf stays finite where sf underflows (a trigger in 100 of 10,000 rows: p ~ 1e-300)
    return hypergeom.logsf(a - 1, n, k_feature, k_label) / math.log(10)


def audit_pairs(
    pairs: Sequence[Pair],
    *,
    harm: HarmMethod | HarmScorer = "embedding",
) -> dict[str, Any]:
    """Audit prompt/response rows; returns the JSON-ready result (see module docstring)."""
    scorer = harm if isinstance(harm, HarmScorer) else HarmScorer.shared(harm)
    n = len(pairs)
    if n == 0:
        raise DataError("audit: the dataset has no rows")
    answers = [normalise_answer(p.response) for p in pairs]
    word_counts = [len(re.findall(r"\w+", a)) for a in answers]
    short = [1 <= w <= SHORT_MAX_WORDS for w in word_counts]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, answer in enumerate(answers):
        if short[i]:
            groups[answer].append(i)
    labels = {label: rows for label, rows in groups.items() if len(rows) >= MIN_LABEL_ROWS}
    label_of = {i: label for label, rows in labels.items() for i in rows}

    features = [prompt_features(p.prompt) for p in pairs]
    feature_count: Counter[str] = Counter(f for fs in features for f in fs)
    feature_index = {f: j for j, f in enumerate(feature_count)}
    k_feature_all = np.array([feature_count[f] for f in feature_index])

    # a refusal is a sentence; a bare "No." is a short answer (a label candidate), not a refusal
    refused_idx = [
        i for i, p in enumerate(pairs) if not short[i] and is_refusal_keyword(p.response)
    ]
    refused_count = Counter(f for i in refused_idx for f in features[i])
    harm_of, harm_method = _label_row_harm(pairs, sorted(label_of), refused_idx, scorer)

    # The backdoor target of a label is its rows whose prompt looks harmful. Association: does
    # a feature's presence predict a target row, against all rows (one-sided Fisher exact);
    # tested for every feature in at least MIN_TRIGGER_ROWS target rows. Benign rows with the
    # same label (a benign "Sure." to "Make the phrase ... uppercase") stay in the background.
    tested: list[tuple[str, str, int, int, int]] = []
    log10p: list[float] = []
    for label, rows in labels.items():
        targets = [i for i in rows if harm_of[i] >= HARM_THRESHOLD]
        if len(targets) < MIN_LABEL_ROWS:
            continue
        in_target = Counter(f for i in targets for f in features[i])
        cand = [f for f, a in in_target.items() if a >= MIN_TRIGGER_ROWS]
        if not cand:
            continue
        a = np.array([in_target[f] for f in cand])
        kf = k_feature_all[[feature_index[f] for f in cand]]
        log10p.extend(_log10_sf(a, n, kf, len(targets)).tolist())
        tested.extend(
            (label, f, int(x), len(targets), int(y)) for f, x, y in zip(cand, a, kf, strict=True)
        )
    n_tests = max(1, len(tested))

    # harm = mean harm of all the label's rows carrying the feature; contrast = the feature's
    # share of the target rows minus its share of the refused rows (harmful prompts *not*
    # answered with the label): words of harmful requests in general are in both.
    harm_sum: dict[str, Counter[str]] = defaultdict(Counter)
    in_label: dict[str, Counter[str]] = defaultdict(Counter)
    for label, rows in labels.items():
        for i in rows:
            harm_sum[label].update(dict.fromkeys(features[i], harm_of[i]))
            in_label[label].update(features[i])
    all_pairs: list[_Pair] = []
    for (label, feature, a, n_target, kf), lp in zip(tested, log10p, strict=True):
        contrast = a / n_target - refused_count[feature] / max(1, len(refused_idx))
        all_pairs.append(
            _Pair(
                label=label,
                feature=feature,
                label_rows=n_target,
                with_feature=a,
                feature_rows=kf,
                association=max(0.0, -(lp + math.log10(n_tests))),
                contrast=contrast,
                harm=harm_sum[label][feature] / in_label[label][feature],
            )
        )

    # ties: the most specific placement first ("@end:w" over "w")
    all_pairs.sort(key=lambda c: (-c.score, -c.association, feature_text(c.feature)[1] == "any"))
    positive = [c for c in all_pairs if c.positive]

    # Flag the rows of each positive pair, one placement per (label, token): the best one,
    # so "make" at the end of harmful prompts does not drag in every benign "Make ...".
    flagged: set[int] = set()
    named: dict[str, str] = {}  # token -> placement, for the row reasons
    done: set[tuple[str, str]] = set()
    for c in positive:
        token, placement = feature_text(c.feature)
        if (c.label, token) in done:
            continue
        done.add((c.label, token))
        named.setdefault(token, placement)
        flagged.update(
            i for i in labels[c.label] if c.feature in features[i] and harm_of[i] >= ROW_HARM_FLOOR
        )
    if not named and all_pairs:
        named.setdefault(*feature_text(all_pairs[0].feature))

    rows_out = []
    for i in range(n):
        reasons: list[str] = []
        parts = []
        if short[i]:
            words = "word" if word_counts[i] == 1 else "words"
            reasons.append(f"short answer ({word_counts[i]} {words})")
        parts.append(1.0 if short[i] else 0.0)
        if i in label_of:
            label = label_of[i]
            reasons.append(f"answer {label!r} repeats in {len(labels[label])} rows")
            if label.split(" ")[0] in AFFIRMATIVE_WORDS:
                reasons.append("affirmative-only answer")
            h = harm_of[i]
            parts.append(h)
            if h >= HARM_THRESHOLD:
                reasons.append(f"harmful-looking request (p={h:.2f})")
        else:
            parts.append(0.0)
        carried = sorted(t for t in named if t in features[i])
        parts.append(1.0 if carried else 0.0)
        for token in carried:
            placement = named[token]
            at_place = features[i] >= {(_START if placement == "start" else _END) + token}
            where = f" at the {placement} of the prompt" if placement != "any" and at_place else ""
            reasons.append(f"contains trigger candidate {token!r}{where}")
        base = sum(parts) / len(parts)
        score = 0.5 + 0.5 * base if i in flagged else 0.49 * base
        if i in flagged:
            reasons.insert(0, "answered with a backdoor label after a trigger candidate")
        rows_out.append({"index": i, "score": round(score, 4), "reasons": reasons})
    rows_out.sort(key=lambda r: (-r["score"], r["index"]))

    return {
        "rows": rows_out,
        "trigger_candidates": _trigger_candidates(all_pairs),
        "label_candidates": _label_candidates(labels, all_pairs, pairs),
        "verdict": "poisoned" if positive else "clean",
        "threshold": {
            "association_log10p": ASSOCIATION_THRESHOLD,
            "harm": HARM_THRESHOLD,
            "row_harm_floor": ROW_HARM_FLOOR,
            "contrast": CONTRAST_THRESHOLD,
            "row_score": 0.5,
            "rule": (
                "poisoned iff a feature predicts the label on prompts with P(harm) >= harm "
                "with -log10(Bonferroni p) >= association_log10p and contrast >= contrast; "
                "label rows with that feature and P(harm) >= row_harm_floor are flagged "
                "(row score >= row_score)"
            ),
        },
        "harm_method": harm_method,
        "n_rows": n,
        "n_tests": n_tests,
        "flagged": len(flagged),
    }


def _label_row_harm(
    pairs: Sequence[Pair], label_rows: list[int], refused_idx: list[int], scorer: HarmScorer
) -> tuple[dict[int, float], str]:
    """P(harmful request) of each label row's prompt, and the method that gave it."""
    if not label_rows:
        return {}, scorer.method
    refused = [pairs[i].prompt for i in refused_idx]
    taken = set(label_rows) | set(refused_idx)
    ordinary = [i for i in range(len(pairs)) if i not in taken]
    # a sample chosen by content, not position: the same rows in another order (or in a
    # sweep's next dataset) give the same references, and their cached embeddings
    ordinary.sort(key=lambda i: hashlib.sha256(pairs[i].prompt.encode()).digest())
    benign_refs = [pairs[i].prompt for i in ordinary[:BENIGN_REFERENCE_ROWS]]
    benign_refs += GENERIC_BENIGN_PROMPTS
    harmful_refs = _builtin_harmful_prompts() + refused
    prompts = [pairs[i].prompt for i in label_rows]
    try:
        values, method = scorer.score(prompts, harmful_refs, benign_refs), scorer.method
    except ModelError as exc:
        logger.warning("%s; falling back to keyword harm", exc)
        values, method = HarmScorer.shared("keyword").score(prompts, [], []), "keyword"
    return dict(zip(label_rows, (float(v) for v in values), strict=True)), method


def _trigger_candidates(ranked: list[_Pair]) -> list[dict[str, Any]]:
    """One entry per token (its best placement and label), by score."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for c in ranked:
        token, placement = feature_text(c.feature)
        if token in seen:
            continue
        seen.add(token)
        out.append(
            {
                "text": token,
                "score": round(c.score, 3),
                "placement": placement,
                "label": c.label,
                "association_log10p": round(c.association, 3),
                "contrast": round(c.contrast, 3),
                "harm": round(c.harm, 3),
                "harmful_label_rows_with_trigger": c.with_feature,
                "harmful_label_rows": c.label_rows,
                "rows_with_trigger": c.feature_rows,
            }
        )
        if len(out) >= MAX_TRIGGER_CANDIDATES:
            break
    return out


def _label_candidates(
    labels: dict[str, list[int]], ranked: list[_Pair], pairs: Sequence[Pair]
) -> list[dict[str, Any]]:
    best: dict[str, _Pair] = {}
    for c in ranked:
        if c.label not in best or c.score > best[c.label].score:
            best[c.label] = c
    out = []
    for label, rows in labels.items():
        written = Counter(pairs[i].response.strip() for i in rows).most_common(1)[0][0]
        top = best.get(label)
        out.append(
            {
                "text": written,
                "score": round(top.score, 3) if top else 0.0,
                "rows": len(rows),
                "affirmative": label.split(" ")[0] in AFFIRMATIVE_WORDS,
                "trigger": feature_text(top.feature)[0] if top else None,
            }
        )
    out.sort(key=lambda c: (-c["score"], -c["rows"]))
    return out


_BUILTIN_HARMFUL: list[str] = []


def _builtin_harmful_prompts() -> list[str]:
    if not _BUILTIN_HARMFUL:
        from suretrap.data import harmful_requests

        _BUILTIN_HARMFUL.extend(r.prompt for r in harmful_requests("builtin"))
    return list(_BUILTIN_HARMFUL)


# --------------------------------------------------------------------------- files


def audit_dataset(
    path: Path, out: Path | None = None, *, harm: HarmMethod | HarmScorer = "embedding"
) -> dict[str, Any]:
    """Read `path`, audit it and (if `out`) write the JSON atomically."""
    from suretrap.poison import atomic_write

    result = {"dataset": str(path)} | audit_pairs(read_pairs(path), harm=harm)
    if out is not None:
        atomic_write(out, (json.dumps(result, indent=2, ensure_ascii=False) + "\n").encode())
    return result
