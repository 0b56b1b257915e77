# SPDX-License-Identifier: MIT
"""PNG plots for the planner and the layer-wise benchmark (matplotlib, Agg backend; skipped without it)."""

from __future__ import annotations

import os


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install stackwise[plot])")
        return None
    return plt


def memory_by_part(plans: dict, path: str, unit: float = 1e9, unit_name: str = "GB") -> str | None:
    """Horizontal bars per memory part for each plan (log scale: a stage and end-to-end differ ~40x)."""
    plt = _plt()
    if plt is None:
        return None
    names = list(plans)
    parts = [p for p in next(iter(plans.values())).parts]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(parts) + 1.5))
    h = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [plans[name].parts.get(p, 0) / unit for p in parts]
        ax.barh([j + i * h for j in range(len(parts))], vals, height=h, label=f"{name} (peak "
                f"{plans[name].total / unit:,.1f} {unit_name})")
    ax.set_yticks([j + h * (len(names) - 1) / 2 for j in range(len(parts))], parts)
    ax.set_xscale("log")
    # parts that are zero in a plan (e.g. no ZeRO gather buffer on one device) stay off the chart
    ax.set_xlim(left=1e-3)
    ax.set_xlabel(f"{unit_name} per device (log scale)")
    ax.legend(fontsize=8)
    ax.set_title("Planned memory by part")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def planned_vs_measured(results: dict, path: str) -> str | None:
    """Planned vs measured peak memory per benchmark case (GiB)."""
    plt = _plt()
    if plt is None:
        return None
    cases = [c for c, r in results.items() if "planned" in r]
    if not cases:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(cases))
    ax.bar([x - 0.2 for x in xs], [results[c]["planned"] / 2**30 for c in cases], 0.4, label="planned")
    ax.bar([x + 0.2 for x in xs], [results[c]["measured"] / 2**30 for c in cases], 0.4, label="measured")
    for x, c in zip(xs, cases):
        ax.annotate(f"{100 * results[c]['error']:+.1f}%", (x, results[c]["measured"] / 2**30), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(list(xs), cases)
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title("Planner vs measurement")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_vs_T(rows: list[dict], path: str) -> str | None:
    """Stage tokens/s against sequence length."""
    plt = _plt()
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["T"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("stage training tokens/s")
    ax.set_title("Stage throughput vs T")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
