# SPDX-License-Identifier: MIT
"""Helpers of ``quality_bench.py``: held-out metrics of a trained model, FLOP counts, the table and the plots.

Metrics (all on the held-out split of the corpus, with masks drawn from fixed seeds so every method is
scored on the very same masked sequences):
- masked-token loss / accuracy at fixed mask rates (``stackwise.objective.diffusion_mask(rate=r)``);
- ``mix``: the training distribution, one rate per sequence drawn from [mask_fraction_min, mask_fraction_max];
- the diffusion ELBO bound over t in (0, 1] (``stackwise.engine.evaluate.diffusion_elbo``), nats/token.
FLOPs come from ``stackwise.plan`` (its 6N-per-trained / 4N-per-frozen matmul formula plus attention).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics

import torch

from stackwise.engine.evaluate import diffusion_elbo
from stackwise.engine.recipes import cache_layer, overlap_layers
from stackwise.objective import diffusion_mask, masked_accuracy, masked_loss
from stackwise.plan import plan_cache, plan_end_to_end, plan_stage

RATES = (0.15, 0.5, 0.9)


def _batches(data, n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield torch.stack([data[i] for i in range(s, min(s + batch_size, n))])


@torch.no_grad()
def eval_model(model, val, cfg, device, *, n_seq: int, batch_size: int = 32, seed: int = 1234) -> dict:
    """Held-out masked loss/accuracy at each rate in RATES and at the training mix, and the ELBO bound."""
    model.eval()
    n = min(n_seq, len(val))
    mask_id, o = cfg.model.mask_id, cfg.objective
    out = {}
    for tag, rate in [(f"r{r}", r) for r in RATES] + [("mix", None)]:
        g = torch.Generator().manual_seed(seed)
        tot = acc = cnt = 0.0
        for ids in _batches(val, n, batch_size):
            masked, tgt, lm, _ = diffusion_mask(ids, g, mask_id=mask_id, rate=rate,
                                                mask_fraction_min=o.mask_fraction_min,
                                                mask_fraction_max=o.mask_fraction_max)
            logits = model(masked.to(device), attention_mode="bidirectional")
            k = float(lm.sum())
            tot += float(masked_loss(logits, tgt.to(device), lm.to(device))) * k
            acc += float(masked_accuracy(logits, tgt.to(device), lm.to(device))) * k
            cnt += k
        out[f"loss_{tag}"], out[f"acc_{tag}"] = tot / cnt, acc / cnt
    out["elbo"] = diffusion_elbo(model, val, batch_size=batch_size, limit=n, seed=seed, device=device, mask_id=mask_id)
    return out


def _joint_finetune(method: dict) -> bool:
    """Whether the method ends with the joint fine-tune after fusion (``finetune``: after its source run's stages;
    ``ft_share``: inside the same total)."""
    return bool(method.get("finetune") or method.get("ft_share"))


def method_flops(cfg, method: dict, *, n_views: int, device: str) -> float:
    """Training FLOPs of one method (stages or end-to-end, caching, joint fine-tuning), from stackwise.plan."""
    m, t = cfg.model, cfg.train
    kw = dict(dtype=t.dtype, device=device)
    tok = t.max_steps * t.batch_size * t.grad_accum * cfg.data.seq_len
    e2e = plan_end_to_end(cfg, keep_frozen_mlp=True, **kw).flops_per_token
    head = 6.0 * m.vocab_size * m.d_model
    layer = (e2e - head) / m.n_layers
    if method["kind"] == "e2e":
        total = e2e * tok
    else:
        K = method.get("layers_per_stage", 1)
        trains_head = method.get("overrides", {}).get("train.stage_trains_head", True)
        steps = t.stage_steps or [t.max_steps] * (m.n_layers // K)
        unit = t.batch_size * t.grad_accum * cfg.data.seq_len
        total = 0.0
        for i, first in enumerate(range(0, m.n_layers, K)):
            th = first == 0 or trains_head
            # plan_stage counts the stage's first layer, the train.stage_overlap window before it and the
            # train.global_head blocks; a K-layer stage adds its other K - 1 layers
            one = plan_stage(cfg, layer=first, train_head=th, **kw).flops_per_token
            total += (one + (K - 1) * layer) * steps[i] * unit
            # the stage caches the next stage's input, layer cache_layer (forward from its first layer), on the
            # train rows the later stages read (every view under engine.cache_rows=all; shards rounded away)
            out = cache_layer(cfg, first)
            if out >= 0 and i + 1 < len(steps):
                depth = out - overlap_layers(cfg, [first])[0] + 1
                later = steps[i + 1:]
                read = (sum(later) if t.stage_data == "continue" else max(later)) * unit
                rows = n_views * cfg.data.seq_len
                if cfg.engine.cache_rows == "read":
                    rows = min(rows, read)
                total += depth * plan_cache(cfg, layer=first, **kw).flops_per_token * rows
    if _joint_finetune(method):
        total += e2e * t.finetune_steps * t.batch_size * cfg.data.seq_len
    return total


def planned_peak_bytes(cfg, method: dict, *, device: str) -> float:
    """Peak memory ``stackwise.plan`` predicts for the method's largest phase (a stage, or end-to-end training)."""
    kw = dict(dtype=cfg.train.dtype, device=device, zero_stage=0)
    e2e = plan_end_to_end(cfg, keep_frozen_mlp=True, **kw).total
    if method["kind"] == "e2e":
        return e2e
    K = method.get("layers_per_stage", 1)
    th = method.get("overrides", {}).get("train.stage_trains_head", True)
    # plan_stage models a stage's first layer with its overlap window and global-head blocks; a K-layer stage
    # holds K - 1 more layers, each costing what one more layer adds to an end-to-end plan over a 1-layer stage
    one = max(plan_stage(cfg, layer=f, train_head=f == 0 or th, **kw).total for f in range(0, cfg.model.n_layers, K))
    bare = replace_cfg(cfg, train={"stage_overlap": False, "global_head": 0})
    per_layer = (e2e - plan_stage(bare, layer=1 % cfg.model.n_layers, **kw).total) / max(1, cfg.model.n_layers - 1)
    peak = one + (K - 1) * max(per_layer, 0.0)
    return max(peak, e2e) if _joint_finetune(method) else peak


def _ms(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def _pct(xs: list[float]) -> str:
    if not xs:
        return ""
    return f"{statistics.mean(xs):+.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


DEPTH_MIN_DENOM = 0.1  # nats: below this the 1-layer vs full-depth gap is too small to judge depth efficiency


def depth_efficiency(loss: float, loss_1layer: float, loss_full: float) -> dict:
    """How much of the end-to-end depth gain a method recovers, at equal total tokens.

    ``(loss_1layer - loss) / (loss_1layer - loss_full)``: 1 = as good as the full-depth end-to-end model
    (``e2e_long``), 0 = no better than a 1-layer model trained end to end on the same tokens (``e2e1_long``).
    The denominator (nats) comes with it; under ``DEPTH_MIN_DENOM`` the ratio is flagged as too small to judge,
    a negative one (the 1-layer model beat the full-depth one) included: there the ratio means nothing.
    """
    den = loss_1layer - loss_full
    return {"value": (loss_1layer - loss) / den if den != 0 else None, "denominator": den,
            "too_small": den < DEPTH_MIN_DENOM}


def _mstd(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    return {"mean": statistics.mean(xs) if xs else None, "std": statistics.stdev(xs) if len(xs) > 1 else None,
            "n": len(xs)}


DEPTH_BASELINES = ("e2e_long", "e2e1_long")


def depth_summary(rows: list[dict], loss_key: str = "loss_mix", baselines: tuple[str, str] = DEPTH_BASELINES) -> dict:
    """Per method: depth efficiency and % gap to ``e2e_long``, per seed and as mean / std over seeds.

    Depth efficiency needs ``e2e1_long`` and ``e2e_long`` of the same seed, the gap only ``e2e_long``; seeds
    without them are left out, methods with none get no entry. Each row gets ``depth_efficiency``,
    ``depth_denominator`` and ``depth_too_small`` / ``vs_e2e_long_pct`` set where they apply. ``baselines``
    names the (full-depth, 1-layer) end-to-end methods, e.g. ``("e2e_long_recon", "e2e1_long_recon")`` to judge
    the methods trained with the reconstruction term against baselines trained with it too.
    """
    full_name, one_name = baselines
    one = {r["seed"]: r[loss_key] for r in rows if r["method"] == one_name}
    full = {r["seed"]: r[loss_key] for r in rows if r["method"] == full_name}
    out: dict = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        entry = {}
        per = []
        for r in rs:
            if r["seed"] in one and r["seed"] in full:
                d = depth_efficiency(r[loss_key], one[r["seed"]], full[r["seed"]])
                r["depth_efficiency"], r["depth_denominator"], r["depth_too_small"] = \
                    d["value"], d["denominator"], d["too_small"]
                per.append({"seed": r["seed"], **d})
        if per:
            too_small = [p["seed"] for p in per if p["too_small"]]
            entry["depth_efficiency"] = {**_mstd([p["value"] for p in per]),
                                         # over the seeds whose denominator is >= DEPTH_MIN_DENOM only
                                         "judgeable": _mstd([p["value"] for p in per if not p["too_small"]]),
                                         "denominator": _mstd([p["denominator"] for p in per]),
                                         "too_small_to_judge": bool(too_small), "too_small_seeds": too_small,
                                         "min_denominator": DEPTH_MIN_DENOM, "per_seed": per}
        gaps = []
        for r in rs:
            if r["seed"] in full:
                r["vs_e2e_long_pct"] = 100 * (r[loss_key] - full[r["seed"]]) / full[r["seed"]]
                gaps.append(r["vs_e2e_long_pct"])
        if gaps:
            entry["vs_e2e_long_pct"] = _mstd(gaps)
        if entry:
            out[m] = entry
    return out


def summarize(rows: list[dict], baseline: str = "e2e",
              depth_baselines: tuple[str, str] = DEPTH_BASELINES) -> tuple[str, dict]:
    """Markdown table (mean ± std over seeds per method) and a summary dict with the gap to the baseline;
    depth efficiency and the "vs e2e_long" gap against ``depth_baselines`` (see ``depth_summary``)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {m: [r for r in rows if r["method"] == m] for m in methods}
    base = {r["seed"]: r["loss_mix"] for r in by.get(baseline, [])}
    depth = depth_summary(rows, baselines=depth_baselines)
    hdr = ["method", "seeds", "masked loss (mix)", "gap vs e2e %", "gap vs e2e_long %", "depth eff.", "acc (mix)"]
    hdr += [f"loss@{r}" for r in RATES] + \
          [f"acc@{r}" for r in RATES] + ["ELBO nats/tok", "CLM ppl", "min layer gain", "tokens/group", "GFLOP",
                                         "wall s", "CPU s", "peak MiB", "planned MiB"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    summary = {}
    for m in methods:
        rs = by[m]
        # gap per seed against the baseline of the same seed, then mean ± std
        gaps = [100 * (r["loss_mix"] - base[r["seed"]]) / base[r["seed"]] for r in rs if r["seed"] in base]
        gains = [min(r["layer_gains"]) for r in rs if r.get("layer_gains")]
        summary[m] = {"loss_mix": statistics.mean(r["loss_mix"] for r in rs),
                      "gap_pct": statistics.mean(gaps) if gaps else None,
                      "gap_pct_std": statistics.stdev(gaps) if len(gaps) > 1 else None,
                      "min_layer_gain": min(gains) if gains else None, **depth.get(m, {})}
        de = depth.get(m, {}).get("depth_efficiency")
        de_cell = "" if de is None else (_ms([p["value"] for p in de["per_seed"]]) + (
            f" (denominator < 0.1 nats on seeds {de['too_small_seeds']}; the others: "
            f"{_ms([p['value'] for p in de['per_seed'] if not p['too_small']])})" if de["too_small_to_judge"] else ""))
        cells = [m, str(len(rs)), _ms([r["loss_mix"] for r in rs]), _pct(gaps),
                 _pct([r["vs_e2e_long_pct"] for r in rs if "vs_e2e_long_pct" in r]), de_cell,
                 _ms([r["acc_mix"] for r in rs])]
        cells += [_ms([r[f"loss_r{x}"] for r in rs]) for x in RATES]
        cells += [_ms([r[f"acc_r{x}"] for r in rs]) for x in RATES]
        cells += [_ms([r["elbo"] for r in rs]), _ms([r.get("clm_ppl") for r in rs]),
                  f"{min(gains):+.4f}" if gains else "n/a", f"{rs[0]['tokens_per_group']:,}",
                  f"{statistics.mean(r['flops'] for r in rs) / 1e9:.0f}",
                  f"{statistics.mean(r['wall_s'] for r in rs):.0f}", f"{statistics.mean(r['cpu_s'] for r in rs):.0f}",
                  f"{statistics.mean(r['peak_mem_mib'] for r in rs):.0f}",
                  f"{rs[0].get('planned_peak_mib', float('nan')):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def plot(rows: list[dict], out_dir: str) -> list[str]:
    """loss_vs_tokens.png (training masked loss vs tokens processed, per method) and layer_gain.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m in methods:
        rs = [r for r in rows if r["method"] == m and r["curve"]]
        n = min((len(r["curve"]) for r in rs), default=0)
        if not n:
            continue
        # mean over seeds (same logging steps), smoothed over 5 log points: single batches are noisy
        ys = [statistics.mean(r["curve"][i][1] for r in rs) for i in range(n)]
        ys = [statistics.mean(ys[max(0, i - 4):i + 1]) for i in range(n)]
        dashed = m in ("block4", "layerwise_ft")  # they retrace e2e / layerwise, then continue
        ax.plot([rs[0]["curve"][i][0] for i in range(n)], ys, color=colors[m], lw=1.2, ls="--" if dashed else "-",
                label=f"{m} ({len(rs)} seeds)")
    ax.set_xlabel("tokens processed (all stages back to back)")
    ax.set_ylabel("training masked-token loss")
    ax.set_title("Training masked loss vs tokens (mean over seeds, smoothed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [os.path.join(out_dir, "loss_vs_tokens.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        rs = [r for r in rows if r["method"] == m and r.get("stage_val_loss") and not r.get("source_run")]
        if not rs:
            continue
        n = len(rs[0]["stage_val_loss"])
        mean = [statistics.mean(r["stage_val_loss"][i][1] for r in rs) for i in range(n)]
        layers = [rs[0]["stage_val_loss"][i][0] for i in range(n)]
        ax.plot(layers, mean, marker="o", color=colors[m], label=m)
    for m in methods:
        rs = [r for r in rows if r["method"] == m and r["method"] == "e2e"]
        if rs:
            ax.axhline(statistics.mean(r["stage_eval_e2e"] for r in rs), color=colors[m], ls="--", label="e2e (final)")
    ax.set_xlabel("after the stage ending at layer")
    ax.set_ylabel("held-out masked loss (views)")
    ax.set_title("Per-layer gain (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "layer_gain.png"))
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def replace_cfg(cfg, **sections):
    """``cfg`` with fields replaced per section: replace_cfg(cfg, train={"lr": 1e-3})."""
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})
