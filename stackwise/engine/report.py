# SPDX-License-Identifier: MIT
"""End-of-run reporting: the per-layer summary table and PNG plots read back from metrics.jsonl."""

from __future__ import annotations

import json
import os

from .log import logger


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    out, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            # a damaged line may still parse (to a number, a list): keep only records
            if isinstance(rec, dict):
                out.append(rec)
            else:
                bad += 1
    if bad:
        # a crash mid-append or a damaged file: the report skips those lines, training never reads them
        logger.warning("%s: skipped %d unreadable line(s)", path, bad)
    return out


def stage_table(run_dir: str) -> str:
    """Per-stage held-out masked loss / accuracy and the gain each stage adds (latest record per stage)."""
    rows = ["| stage | layers | train loss | val masked loss | val acc | gain vs previous | seconds |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for k, r, gain in _stage_records(run_dir):
        rows.append(f"| {k} | {','.join(map(str, r['layers']))} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | "
                    f"{r['val_acc']:.3f} | {gain} | {r['seconds']:.1f} |")
    return "\n".join(rows)


def _stage_records(run_dir: str):
    """(stage, its latest metrics record, the gain over the previous stage as text) in stage order."""
    stages = {r["stage"]: r for r in read_metrics(run_dir) if r.get("kind") == "stage"}
    prev = None
    for k in sorted(stages):
        r = stages[k]
        yield k, r, "" if prev is None else f"{prev - r['val_loss']:+.4f}"
        prev = r["val_loss"]


def plot_run(run_dir: str) -> list[str]:
    """Write loss_per_stage.png and layer_gain.png into the run directory; returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install stackwise[plot])")
        return []
    recs = read_metrics(run_dir)
    out = []
    fig, ax = plt.subplots(figsize=(7, 4))
    stages = sorted({r["stage"] for r in recs if r.get("kind") == "train"})
    offset = 0
    for s in stages:
        pts = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train" and r["stage"] == s]
        last = {}
        for step, loss in pts:  # a rerun overwrites earlier records of the same step
            last[step] = loss
        xs = sorted(last)
        ax.plot([offset + x for x in xs], [last[x] for x in xs], label=f"stage {s}")
        offset += max(xs) if xs else 0
    ft = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "finetune"]
    if ft:
        ax.plot([offset + s for s, _ in ft], [v for _, v in ft], label="fine-tune (its own objective, e.g. CLM next-token)", color="black")
    ax.set_xlabel("optimizer step (stages back to back)")
    ax.set_ylabel("training loss (supervised tokens)")
    ax.legend(fontsize=7)
    ax.set_title("StackWise: loss per stage")
    path = os.path.join(run_dir, "loss_per_stage.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)
    st = {}
    for r in recs:
        if r.get("kind") == "stage":
            st[r["stage"]] = r
    if st:
        fig, ax = plt.subplots(figsize=(6, 4))
        ks = sorted(st)
        ax.plot(ks, [st[k]["val_loss"] for k in ks], marker="o", label="held-out masked loss")
        ax2 = ax.twinx()
        ax2.plot(ks, [st[k]["val_acc"] for k in ks], marker="s", color="tab:orange", label="held-out accuracy")
        ax.set_xlabel("after stage (first layer)")
        ax.set_ylabel("masked-token loss")
        ax2.set_ylabel("masked-token accuracy")
        ax.set_title("What each layer adds")
        path = os.path.join(run_dir, "layer_gain.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def demo_table(run_dir: str, ref: dict, *, clm_loss: float | None = None, elbo: float | None = None,
               diffusion_ft_elbo: float | None = None) -> str:
    """The demo's table: the unigram baseline, each stage's held-out masked loss, the fused model's diffusion ELBO,
    the diffusion fine-tune's ELBO and the CLM fine-tune, in nats per token and in bits per byte (``ref`` from
    :func:`stackwise.engine.baselines.heldout_reference`)."""
    from .baselines import bits_per_byte

    bpt, uni = ref["bytes_per_token"], ref["unigram_loss"]

    def cells(loss: float) -> str:
        return f"{loss:.4f} | {bits_per_byte(loss, bpt):.3f} | {loss - uni:+.3f}"

    rows = ["| model | layers | train loss | held-out loss (nats/token) | bits/byte | vs unigram | acc | gain | s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| unigram of the training split (no context) | | | {cells(uni)} | | | |"]
    for k, r, gain in _stage_records(run_dir):
        rows.append(f"| stage {k}: masked tokens | {','.join(map(str, r['layers']))} | {r['train_loss']:.4f} | "
                    f"{cells(r['val_loss'])} | {r['val_acc']:.3f} | {gain} | {r['seconds']:.1f} |")
    if elbo is not None:
        rows.append(f"| fused: diffusion ELBO (bound on -log p) | all | | {cells(elbo)} | | | |")
    if diffusion_ft_elbo is not None:
        rows.append(f"| diffusion fine-tune: ELBO | all | | {cells(diffusion_ft_elbo)} | | | |")
    if clm_loss is not None:
        rows.append(f"| CLM fine-tune: next token | all | | {cells(clm_loss)} | | | |")
    return "\n".join(rows)
