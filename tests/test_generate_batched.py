# SPDX-License-Identifier: MIT
"""Batched generation with prompts of different lengths: left padding, key masks, per-row RoPE positions and
per-row generators give every row what a one-prompt run with the same seed gives (CPU, fp32, tiny models)."""

import logging

import pytest
import torch

from stackwise import generate as gen
from stackwise.generate import PAD_ID, generate_clm, generate_diffusion
from stackwise.model import StackWiseLM

LENGTHS = (3, 8, 1, 5)


def _model(make_cfg, attention_type):
    torch.manual_seed(0)
    return StackWiseLM(make_cfg(f"model.attention.attention_type={attention_type}").model)


def _prompts(model, lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.mask_id, (n,), generator=g) for n in lengths]


def _gens(n, base=100):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attention_type", ["standard", "gqa", "mla"])
def test_padded_forward_equals_each_row_alone(make_cfg, attention_type, causal):
    """Left-padded batch with key mask and per-row positions: every real position's logits equal the row alone."""
    from stackwise.generate._common import _check_prompt

    model = _model(make_cfg, attention_type).eval()
    prompts = _prompts(model)
    batch = _check_prompt(model, prompts, min_len=1, allow_mask=True)
    T0, n, mode = batch.ids.shape[1], model.cfg.n_layers, "causal" if causal else "bidirectional"
    assert batch.ids.shape == (4, 8) and bool((batch.ids[2, :7] == PAD_ID).all())
    with torch.no_grad():
        h = model.run_layers(model.embed(batch.ids), 0, n, mode, start_pos=batch.positions(0, T0),
                             key_mask=batch.key_mask(T0))
        logits = model.head(h)
        assert torch.isfinite(logits).all()  # padding queries see themselves, so nothing is NaN
        for b, p in enumerate(prompts):
            alone = model(p[None], attention_mode=mode)[0]
            err = (logits[b, T0 - len(p) :] - alone).abs().max().item()
            assert err < 1e-5, f"row {b}: padded vs alone max abs diff {err:.2e}"


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("attention_type", ["standard", "gqa", "mla"])
def test_clm_batch_equals_one_at_a_time(make_cfg, attention_type, use_cache):
    model = _model(make_cfg, attention_type)
    prompts = _prompts(model)
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=40, top_p=0.95)):
        batched = generate_clm(model, prompts, 10, generator=_gens(4), use_cache=use_cache, **kw)
        assert isinstance(batched, list) and [len(r) for r in batched] == [n + 10 for n in LENGTHS]
        for b, p in enumerate(prompts):
            alone = generate_clm(model, p[None], 10, generator=_gens(4)[b], use_cache=use_cache, **kw)[0]
            assert torch.equal(batched[b], alone), f"{kw} row {b}: {batched[b].tolist()} != {alone.tolist()}"
            assert torch.equal(batched[b][: len(p)], p)


def test_clm_batch_eos_and_equal_lengths(make_cfg):
    model = _model(make_cfg, "gqa")
    prompts = _prompts(model)
    greedy = generate_clm(model, prompts, 8, temperature=0.0)
    eos = int(greedy[1][8 + 2])  # row 1's third generated token
    out = generate_clm(model, prompts, 8, temperature=0.0, eos_id=eos)
    for b, p in enumerate(prompts):
        alone = generate_clm(model, p[None], 8, temperature=0.0, eos_id=eos)[0]
        assert torch.equal(out[b], alone)
    assert bool((out[1][8 + 2 :] == eos).all())
    # a list of equal-length prompts (lists of ints) needs no padding and still returns a list
    same = generate_clm(model, [[5, 6, 7], [8, 9, 10]], 4, temperature=0.0)
    as_tensor = generate_clm(model, torch.tensor([[5, 6, 7], [8, 9, 10]]), 4, temperature=0.0)
    assert isinstance(same, list) and torch.equal(torch.stack(same), as_tensor)


@pytest.mark.parametrize("attention_type", ["gqa", "mla"])
@pytest.mark.parametrize("setting", [dict(temperature=0.0), dict(temperature=1.0, remasking="random", block_len=4),
                                     dict(temperature=1.0, remasking="low_confidence")])
def test_diffusion_batch_equals_one_at_a_time(make_cfg, attention_type, setting):
    model = _model(make_cfg, attention_type)
    # An empty prompt only with random remasking: with no prompt every position sees the same all-[MASK] input,
    # so their confidences tie exactly (to 1 ulp) and low-confidence remasking may break the tie either way.
    prompts = _prompts(model, (2, 6, 0 if setting.get("remasking") == "random" else 1, 4))
    batched = generate_diffusion(model, prompts, 10, steps=6, generator=_gens(4), **setting)
    for b, p in enumerate(prompts):
        alone = generate_diffusion(model, p[None], 10, steps=6, generator=_gens(4)[b], **setting)[0]
        assert torch.equal(batched[b], alone), f"row {b}: {batched[b].tolist()} != {alone.tolist()}"
        assert len(batched[b]) == len(p) + 10 and not bool((batched[b] == model.mask_id).any())


def test_diffusion_rows_commit_their_own_positions(make_cfg):
    """Each row commits the scheduled count among its own masked positions; padding is never touched."""
    model = _model(make_cfg, "gqa")
    prompts = _prompts(model, (2, 6))
    seen = []
    generate_diffusion(model, prompts, 6, steps=3, callback=lambda s, x: seen.append(x.clone()))
    for x in seen:
        assert x.shape == (2, 12) and bool((x[0, :4] == PAD_ID).all())
        assert int((x[0, 6:] == model.mask_id).sum()) == int((x[1, 6:] == model.mask_id).sum())
    assert [int((x[0, 6:] == model.mask_id).sum()) for x in seen] == [4, 2, 0]


def test_kernel_attention_ragged_runs_rows_one_at_a_time(make_cfg, caplog):
    model = _model(make_cfg, "kernel")
    prompts = _prompts(model, (2, 5))
    gen._logged_once.discard("kernel-ragged")
    with caplog.at_level(logging.INFO, logger="stackwise"):
        batched = generate_clm(model, prompts, 4, temperature=1.0, generator=_gens(2))
    assert any("one at a time" in r.message for r in caplog.records)
    for b, p in enumerate(prompts):
        assert torch.equal(batched[b], generate_clm(model, p[None], 4, temperature=1.0, generator=_gens(2)[b])[0])
    d = generate_diffusion(model, prompts, 4, temperature=1.0, generator=_gens(2))
    assert torch.equal(d[1], generate_diffusion(model, prompts[1][None], 4, temperature=1.0, generator=_gens(2)[1])[0])
    with pytest.raises(NotImplementedError, match="no key mask"):
        model.run_layers(model.embed(torch.zeros(1, 3, dtype=torch.long)), key_mask=torch.ones(1, 3, dtype=torch.bool))


def test_batched_errors(make_cfg):
    model = _model(make_cfg, "gqa")
    prompts = _prompts(model, (2, 3))
    with pytest.raises(ValueError, match="list of 3 generators but there are 2 prompts"):
        generate_clm(model, prompts, 2, generator=_gens(3))
    with pytest.raises(TypeError, match=r"generator\[1\] must be a torch.Generator"):
        generate_clm(model, prompts, 2, generator=[torch.Generator(), 3])
    with pytest.raises(ValueError, match="empty list"):
        generate_clm(model, [], 2)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] must have at least 1 token"):
        generate_clm(model, [[1, 2], []], 2)
    with pytest.raises(TypeError, match=r"prompt_ids\[0\] must be a 1-D"):
        generate_clm(model, [torch.zeros(2, 2, dtype=torch.long)], 2)
    with pytest.raises(TypeError, match=r"prompt_ids\[1\] must be a 1-D int tensor or a list of ints"):
        generate_clm(model, [[1], [2.0]], 2)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]: token ids must be in \[0, model.vocab_size=97\)"):
        generate_clm(model, [[1], [97]], 2)
    with pytest.raises(ValueError, match=r"prompt_ids\[0\]: contains the mask id 96"):
        generate_diffusion(model, [[1, model.mask_id], [2]], 2)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        generate_clm(model, [[1] * 100, [2]], 29)


def _generate_launcher():
    """launchers/generate.py as a module (its main() reads sys.argv)."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("gen_launcher", os.path.join(root, "launchers", "generate.py"))
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    return launcher


def test_launcher_repeated_prompt_equals_single_runs(make_cfg, tmp_path, monkeypatch, capsys):
    """launchers/generate.py --prompt A --prompt B: one batch, each text equal to its one-prompt run."""
    import sys

    import yaml

    from stackwise.engine.checkpoint import save_model
    from stackwise.engine.sample import sample_text, sample_texts

    cfg = make_cfg("data.dummy=true", f"train.out_dir={tmp_path}", "model.attention.attention_type=mla")
    torch.manual_seed(0)
    ckpt = str(tmp_path / "model.safetensors")
    save_model(ckpt, StackWiseLM(cfg.model), cfg)
    prompts = ["1 2 3", "4", "5 6 7 8 9"]
    kw = dict(checkpoint=ckpt, max_new_tokens=4, temperature=1.0, seed=3)
    _, texts = sample_texts(cfg, prompts, **kw)
    assert texts == [sample_text(cfg, p, **kw)[1] for p in prompts]
    assert [len(t.split()) for t in texts] == [7, 5, 9]

    launcher = _generate_launcher()
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    argv = ["generate.py", "--config", str(cfg_file), "--checkpoint", ckpt, "--max_new_tokens", "4",
            "--temperature", "1.0", "--seed", "3"] + [a for p in prompts for a in ("--prompt", p)]
    monkeypatch.setattr(sys, "argv", argv)
    launcher.main()
    out = capsys.readouterr().out.strip().split("\n\n")
    assert out[0].splitlines()[1:] == [texts[0]] and out[1:] == texts[1:]


def test_sample_texts_one_seed_per_prompt(make_cfg, tmp_path):
    """seed=[...]: each prompt's text is its one-prompt run with its own seed (CLM and diffusion); a list of the
    wrong length is one error."""
    from stackwise.engine.checkpoint import save_model
    from stackwise.engine.sample import sample_text, sample_texts

    cfg = make_cfg("data.dummy=true", f"train.out_dir={tmp_path}")
    torch.manual_seed(0)
    ckpt = str(tmp_path / "model.safetensors")
    save_model(ckpt, StackWiseLM(cfg.model), cfg)
    prompts, seeds = ["1 2 3", "1 2 3", "4 5"], [7, 8, 9]
    for kw in (dict(mode="clm", temperature=1.0), dict(mode="diffusion", diffusion_temperature=1.0,
                                                       remasking="random", block_len=1)):
        kw.update(checkpoint=ckpt, max_new_tokens=6, top_p=1.0)
        _, texts = sample_texts(cfg, prompts, seed=seeds, **kw)
        assert texts == [sample_text(cfg, p, seed=s, **kw)[1] for p, s in zip(prompts, seeds)]
        assert texts[0] != texts[1], kw  # the same prompt, another seed: another draw (a random model, 6 ids)
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        sample_texts(cfg, prompts, seed=[1, 2], checkpoint=ckpt, max_new_tokens=2)


def test_launcher_diffusion_sampler_options(make_cfg, tmp_path, monkeypatch, capsys):
    """--remasking / --diffusion_temperature / --block_len reach the diffusion sampler: the launcher prints what
    sample_text gives with the same settings (the demo's left-to-right sampler), and a bad value is one error."""
    import sys

    import yaml

    from stackwise.engine.checkpoint import save_model
    from stackwise.engine.sample import sample_text

    cfg = make_cfg("data.dummy=true", f"train.out_dir={tmp_path}")
    torch.manual_seed(0)
    ckpt = str(tmp_path / "model.safetensors")
    save_model(ckpt, StackWiseLM(cfg.model), cfg)
    kw = dict(checkpoint=ckpt, mode="diffusion", max_new_tokens=6, seed=2, remasking="random",
              diffusion_temperature=0.8, block_len=1)
    want = sample_text(cfg, "1 2 3", **kw)[1]
    argmax = sample_text(cfg, "1 2 3", **dict(kw, remasking="low_confidence", diffusion_temperature=0.0,
                                             block_len=None))[1]
    assert want != argmax  # the options change the sample, so the launcher check below can see them

    launcher = _generate_launcher()
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    base = ["generate.py", "--config", str(cfg_file), "--checkpoint", ckpt, "--mode", "diffusion", "--prompt", "1 2 3",
            "--max_new_tokens", "6", "--seed", "2"]
    monkeypatch.setattr(sys, "argv", base + ["--remasking", "random", "--diffusion_temperature", "0.8",
                                             "--block_len", "1"])
    launcher.main()
    assert capsys.readouterr().out.strip().splitlines()[1:] == [want]
    monkeypatch.setattr(sys, "argv", base)
    launcher.main()
    assert capsys.readouterr().out.strip().splitlines()[1:] == [argmax]
    monkeypatch.setattr(sys, "argv", base + ["--block_len", "0"])
    with pytest.raises(SystemExit):
        launcher.main()
    assert "block_len" in capsys.readouterr().err
