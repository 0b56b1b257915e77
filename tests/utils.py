# SPDX-License-Identifier: MIT
"""Shared test helpers: tolerance checks that say by how much a result missed.

- :func:`assert_close`: fla's relative RMSE ratio ``rmse(out - ref) / rms(ref) <= ratio``.
- :func:`assert_within_noise`: flash-attn's low-precision rule ``max|out - ref| <= factor * max|noisy - ref| + atol``,
  where ``noisy`` is the reference computed in the low precision (``upcast=False``).

Both raise ``AssertionError`` whose message names the tensor, the max abs diff, the ratio and the first mismatches.
"""

from __future__ import annotations

import torch


def get_err_ratio(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Relative RMSE of ``out`` against ``ref`` (both upcast to float64)."""
    ref, out = ref.detach().double(), out.detach().double()
    err = (out - ref).square().mean().sqrt()
    base = ref.square().mean().sqrt()
    return (err / base.clamp_min(1e-30)).item()


def _describe(name: str, ref: torch.Tensor, out: torch.Tensor, n_show: int = 3) -> str:
    ref, out = ref.detach().double(), out.detach().double()
    diff = (out - ref).abs()
    n_nan = int(torch.isnan(out).sum())
    msg = f"{name}: shape {tuple(out.shape)}, max abs diff {diff.max().item():.3e}, ratio {get_err_ratio(ref, out):.3e}"
    if n_nan:
        msg += f", {n_nan} NaN in the output"
    worst = diff.flatten().nan_to_num(float("inf")).topk(min(n_show, diff.numel())).indices
    shown = [
        f"{tuple(int(i) for i in torch.unravel_index(j, out.shape))}: ref {ref.flatten()[j].item():.6g} "
        f"out {out.flatten()[j].item():.6g}"
        for j in worst
    ]
    return msg + "; worst " + ", ".join(shown)


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float, atol: float = 0.0) -> None:
    """fla-style check: pass when ``max|out - ref| <= atol`` or the relative RMSE is ``<= ratio``.

    Args:
        name: what is compared (``"dq"``), printed on failure.
        ref (torch.Tensor): the reference, any shape.
        out (torch.Tensor): the result, same shape.
        ratio: allowed relative RMSE.
        atol: absolute difference below which any ratio passes (for tensors that are nearly zero).
    """
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    diff = (out.detach().double() - ref.detach().double()).abs().max().item()
    if not torch.isnan(out).any() and (diff <= atol or get_err_ratio(ref, out) <= ratio):
        return
    raise AssertionError(_describe(name, ref, out) + f" (allowed ratio {ratio:g}, atol {atol:g})")


def assert_within_noise(
    name: str, ref: torch.Tensor, out: torch.Tensor, noisy: torch.Tensor, factor: float, atol: float = 1e-5
) -> None:
    """flash-attn rule: ``max|out - ref| <= factor * max|noisy - ref| + atol``.

    Args:
        name: what is compared, printed on failure.
        ref (torch.Tensor): the accurate reference (float64 or upcast fp32).
        out (torch.Tensor): the result under test.
        noisy (torch.Tensor): the reference computed in the input precision (the noise yardstick).
        factor: 2 for outputs, 3 for gradients (STYLE.md section 5).
        atol: absolute slack.
    """
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    ref64 = ref.detach().double()
    noise = (noisy.detach().double() - ref64).abs().max().item()
    diff = (out.detach().double() - ref64).abs().max().item()
    if diff <= factor * noise + atol:
        return
    raise AssertionError(_describe(name, ref, out) + f" (allowed {factor:g} x noise {noise:.3e} + {atol:g})")
