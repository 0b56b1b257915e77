# SPDX-License-Identifier: MIT
"""Does a sample read as text? Two cheap, reference-free figures of generated text against the training text.

- **real-word rate**: the share of the sample's words that occur as words anywhere in the training split (a word:
  letters with inner apostrophes, lower-cased). Held-out text of the same corpus scores about 0.99 (its rare words
  and names are missing from the training split); garbled subword soup ("stlaffraks'd", "NFONAINACVI") scores low.
- **distinct-word ratio**: unique words / words within each sample, averaged. Low means loops ("I'll I'll I'll");
  a sampler that buys real words by repeating the frequent ones shows up here.

Neither judges grammar or sense; they catch the two ways small samplers fail (made-up words and loops), and they
need no second model. ``benchmarks/sample_quality.py`` prints them for a run's samplers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


def words(text: str) -> list[str]:
    """The lower-cased words of ``text``: runs of letters, with apostrophes inside a word kept ("o'er", "'tis" -> "tis")."""
    return [w.lower() for w in _WORD.findall(text)]


def continuation(text: str, prompt: str) -> str:
    """What a sample adds to its prompt (the whole text when it does not start with the prompt, e.g. a tokenizer
    that does not decode a prompt back to itself)."""
    return text[len(prompt):] if text.startswith(prompt) else text


def training_vocabulary(tokenizer, train_bin: str, dtype, chunk: int = 1 << 20) -> set[str]:
    """Every word of a token shard's decoded text (the training split), decoded in chunks of ``chunk`` ids.

    A word cut at a chunk boundary may add its two fragments: at most two per million ids, negligible here."""
    ids = np.memmap(train_bin, dtype=dtype, mode="r")
    vocab: set[str] = set()
    for lo in range(0, len(ids), chunk):
        vocab.update(words(tokenizer.decode(ids[lo:lo + chunk].tolist())))
    return vocab


def text_stats(texts: Iterable[str], vocabulary: set[str], *, drop_edges: bool = False) -> dict:
    """Real-word rate (over all words of ``texts``; nan without words), mean distinct-word ratio (per text with
    words), and the counts of words and real words.

    ``drop_edges``: leave out each text's first and last word, which a cut at a token boundary may have split
    ("the bre" | "ach of"): for continuations of prompts and windows of a longer text."""
    per = [words(t) for t in texts]
    if drop_edges:
        per = [ws[1:-1] for ws in per]
    n = sum(len(w) for w in per)
    real = sum(w in vocabulary for ws in per for w in ws)
    distinct = [len(set(ws)) / len(ws) for ws in per if ws]
    return {"real_word_rate": real / n if n else float("nan"),
            "distinct_word_ratio": sum(distinct) / len(distinct) if distinct else float("nan"),
            "words": n, "real_words": real, "texts": len(per)}
