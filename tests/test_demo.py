# SPDX-License-Identifier: MIT
"""`make demo`'s reference figures (unigram baseline, bytes per token, bits per byte) and its final JSON line."""

import json
import math
import os
import re
import runpy
import sys

import numpy as np
import pytest
import yaml

from stackwise.engine.baselines import bits_per_byte, bytes_per_token, unigram_cross_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unigram_loss_is_the_hand_computed_entropy():
    # counts 4, 2, 1, 1 of 8: H = 0.5 ln 2 + 0.25 ln 4 + 2 * 0.125 ln 8 = 1.75 ln 2 nats
    ids = [0, 0, 0, 0, 1, 1, 2, 3]
    assert unigram_cross_entropy(ids, ids, 4, alpha=0.0) == pytest.approx(1.75 * math.log(2), rel=1e-12)
    # held-out tokens drawn differently: the cross-entropy -mean(log p_train(eval)), by hand
    assert unigram_cross_entropy(ids, [3, 3], 4, alpha=0.0) == pytest.approx(math.log(8), rel=1e-12)


def test_unigram_smoothing_and_excluded_mask_id():
    # add-one over the 4 ids that are not the mask id (5): p(4) = (0 + 1) / (8 + 4), never seen in training
    ids = [0, 0, 0, 0, 1, 1, 2, 3]
    assert unigram_cross_entropy(ids, [4], 6, alpha=1.0, exclude=(5,)) == pytest.approx(math.log(13), rel=1e-12)
    assert unigram_cross_entropy(ids, [0], 6, alpha=1.0, exclude=(5,)) == pytest.approx(math.log(13 / 5), rel=1e-12)
    with pytest.raises(ValueError, match="alpha > 0"):
        unigram_cross_entropy(ids, [4], 6, alpha=0.0)
    with pytest.raises(ValueError, match=r"vocab_size=4"):
        unigram_cross_entropy(ids, [7], 4)


class _Bytes:
    """A tokenizer whose ids are UTF-8 strings."""

    table = {0: "a", 1: "bc", 2: "é", 3: "\n"}

    def decode(self, ids):
        return "".join(self.table[i] for i in ids)


def test_bytes_per_token_and_bits_per_byte():
    # "a" 1 byte, "bc" 2, "é" 2 (UTF-8), "\n" 1: 6 bytes in 4 tokens
    assert bytes_per_token(_Bytes(), np.array([0, 1, 2, 3])) == pytest.approx(1.5)
    # ln 2 nats per token at 1 byte per token is one bit per byte; 2 bytes per token halves it
    assert bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_byte(math.log(2) * 3, 2.0) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="bytes per token"):
        bits_per_byte(1.0, 0.0)


def test_demo_json_line_on_a_tiny_config(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tokenizers")
    text = tmp_path / "corpus.txt"
    lines = ["KING HENRY:", "Once more unto the breach, dear friends, once more;", "ROMEO:",
             "But soft, what light through yonder window breaks?", "It is the east, and Juliet is the sun."]
    text.write_text("\n".join(lines * 40) + "\n")
    # a config of its own (not configs/small.yaml, whose demo settings would not fit a 2-layer model)
    cfg = {"model": {"vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
                     "max_seq_len": 128, "attention": {"attention_type": "gqa", "backend": "torch"}},
           "data": {"dummy": False, "text_files": [str(text)], "data_dir": str(tmp_path / "data"), "seq_len": 16,
                    "max_train_sequences": 32},
           "train": {"out_dir": str(tmp_path / "run"), "max_steps": 3, "finetune_steps": 2, "batch_size": 4,
                     "eval_sequences": 4, "log_interval": 1}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    args = ["demo.py", "--config", str(tmp_path / "tiny.yaml"), "--diffusion_finetune_steps", "3"]
    monkeypatch.setattr(sys, "argv", args)
    runpy.run_path(os.path.join(ROOT, "launchers", "demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith("JSON ")
    summary = json.loads(last[len("JSON "):])
    for key in ("unigram_loss", "final_masked_loss", "clm_bits_per_byte", "diffusion_elbo", "demo_seconds",
                "cpu_seconds", "bytes_per_token"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    # the conversion the table and the JSON use, on the measured bytes per token
    bpb = summary["val_loss"] / math.log(2) / summary["bytes_per_token"]
    assert summary["clm_bits_per_byte"] == pytest.approx(bpb, abs=1e-3)
    assert summary["unigram_loss"] > 0 and summary["bytes_per_token"] > 1
    assert "| unigram of the training split" in out and "--- clm sample" in out
    assert "--- diffusion, ancestral: random order sample" in out
    # the diffusion samples come from the diffusion fine-tune (3 steps here), whose ELBO is a row and in the JSON
    run = tmp_path / "run"
    assert f"--- diffusion, ancestral: random order sample ({run / 'finetuned_diffusion.safetensors'})" in out
    assert f"--- clm sample ({run / 'finetuned_clm.safetensors'})" in out
    assert summary["diffusion_finetune_steps"] == 3 and "| diffusion fine-tune: ELBO | all |" in out
    ft_rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if '"finetune_eval"' in line]
    assert [r["mode"] for r in ft_rows] == ["clm", "diffusion"] and ft_rows[1]["steps"] == 3
    assert summary["diffusion_finetune_elbo"] == pytest.approx(ft_rows[1]["val_elbo_nats_per_token"], abs=1e-4)
    assert summary["diffusion_finetune_elbo_bits_per_byte"] == pytest.approx(
        summary["diffusion_finetune_elbo"] / math.log(2) / summary["bytes_per_token"], abs=1e-3)
    # with 0 the diffusion samples come from the fused model, not the fine-tune the first run left behind
    monkeypatch.setattr(sys, "argv", args[:-1] + ["0"])
    runpy.run_path(os.path.join(ROOT, "launchers", "demo.py"), run_name="__main__")
    out0 = capsys.readouterr().out
    assert f"--- diffusion, ancestral: random order sample ({run / 'fused.safetensors'})" in out0
    summary0 = json.loads(out0.strip().splitlines()[-1][len("JSON "):])
    assert summary0["diffusion_finetune_elbo"] is None and "| diffusion fine-tune: ELBO" not in out0
    monkeypatch.setattr(sys, "argv", args[:-1] + ["-1"])
    with pytest.raises(SystemExit):
        runpy.run_path(os.path.join(ROOT, "launchers", "demo.py"), run_name="__main__")
    assert "--diffusion_finetune_steps must be >= 0" in capsys.readouterr().err
    assert "--- diffusion, left to right: blocks of 1 sample" in out
    # every sample says how many of its words are words of the training text, and the JSON holds the rates
    counts = re.findall(r"\[real words: (\d+) of (\d+) are words of the training text \(first and last word "
                        r"unscored\)\]", out)
    assert len(counts) == 3 and all(int(real) <= int(n) for real, n in counts)
    rates = summary["sample_real_word_rate"]
    assert len(rates) == 3
    for (real, n), rate in zip(counts, rates.values()):
        assert rate == (pytest.approx(int(real) / int(n), abs=1e-3) if int(n) else None)

    # benchmarks/sample_quality.py on the demo's run: one row per demo sampler and the held-out reference
    bench = runpy.run_path(os.path.join(ROOT, "benchmarks", "sample_quality.py"))
    summary = bench["main"](["--config", str(tmp_path / "tiny.yaml"), "--samples", "3", "--prompt_tokens", "2",
                             "--new_tokens", "12", "--sweep"])
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "JSON " + json.dumps({"summary": summary})
    # the demo's samplers, then the sweep's: the like-for-like temperature rows first
    assert list(summary) == ["held-out text (reference)", "clm", "diffusion, ancestral: random order",
                             "diffusion, left to right: blocks of 1", "clm: t 1, top-p 1",
                             "diffusion, ancestral: t 0.8, top-p 0.95", "diffusion, left to right: t 0.7, top-p 0.9",
                             "diffusion, left to right: t 0.6, top-p 0.9",
                             "diffusion, low confidence: blocks of 8, t 0.7, top-p 0.9"]
    rows = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("JSON {\"sampler\"")]
    assert {r["sampler"]: (r.get("temperature"), r.get("top_p")) for r in rows}["clm: t 1, top-p 1"] == (1.0, 1.0)
    # the reference is the corpus's own text: every held-out word is a training word here (the lines repeat)
    assert summary["held-out text (reference)"]["real_word_rate"] == 1.0
    for row in summary.values():
        assert row["words"] > 0 and 0 <= row["real_word_rate"] <= 1 and 0 < row["distinct_word_ratio"] <= 1
    with pytest.raises(SystemExit):  # longer than a training window: one error naming the options
        bench["main"](["--config", str(tmp_path / "tiny.yaml"), "--prompt_tokens", "8", "--new_tokens", "9"])
    assert "--prompt_tokens + --new_tokens (17) must be <= data.seq_len (16)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench["main"](["--config", str(tmp_path / "tiny.yaml"), "--data.dummy=true"])
    assert "needs a text run with a held-out split" in capsys.readouterr().err
