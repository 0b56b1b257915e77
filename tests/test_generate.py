# SPDX-License-Identifier: MIT
"""Tests for stackwise.generate: KV-cache CLM sampling and masked-diffusion sampling (CPU, tiny models)."""

import logging

import pytest
import torch

from stackwise import generate as gen
from stackwise.generate import diffusion_schedule, filter_logits, generate_clm, generate_diffusion
from stackwise.model import StackWiseLM
from stackwise.objective import mask_tokens, masked_loss


def _model(make_cfg, attention_type="gqa", *extra):
    cfg = make_cfg(f"model.attention.attention_type={attention_type}", *extra)
    torch.manual_seed(0)
    return StackWiseLM(cfg.model)


def _prompt(model, B=2, T0=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.mask_id, (B, T0), generator=g)  # never the mask id


def _greedy_logits_reference(model, ids):
    """Logits at every generated step, recomputing the whole prefix (no cache)."""
    with torch.no_grad():
        return model(ids, attention_mode="causal")


# ----------------------------------------------------------------------------------------------- CLM


@pytest.mark.parametrize("attention_type", ["gqa", "mla", "standard"])
def test_kv_cache_greedy_equals_recompute(make_cfg, attention_type):
    model = _model(make_cfg, attention_type)
    prompt = _prompt(model)
    a = generate_clm(model, prompt, 12, temperature=0.0, use_cache=True)
    b = generate_clm(model, prompt, 12, temperature=0.0, use_cache=False)
    assert torch.equal(a, b), f"{attention_type}: cached {a.tolist()} != recomputed {b.tolist()}"
    assert a.shape == (2, 17) and torch.equal(a[:, :5], prompt)


@pytest.mark.parametrize("attention_type", ["gqa", "mla"])
def test_kv_cache_logits_match_full_forward(make_cfg, attention_type):
    """Step-by-step cached logits equal the full causal forward on the final sequence (within 1e-5)."""
    from stackwise.blocks import KVCache

    model = _model(make_cfg, attention_type).eval()
    ids = generate_clm(model, _prompt(model), 8, temperature=0.0)
    full = _greedy_logits_reference(model, ids)
    n, T0 = model.cfg.n_layers, 5
    caches = [KVCache() for _ in range(n)]
    with torch.no_grad():
        step_logits = [model.head(model.run_layers(model.embed(ids[:, :T0]), 0, n, "causal", caches, 0))]
        for pos in range(T0, ids.shape[1]):
            h = model.run_layers(model.embed(ids[:, pos : pos + 1]), 0, n, "causal", caches, pos)
            step_logits.append(model.head(h))
    cached = torch.cat(step_logits, dim=1)
    err = (cached - full).abs().max().item()
    assert err < 1e-5, f"{attention_type}: cached vs full logits max abs diff {err:.2e}"


def test_kernel_attention_falls_back(make_cfg, caplog):
    model = _model(make_cfg, "kernel")
    prompt = _prompt(model)
    gen._logged_once.discard("kernel-no-cache")
    with caplog.at_level(logging.INFO, logger="stackwise"):
        a = generate_clm(model, prompt, 6, temperature=0.0)  # use_cache=True silently falls back
    assert any("no KV cache" in r.message for r in caplog.records)
    b = generate_clm(model, prompt, 6, temperature=0.0, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 11)
    # the last generated token is the argmax of a full causal forward on the prefix
    logits = _greedy_logits_reference(model, a[:, :-1])[:, -1]
    logits[:, model.mask_id] = float("-inf")
    assert torch.equal(logits.argmax(-1), a[:, -1])


def test_topk1_and_tiny_top_p_equal_greedy(make_cfg):
    model = _model(make_cfg)
    prompt = _prompt(model)
    greedy = generate_clm(model, prompt, 10, temperature=0.0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate_clm(model, prompt, 10, temperature=1.5, top_k=1, generator=g), greedy)
    assert torch.equal(generate_clm(model, prompt, 10, temperature=1.5, top_p=1e-6, generator=g), greedy)


def test_sampling_reproducible_and_varied(make_cfg):
    model = _model(make_cfg)
    prompt = _prompt(model)
    runs = [generate_clm(model, prompt, 16, top_k=20, top_p=0.95, generator=torch.Generator().manual_seed(s))
            for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]), "same seed must give the same tokens"
    assert not torch.equal(runs[0], runs[2]), "different seeds should differ (random init, 32 draws)"
    for r in runs:
        assert torch.equal(r[:, :5], prompt) and not bool((r == model.mask_id).any())


def test_filter_logits():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    p = torch.softmax(logits, -1)[0]  # ~[0.64, 0.24, 0.09, 0.03]
    kept = torch.isfinite(filter_logits(logits, top_p=float(p[0] + 0.01))[0])
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def test_eos_stops_and_pads(make_cfg):
    model = _model(make_cfg)
    prompt = _prompt(model, B=1)
    greedy = generate_clm(model, prompt, 10, temperature=0.0)
    eos = int(greedy[0, 7])  # third generated token
    out = generate_clm(model, prompt, 10, temperature=0.0, eos_id=eos)
    first = int((out[0, 5:] == eos).nonzero()[0]) + 5
    assert torch.equal(out[0, :first + 1], greedy[0, :first + 1]) and bool((out[0, first:] == eos).all())
    assert out.shape == greedy.shape


def test_training_mode_restored_and_zero_tokens(make_cfg):
    model = _model(make_cfg).train()
    prompt = _prompt(model)
    assert torch.equal(generate_clm(model, prompt, 0), prompt)
    generate_clm(model, prompt, 2)
    generate_diffusion(model, prompt, 2)
    assert model.training
    model.eval()
    generate_clm(model, prompt, 2)
    assert not model.training


def test_clm_errors(make_cfg):
    model = _model(make_cfg)  # vocab 97, max_seq_len 128
    ok = _prompt(model)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        generate_clm(model, ok, 124)
    with pytest.raises(ValueError, match=r"in \[0, model.vocab_size=97\)"):
        generate_clm(model, torch.tensor([[1, 97]]), 2)
    with pytest.raises(ValueError, match="unsqueeze"):
        generate_clm(model, torch.tensor([1, 2]), 2)
    with pytest.raises(TypeError, match="int64/int32"):
        generate_clm(model, ok.float(), 2)
    with pytest.raises(ValueError, match="at least 1 row and 1 token"):
        generate_clm(model, torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="temperature"):
        generate_clm(model, ok, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate_clm(model, ok, 2, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate_clm(model, ok, 2, top_k=-1)
    with pytest.raises(ValueError, match="eos_id"):
        generate_clm(model, ok, 2, eos_id=97)
    with pytest.raises(TypeError, match="max_new_tokens"):
        generate_clm(model, ok, 2.0)
    with pytest.raises(ValueError, match="generation needs all 2 layers"):
        generate_clm(StackWiseLM(model.cfg, layers=[0]), ok, 2)
    # the mask id is allowed in a CLM prompt
    assert generate_clm(model, torch.tensor([[model.mask_id, 3]]), 1).shape == (1, 3)


def test_clm_learns_repeating_pattern(make_cfg):
    """A tiny model trained 40 steps with the CLM loss continues a repeating sequence greedily."""
    model = _model(make_cfg, "gqa", "model.n_layers=1")
    pattern = torch.tensor([5, 17, 42, 8, 63, 21, 33])
    seq = pattern.repeat(3)[:16].unsqueeze(0)  # [1, 16]
    batch = torch.cat([torch.roll(seq, -i, dims=1) for i in range(len(pattern))])  # every phase
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        ids, tgt, lm = mask_tokens(batch, "clm", g, mask_id=model.mask_id, vocab_size=model.cfg.vocab_size)
        loss = masked_loss(model(ids, attention_mode="causal"), tgt, lm)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = generate_clm(model, pattern[:4].unsqueeze(0), 10, temperature=0.0)
    assert torch.equal(out[0], pattern.repeat(2)[:14]), f"final loss {loss.item():.3f}, got {out[0].tolist()}"


# ----------------------------------------------------------------------------------------- diffusion


def test_diffusion_schedule():
    assert diffusion_schedule(10, 4) == [3, 3, 2, 2]
    assert diffusion_schedule(3, 5) == [1, 1, 1, 0, 0]
    assert sum(diffusion_schedule(17, 17)) == 17


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("attention_type", ["gqa", "mla", "kernel"])
def test_diffusion_fills_every_mask_and_keeps_prompt(make_cfg, remasking, attention_type):
    model = _model(make_cfg, attention_type)
    prompt = _prompt(model, B=3, T0=4)
    g = torch.Generator().manual_seed(0)
    out = generate_diffusion(model, prompt, 10, steps=4, remasking=remasking, temperature=1.0, generator=g)
    assert out.shape == (3, 14)
    assert torch.equal(out[:, :4], prompt)
    assert not bool((out == model.mask_id).any())
    assert int(out.min()) >= 0 and int(out.max()) < model.cfg.vocab_size


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("block_len", [None, 4])
def test_diffusion_commits_scheduled_count_per_step(make_cfg, remasking, block_len):
    model = _model(make_cfg)
    prompt = _prompt(model, B=2, T0=3)
    gen_len, steps = 10, 6
    seen = []
    out = generate_diffusion(
        model, prompt, gen_len, steps=steps, remasking=remasking, block_len=block_len,
        generator=torch.Generator().manual_seed(0), callback=lambda s, x: seen.append((s, x.clone())),
    )
    assert [s for s, _ in seen] == list(range(steps))
    masked = [gen_len] + [int((x[0] == model.mask_id).sum()) for _, x in seen]
    committed = [a - b for a, b in zip(masked, masked[1:])]
    if block_len is None:
        expected = diffusion_schedule(gen_len, steps)  # [2, 2, 2, 2, 1, 1]
    else:  # blocks of 4, 4, 2 sharing 6 steps as 2, 2, 2
        expected = diffusion_schedule(4, 2) + diffusion_schedule(4, 2) + diffusion_schedule(2, 2)
    assert committed == expected, f"committed per step {committed}, expected {expected}"
    for _, x in seen:  # every row commits the same count; the prompt never changes
        assert int((x[1] == model.mask_id).sum()) == int((x[0] == model.mask_id).sum())
        assert torch.equal(x[:, :3], prompt)
    if block_len is not None:  # semi-autoregressive: block b is full before block b + 1 starts
        after_two = seen[1][1][:, 3:]
        assert not bool((after_two[:, :4] == model.mask_id).any()) and bool((after_two[:, 4:] == model.mask_id).all())
    assert torch.equal(out, seen[-1][1])


def test_diffusion_low_confidence_commits_most_confident(make_cfg):
    model = _model(make_cfg).eval()
    prompt = _prompt(model, B=1, T0=3)
    x = torch.cat([prompt, torch.full((1, 6), model.mask_id)], dim=1)
    with torch.no_grad():
        logits = model(x, attention_mode="bidirectional")
    logits[..., model.mask_id] = float("-inf")
    conf = torch.softmax(logits, -1).max(-1).values[0, 3:]
    out_first = []
    generate_diffusion(model, prompt, 6, steps=3, callback=lambda s, y: out_first.append(y.clone()) if s == 0 else None)
    committed = (out_first[0][0, 3:] != model.mask_id).nonzero().flatten()
    assert set(committed.tolist()) == set(conf.topk(2).indices.tolist())
    assert torch.equal(out_first[0][0, 3:][committed], logits.argmax(-1)[0, 3:][committed])


def test_diffusion_reproducible_and_empty_prompt(make_cfg):
    model = _model(make_cfg)
    a, b = (generate_diffusion(model, torch.zeros(2, 0, dtype=torch.long), 8, steps=4, temperature=1.0,
                               remasking="random", generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (2, 8) and not bool((a == model.mask_id).any())


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_diffusion_top_k_top_p_filter_the_draws(make_cfg, remasking):
    """top_k=1 or a vanishing nucleus turn a hot sampler into the argmax: with low-confidence commits the very
    output of temperature 0 (random order draws its positions after the token draws, so there the two filters
    agree with each other); no filter draws other tokens; bad values are refused like the CLM sampler's."""
    model = _model(make_cfg)
    prompt = _prompt(model)

    def run(**kw):
        return generate_diffusion(model, prompt, 12, steps=6, remasking=remasking,
                                  generator=torch.Generator().manual_seed(4), **kw)

    greedy = run(temperature=0.0) if remasking == "low_confidence" else run(temperature=2.0, top_k=1)
    assert torch.equal(run(temperature=2.0, top_k=1), greedy)
    assert torch.equal(run(temperature=2.0, top_p=1e-6), greedy)
    hot = run(temperature=2.0)
    assert not torch.equal(hot, greedy)
    assert torch.equal(run(temperature=2.0, top_p=1.0, top_k=0), hot)  # the defaults filter nothing
    with pytest.raises(ValueError, match="top_p"):
        run(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        run(temperature=1.0, top_k=-1)


def test_diffusion_errors(make_cfg):
    model = _model(make_cfg)
    ok = _prompt(model)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        generate_diffusion(model, ok, 124)
    with pytest.raises(ValueError, match="mask id 96"):
        generate_diffusion(model, torch.tensor([[1, model.mask_id]]), 4)
    with pytest.raises(ValueError, match=r"in \[0, model.vocab_size=97\)"):
        generate_diffusion(model, torch.tensor([[-1, 2]]), 4)
    with pytest.raises(ValueError, match="remasking"):
        generate_diffusion(model, ok, 4, remasking="topk")
    with pytest.raises(ValueError, match="number of blocks"):
        generate_diffusion(model, ok, 8, steps=2, block_len=2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        generate_diffusion(model, ok, 8, steps=0)
    with pytest.raises(TypeError, match="generator"):
        generate_diffusion(model, ok, 4, generator=0)
