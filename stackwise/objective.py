# SPDX-License-Identifier: MIT
"""Masking policies and losses: diffusion (masked-diffusion LM), mlm (BERT) and clm (next token).

- ``diffusion``: per sequence a rate t ~ U[mask_fraction_min, mask_fraction_max]; exactly round(t T)
  positions (clamped so the realised rate stays in [min, max]) are replaced by the mask token. Loss on
  masked positions only, optionally weighted by 1/t, the weighting of the masked-diffusion ELBO
  (Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models"; Nie et al. 2025, LLaDA).
- ``mlm``: round(rate T) positions supervised, of which 80% become the mask token, 10% a random token,
  10% stay (Devlin et al. 2019).
- ``clm``: the target at t is the token at t + 1; the last position is unsupervised.

Masks replace token ids, never embeddings. All randomness comes from the ``generator`` argument.

``recon_weight`` (issue 13, InfoPro-style local term; diffusion only): the loss also scores the prediction of the
*unmasked* input tokens, each counting ``recon_weight`` times a masked token (same denominator), so a stage's
features are pushed to keep the visible tokens' identity as well as to predict the masked ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

POLICIES = ("diffusion", "mlm", "clm")


def _random_subset(B: int, T: int, counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Bool [B, T] with exactly counts[b] True entries per row, positions uniform without replacement."""
    noise = torch.rand(B, T, generator=generator, device=generator.device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < counts.to(noise.device).unsqueeze(1)


def diffusion_mask(
    input_ids: torch.Tensor,
    generator: torch.Generator,
    *,
    mask_id: int,
    mask_fraction_min: float = 0.15,
    mask_fraction_max: float = 0.90,
    rate: torch.Tensor | float | None = None,
    suffix_share: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Diffusion masking. Returns (masked_ids, targets, loss_mask, t) with t [B] the drawn rates.

    ``rate`` fixes t (a float or [B]) instead of drawing it, for evaluation at chosen mask rates.
    ``suffix_share``: each sequence, with this probability, masks its last round(t T) positions instead of
    uniformly chosen ones (drawn after everything else, so 0 leaves the generator's stream and the masks unchanged).
    """
    B, T = input_ids.shape
    gdev = generator.device
    if rate is None:
        t = mask_fraction_min + (mask_fraction_max - mask_fraction_min) * torch.rand(B, generator=generator, device=gdev)
        lo, hi = math.ceil(mask_fraction_min * T - 1e-9), math.floor(mask_fraction_max * T + 1e-9)
    else:
        t = torch.as_tensor(rate, dtype=torch.float32, device=gdev).expand(B).clone()
        lo, hi = 1, T
    counts = torch.round(t * T).long().clamp(max(lo, 1), max(min(hi, T), 1))
    loss_mask = _random_subset(B, T, counts, generator)
    if suffix_share > 0:
        suffix = torch.rand(B, generator=generator, device=gdev) < suffix_share
        tail = torch.arange(T, device=gdev).unsqueeze(0) >= (T - counts.to(gdev)).unsqueeze(1)
        loss_mask = torch.where(suffix.unsqueeze(1), tail, loss_mask)
    loss_mask = loss_mask.to(input_ids.device)
    masked = input_ids.masked_fill(loss_mask, mask_id)
    return masked, input_ids, loss_mask, t.to(input_ids.device)


def mask_tokens(
    input_ids: torch.Tensor,
    policy: str,
    generator: torch.Generator,
    *,
    mask_id: int,
    vocab_size: int,
    mask_fraction_min: float = 0.15,
    mask_fraction_max: float = 0.90,
    mlm_rate: float = 0.15,
    suffix_share: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply ``policy`` to input_ids [B, T]; returns (masked_ids [B, T], targets [B, T], loss_mask [B, T] bool).

    ``suffix_share``: diffusion only, as :func:`diffusion_mask`.

    Raises:
        ValueError: unknown policy.
    """
    if policy == "diffusion":
        m, tgt, lm, _ = diffusion_mask(
            input_ids, generator, mask_id=mask_id, mask_fraction_min=mask_fraction_min,
            mask_fraction_max=mask_fraction_max, suffix_share=suffix_share,
        )
        return m, tgt, lm
    if policy == "mlm":
        B, T = input_ids.shape
        counts = torch.full((B,), max(1, round(mlm_rate * T)), dtype=torch.long)
        chosen = _random_subset(B, T, counts, generator).to(input_ids.device)
        u = torch.rand(B, T, generator=generator, device=generator.device).to(input_ids.device)
        rand_ids = torch.randint(0, vocab_size - 1, (B, T), generator=generator, device=generator.device)
        rand_ids = rand_ids.to(input_ids.device)
        rand_ids = rand_ids + (rand_ids >= mask_id).long()  # never draw the mask token itself
        masked = torch.where(chosen & (u < 0.8), torch.full_like(input_ids, mask_id), input_ids)
        masked = torch.where(chosen & (u >= 0.8) & (u < 0.9), rand_ids, masked)
        return masked, input_ids, chosen
    if policy == "clm":
        targets = torch.roll(input_ids, shifts=-1, dims=1)
        loss_mask = torch.ones_like(input_ids, dtype=torch.bool)
        loss_mask[:, -1] = False
        return input_ids, targets, loss_mask
    raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")


def sequence_weights(loss_mask: torch.Tensor, weighting: str) -> torch.Tensor | None:
    """Per-sequence loss weights [B] of ``objective.loss_weighting``, from the *realised* mask rate.

    ``none`` gives None (plain masked mean). ``inv_t`` gives T / k_b, one over the realised rate k_b / T of
    sequence b (the drawn rate t differs from k_b / T by rounding and clamping), the ELBO weighting.
    """
    if weighting == "none":
        return None
    if weighting == "inv_t":
        T = loss_mask.shape[1]
        return T / loss_mask.sum(1).clamp_min(1).to(torch.float32)
    raise ValueError(f"objective.loss_weighting must be one of ['none', 'inv_t'], got {weighting!r}")


def loss_normalizer(loss_mask: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """What :func:`masked_loss` divides by: supervised tokens (no weights) or B * T (per-sequence weights)."""
    if weights is None:
        return loss_mask.sum().clamp_min(1).to(torch.float32)
    return torch.tensor(float(loss_mask.numel()), device=loss_mask.device)


def masked_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    denom: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Cross-entropy over supervised positions.

    Args:
        logits (torch.Tensor): [B, T, V].
        targets (torch.Tensor): [B, T] int.
        loss_mask (torch.Tensor): [B, T] bool; positions with False contribute nothing.
        weights (torch.Tensor | None): [B] per-sequence weights (:func:`sequence_weights`: T / k for inv_t).
        denom: what the weighted sum is divided by; None means :func:`loss_normalizer` (the data-parallel
            trainer passes the global value divided by the world size).

    Returns:
        torch.Tensor: scalar. Unweighted: the mean over supervised tokens. Weighted: the sum over supervised
        tokens of weight * CE divided by B * T, so with inv_t weights it is the masked-diffusion ELBO per token
        (MDLM / LLaDA), whatever rates the batch drew.
    """
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    lm = loss_mask.to(ce.dtype)
    if weights is not None:
        lm = lm * weights.to(ce.dtype).unsqueeze(1)
    if denom is None:
        denom = loss_normalizer(loss_mask, weights)
    return (ce * lm).sum() / denom


def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Fraction of supervised positions where argmax(logits) equals the target."""
    hit = (logits.argmax(-1) == targets) & loss_mask
    return hit.sum().float() / loss_mask.sum().clamp_min(1)


@dataclass(frozen=True)
class Objective:
    """One training objective: the masking policy, the per-sequence weights, the loss and the attention mode.

    Built once from the config (:meth:`from_config`) and used by view building, stages, end-to-end training,
    fine-tuning and evaluation, so every kind of training masks, weights and normalises the same way.
    """

    policy: str
    mask_id: int
    vocab_size: int
    mask_fraction_min: float = 0.15
    mask_fraction_max: float = 0.90
    mlm_rate: float = 0.15
    loss_weighting: str = "none"
    attention_mode: str = "bidirectional"
    recon_weight: float = 0.0
    suffix_share: float = 0.0
    """``objective.suffix_mask_share`` (diffusion): the share of views masked on a suffix, not uniformly."""
    band: tuple[float, float] | None = None
    """Issue-13 ``objective.stage_mask_schedule``: only sequences whose realised mask rate lies in [lo, hi] are
    supervised (views are drawn once and cached, so a stage selects views by rate); None supervises all."""

    @classmethod
    def from_config(cls, objective_cfg, model_cfg, policy: str = "diffusion") -> "Objective":
        """``policy`` diffusion (layer-wise training), or a fine-tuning mode; clm always attends causally."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
        mode = "causal" if policy == "clm" else model_cfg.attention.attention_mode
        return cls(policy=policy, mask_id=model_cfg.mask_id, vocab_size=model_cfg.vocab_size,
                   mask_fraction_min=objective_cfg.mask_fraction_min, mask_fraction_max=objective_cfg.mask_fraction_max,
                   mlm_rate=objective_cfg.mlm_rate,
                   loss_weighting=objective_cfg.loss_weighting if policy == "diffusion" else "none",
                   attention_mode=mode,
                   recon_weight=getattr(objective_cfg, "recon_weight", 0.0) if policy == "diffusion" else 0.0,
                   suffix_share=getattr(objective_cfg, "suffix_mask_share", 0.0) if policy == "diffusion" else 0.0)

    def mask(self, input_ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A batch of views: ``x`` (masked ids), ``targets``, ``loss_mask`` and the realised ``rate`` [B]."""
        masked, targets, loss_mask = mask_tokens(
            input_ids, self.policy, generator, mask_id=self.mask_id, vocab_size=self.vocab_size,
            mask_fraction_min=self.mask_fraction_min, mask_fraction_max=self.mask_fraction_max,
            mlm_rate=self.mlm_rate, suffix_share=self.suffix_share)
        rate = loss_mask.float().mean(1)
        return {"x": masked, "targets": targets, "loss_mask": loss_mask, "rate": rate}

    def weights(self, loss_mask: torch.Tensor) -> torch.Tensor | None:
        return sequence_weights(loss_mask, self.loss_weighting)

    def in_band(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """Bool [B] of the sequences this objective supervises: all, or those whose realised rate is in ``band``."""
        if self.band is None:
            return torch.ones(loss_mask.shape[0], dtype=torch.bool, device=loss_mask.device)
        rate = loss_mask.float().mean(1)
        return (rate >= self.band[0] - 1e-6) & (rate <= self.band[1] + 1e-6)

    def normalizer(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the loss denominator (summed over ranks by the data-parallel loop)."""
        weights = self.weights(loss_mask)
        if self.band is not None:
            loss_mask = loss_mask & self.in_band(loss_mask).unsqueeze(1)
        return loss_normalizer(loss_mask, weights)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
             denom: torch.Tensor | float | None = None) -> torch.Tensor:
        weights = self.weights(loss_mask)  # from the realised rate of every sequence
        if not self.recon_weight and self.band is None:
            return masked_loss(logits, targets, loss_mask, weights, denom)
        if denom is None:
            denom = self.normalizer(loss_mask)
        # recon_weight: unmasked positions (targets = the visible input tokens) count recon_weight each;
        # band: sequences outside it count nothing
        scored = loss_mask.float() + self.recon_weight * (~loss_mask).float()
        scored = scored * self.in_band(loss_mask).float().unsqueeze(1)
        return masked_loss(logits, targets, scored, weights, denom)

    def head_loss(self, h: torch.Tensor, head, targets: torch.Tensor, loss_mask: torch.Tensor,
                  denom: torch.Tensor | float | None = None) -> torch.Tensor:
        """``loss(head(h), ...)`` with the head run only at the scored positions.

        The diffusion and MLM losses score only masked positions (a diffusion view masks 15-90% of them), so the
        output projection, the softmax and their [B, T, V] float32 buffers are spent on those rows alone: the same
        loss and gradients, a smaller head bill (at 128k ids the logits of all positions are the largest
        activation of a stage). CLM scores every position and the reconstruction term every unmasked one: they
        take the full path. ``head`` maps h [..., C] to logits [..., V] position by position.
        """
        if self.policy == "clm" or self.recon_weight:
            return self.loss(head(h), targets, loss_mask, denom)
        if denom is None:
            denom = self.normalizer(loss_mask)
        scored = loss_mask if self.band is None else loss_mask & self.in_band(loss_mask).unsqueeze(1)
        weights = self.weights(loss_mask)
        # each scored token's weight (all ones unweighted: the selected mask itself), no [B, T] buffer built
        per_token = scored[scored] if weights is None else weights.unsqueeze(1).expand_as(scored)[scored]
        # the scored positions as one row: masked_loss stays the one place the training loss is computed
        return masked_loss(head(h[scored]).unsqueeze(0), targets[scored].unsqueeze(0), per_token.unsqueeze(0),
                           None, denom)
