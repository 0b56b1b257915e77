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
