"""English words by frequency (wordfreq's list, shipped in its wheel: offline).

Used where a *word* is the unit: the trigger scan's dictionary candidates, and the
fingerprint test's control words matched to the key's token count.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=8)
def english_words(min_zipf: float, min_letters: int = 3) -> tuple[str, ...]:
    """Lowercase ASCII words with Zipf frequency >= `min_zipf`, most frequent first.

    Zipf = log10(uses per billion words): 2.0 is one use in 10 million words.
    """
    from wordfreq import get_frequency_dict

    floor = 10.0 ** (min_zipf - 9)
    freqs = get_frequency_dict("en", "large")
    words = [
        w for w, f in freqs.items()
        if f >= floor and len(w) >= min_letters and w.isascii() and w.isalpha() and w.islower()
    ]
    return tuple(sorted(words, key=lambda w: -freqs[w]))
