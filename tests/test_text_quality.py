# SPDX-License-Identifier: MIT
"""stackwise.engine.text_quality: words, the training vocabulary of a shard, real-word rate and distinct ratio."""

import math

import numpy as np
import pytest

from stackwise.engine.text_quality import continuation, text_stats, training_vocabulary, words


def test_words_keep_inner_apostrophes_and_drop_digits_and_punctuation():
    assert words("O'er the hill, 'tis 2 KINGS:\nExeunt--Romeo's") == ["o'er", "the", "hill", "tis", "kings",
                                                                      "exeunt", "romeo's"]
    assert words("Élan, naïve") == ["élan", "naïve"]  # letters beyond ASCII are letters
    assert words("  \n 12 ... ") == []


def test_text_stats_known_numbers():
    vocab = {"the", "king", "is", "dead"}
    # text 1: 4 words, 3 real ("kng" is not), 4 distinct; text 2: 4 words, all real, 2 distinct
    st = text_stats(["The kng is dead", "the the king king"], vocab)
    assert st["words"] == 8 and st["real_words"] == 7 and st["texts"] == 2
    assert st["real_word_rate"] == pytest.approx(7 / 8)
    assert st["distinct_word_ratio"] == pytest.approx((4 / 4 + 2 / 4) / 2)
    # the first and last word of each text (a cut may split them) left out: "kng is" and "the king" are scored
    edges = text_stats(["The kng is dead", "the the king king"], vocab, drop_edges=True)
    assert edges["words"] == 4 and edges["real_words"] == 3 and edges["real_word_rate"] == pytest.approx(3 / 4)
    # a text without words counts toward no ratio; no words at all: nan, not 0 or a crash
    assert text_stats(["...", "king"], vocab)["distinct_word_ratio"] == 1.0
    empty = text_stats(["", "12"], vocab)
    assert empty["words"] == 0 and math.isnan(empty["real_word_rate"]) and math.isnan(empty["distinct_word_ratio"])


class _Chars:
    """A tokenizer whose ids are characters."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_training_vocabulary_reads_a_shard_in_chunks(tmp_path):
    text = "the king is dead, long live the king\n" * 3
    path = tmp_path / "train.bin"
    np.array([ord(c) for c in text], dtype=np.uint16).tofile(path)
    whole = training_vocabulary(_Chars(), str(path), np.uint16)
    assert whole == {"the", "king", "is", "dead", "long", "live"}
    # chunks cut words: at most the two fragments of a cut word join the set, never a word is lost
    chunked = training_vocabulary(_Chars(), str(path), np.uint16, chunk=10)
    assert whole <= chunked and len(chunked - whole) <= 2 * math.ceil(len(text) / 10)


def test_continuation_strips_the_prompt_only_when_the_text_starts_with_it():
    assert continuation("ROMEO:\nWhy, then", "ROMEO:\n") == "Why, then"
    assert continuation("ROMEO: Why", "JULIET:") == "ROMEO: Why"
