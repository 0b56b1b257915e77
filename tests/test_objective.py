# SPDX-License-Identifier: MIT
import pytest
import torch

from stackwise.objective import diffusion_mask, mask_tokens, masked_loss

MASK, V = 99, 100


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_diffusion_rate_stays_in_range():
    ids = torch.randint(0, MASK, (4000, 40))
    m, tgt, lm, t = diffusion_mask(ids, _gen(), mask_id=MASK, mask_fraction_min=0.15, mask_fraction_max=0.9)
    rate = lm.float().mean(1)
    assert rate.min() >= 0.15 and rate.max() <= 0.9, (rate.min().item(), rate.max().item())
    assert t.min() >= 0.15 and t.max() <= 0.9
    # rates cover the range roughly uniformly
    assert rate.mean().item() == pytest.approx(0.525, abs=0.02)
    assert (m[lm] == MASK).all() and torch.equal(m[~lm], ids[~lm]) and torch.equal(tgt, ids)


def test_masking_is_seeded():
    ids = torch.randint(0, MASK, (8, 16))
    a = mask_tokens(ids, "diffusion", _gen(3), mask_id=MASK, vocab_size=V)
    b = mask_tokens(ids, "diffusion", _gen(3), mask_id=MASK, vocab_size=V)
    c = mask_tokens(ids, "diffusion", _gen(4), mask_id=MASK, vocab_size=V)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2])


def test_loss_ignores_unsupervised_positions():
    ids = torch.randint(0, MASK, (4, 12))
    _, tgt, lm = mask_tokens(ids, "diffusion", _gen(), mask_id=MASK, vocab_size=V)
    logits = torch.randn(4, 12, V)
    base = masked_loss(logits, tgt, lm)
    noisy = logits.clone()
    noisy[~lm] = torch.randn_like(noisy[~lm]) * 100
    torch.testing.assert_close(masked_loss(noisy, tgt, lm), base)
    changed = logits.clone()
    changed[lm] += torch.randn_like(changed[lm])
    assert masked_loss(changed, tgt, lm) != base
    # equals a mean cross entropy over just the supervised tokens
    ref = torch.nn.functional.cross_entropy(logits[lm], tgt[lm])
    torch.testing.assert_close(base, ref)


def test_inv_t_weighting():
    logits, tgt = torch.randn(2, 4, V), torch.randint(0, MASK, (2, 4))
    lm = torch.ones(2, 4, dtype=torch.bool)
    w = torch.tensor([1.0, 3.0])
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none").view(2, 4)
    torch.testing.assert_close(masked_loss(logits, tgt, lm, w), (ce[0].sum() + 3 * ce[1].sum()) / 8)


def test_mlm_80_10_10():
    ids = torch.randint(0, MASK, (2000, 50))
    m, tgt, lm = mask_tokens(ids, "mlm", _gen(), mask_id=MASK, vocab_size=V, mlm_rate=0.2)
    assert (lm.sum(1) == 10).all()
    sel_m, sel_i = m[lm], ids[lm]
    frac_mask = (sel_m == MASK).float().mean().item()
    frac_same = (sel_m == sel_i).float().mean().item()
    assert frac_mask == pytest.approx(0.8, abs=0.01)
    # kept 10% plus random draws that happen to equal the original (1/99 of 10%)
    assert frac_same == pytest.approx(0.1 + 0.1 / 99, abs=0.01)
    assert not (m[~lm] != ids[~lm]).any()
    assert (m[lm & (m != MASK)] != MASK).all()


def test_clm_shift():
    ids = torch.arange(10).view(1, 10)
    m, tgt, lm = mask_tokens(ids, "clm", _gen(), mask_id=MASK, vocab_size=V)
    assert torch.equal(m, ids) and torch.equal(tgt[0, :-1], ids[0, 1:]) and not lm[0, -1] and lm[0, :-1].all()


def test_unknown_policy():
    with pytest.raises(ValueError, match="policy must be one of"):
        mask_tokens(torch.zeros(1, 4, dtype=torch.long), "bert", _gen(), mask_id=MASK, vocab_size=V)


def test_inv_t_is_the_elbo_per_token_with_the_realised_rate():
    from stackwise.objective import sequence_weights

    # one sequence, T 10, 2 masked tokens (realised rate 0.2): the MDLM/LLaDA loss is sum(ce) / (t T) = sum(ce) / k
    logits, tgt = torch.randn(1, 10, V), torch.randint(0, MASK, (1, 10))
    lm = torch.zeros(1, 10, dtype=torch.bool)
    lm[0, [2, 7]] = True
    w = sequence_weights(lm, "inv_t")
    torch.testing.assert_close(w, torch.tensor([5.0]))
    ce = torch.nn.functional.cross_entropy(logits[0], tgt[0], reduction="none")
    torch.testing.assert_close(masked_loss(logits, tgt, lm, w), ce[lm[0]].sum() / 2)
    assert sequence_weights(lm, "none") is None


def test_inv_t_scale_does_not_depend_on_the_drawn_rates():
    from stackwise.objective import Objective
    from stackwise.config import ModelConfig, ObjectiveConfig

    # with uniform logits every masked token costs ln V: the ELBO-normalised loss is ln V at any mask rate
    obj = Objective.from_config(ObjectiveConfig(loss_weighting="inv_t"), ModelConfig(vocab_size=V, d_model=8,
                                                                                      n_heads=2))
    ids = torch.randint(0, MASK, (6, 50))
    for seed in range(3):
        views = obj.mask(ids, _gen(seed))
        loss = obj.loss(torch.zeros(6, 50, V), views["targets"], views["loss_mask"])
        torch.testing.assert_close(loss, torch.tensor(float(torch.log(torch.tensor(float(V))))))


def test_objective_owns_the_attention_mode():
    from stackwise.objective import Objective
    from stackwise.config import ModelConfig, ObjectiveConfig

    m = ModelConfig(vocab_size=V, d_model=8, n_heads=2)
    assert Objective.from_config(ObjectiveConfig(), m, "clm").attention_mode == "causal"
    assert Objective.from_config(ObjectiveConfig(), m, "diffusion").attention_mode == "bidirectional"
    # loss weighting applies to diffusion only
    assert Objective.from_config(ObjectiveConfig(loss_weighting="inv_t"), m, "mlm").loss_weighting == "none"


@pytest.mark.parametrize("policy,kw", [("diffusion", {}), ("diffusion", {"loss_weighting": "inv_t"}),
                                       ("diffusion", {"band": (0.3, 0.7)}), ("mlm", {}),
                                       ("diffusion", {"recon_weight": 0.1}), ("clm", {})])
def test_head_loss_equals_the_full_head(policy, kw):
    """Objective.head_loss (the head run at scored positions only) gives the loss and gradients of
    loss(head(h)) for every objective. Both paths take the cross-entropy in float32 (as the objective always
    does), so they agree to float32 summation order; a different formula would be off by far more."""
    from stackwise.objective import Objective

    torch.manual_seed(0)
    B, T, C, V = 6, 16, 8, 11
    obj = Objective(policy=policy, mask_id=V - 1, vocab_size=V, **kw)
    views = obj.mask(torch.randint(0, V - 1, (B, T)), torch.Generator().manual_seed(1))
    head = torch.nn.Sequential(torch.nn.LayerNorm(C), torch.nn.Linear(C, V)).double()
    h = torch.randn(B, T, C, dtype=torch.float64)
    grads = []
    for fn in (lambda x: obj.loss(head(x), views["targets"], views["loss_mask"]),
               lambda x: obj.head_loss(x, head, views["targets"], views["loss_mask"]),
               lambda x: obj.head_loss(x, head, views["targets"], views["loss_mask"], denom=7.0) * 7.0 /
               obj.normalizer(views["loss_mask"])):
        x = h.clone().requires_grad_()
        head.zero_grad()
        loss = fn(x)
        loss.backward()
        grads.append((loss.detach(), x.grad, head[1].weight.grad.clone()))
    assert grads[0][0] > 0 and grads[0][1].abs().sum() > 0
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    if policy != "clm" and not kw.get("recon_weight"):  # unscored positions get no gradient at all
        assert (grads[0][1][~views["loss_mask"]] == 0).all()


def test_head_loss_bench_runs_and_both_sides_agree():
    """benchmarks/head_loss_bench.py on the tiny preset: one row per stage depth, same loss on both sides (the
    benchmark refuses to report otherwise), the head run at the batch's masked share of the positions."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("head_loss_bench", os.path.join(root, "benchmarks",
                                                                                  "head_loss_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--config", os.path.join(root, "configs", "tiny.yaml"), "--layers", "1", "2", "--rounds", "1",
                      "--steps", "1", "--threads", "1"])
    assert [r["layers"] for r in out["rows"]] == [1, 2]
    for r in out["rows"]:
        assert r["full_ms"] > 0 and r["scored_ms"] > 0 and r["loss"] > 0
        assert r["scored_positions"] / r["positions"] == pytest.approx(out["mask_rate"], abs=1e-4)
        assert 0 < r["scored_positions"] < r["positions"]


def test_suffix_share_masks_the_last_positions_at_the_same_rates():
    ids = torch.randint(0, MASK, (2000, 40))
    kw = dict(mask_id=MASK, mask_fraction_min=0.15, mask_fraction_max=0.9)
    base = diffusion_mask(ids, _gen(5), **kw)
    # 0: the same generator stream, the same masks, bit for bit (existing runs and caches unchanged)
    assert all(torch.equal(x, y) for x, y in zip(base, diffusion_mask(ids, _gen(5), suffix_share=0.0, **kw)))
    # 1: every row masks exactly its last n positions, n the count the uniform draw would have masked
    _, _, lm, t = diffusion_mask(ids, _gen(5), suffix_share=1.0, **kw)
    n = lm.sum(1)
    assert torch.equal(n, base[2].sum(1)) and torch.equal(t, base[3])
    assert torch.equal(lm, torch.arange(40).unsqueeze(0) >= (40 - n).unsqueeze(1))
    # 0.25: a quarter of the rows (binomial, 2000 rows: 4 sigma is 0.039) are suffixes, the others the uniform draw
    _, _, lm, _ = diffusion_mask(ids, _gen(5), suffix_share=0.25, **kw)
    tail = torch.arange(40).unsqueeze(0) >= (40 - n).unsqueeze(1)
    is_suffix = (lm == tail).all(1)
    assert is_suffix.float().mean().item() == pytest.approx(0.25, abs=0.039)
    assert torch.equal(lm[~is_suffix], base[2][~is_suffix])


def test_suffix_share_reaches_the_training_objective_only():
    from stackwise.config import ConfigError, ModelConfig, ObjectiveConfig
    from stackwise.objective import Objective

    m = ModelConfig(vocab_size=V, d_model=8, n_heads=2)
    o = ObjectiveConfig(suffix_mask_share=1.0)
    diff = Objective.from_config(o, m, "diffusion")
    assert diff.suffix_share == 1.0 and Objective.from_config(o, m, "mlm").suffix_share == 0.0
    ids = torch.randint(0, V - 1, (6, 20))
    v = diff.mask(ids, _gen(1))
    n = v["loss_mask"].sum(1)
    assert torch.equal(v["loss_mask"], torch.arange(20).unsqueeze(0) >= (20 - n).unsqueeze(1))
    with pytest.raises(ConfigError, match="objective.suffix_mask_share"):
        ObjectiveConfig(suffix_mask_share=1.5)
