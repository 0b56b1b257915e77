# SPDX-License-Identifier: MIT
"""Shared pieces of the samplers: input checks, ragged prompt batches (left padding), token sampling."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("stackwise")

PAD_ID = 0
"""Id written into left-padding positions; they are masked out of attention, so its value never matters."""
_logged_once: set[str] = set()


def _log_once(key: str, msg: str) -> None:
    if key not in _logged_once:
        _logged_once.add(key)
        logger.info(msg)


# ----------------------------------------------------------------------------------------------- checks


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_model(model) -> None:
    for attr in ("cfg", "embed", "run_layers", "head", "mask_id"):
        if not hasattr(model, attr):
            raise TypeError(f"model must be a StackWiseLM (it has no {attr!r}), got {type(model).__name__}")
    built = getattr(model, "built_layers", None)
    n = model.cfg.n_layers
    if built is not None and list(built) != list(range(n)):
        raise ValueError(
            f"generation needs all {n} layers, but this model was built with layers {list(built)}; "
            f"build StackWiseLM(cfg) without `layers` (or fuse the layer-wise checkpoints first)"
        )


def _check_ids(model, ids: torch.Tensor, *, name: str, allow_mask: bool) -> None:
    V = model.cfg.vocab_size
    if not ids.numel():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= V:
        raise ValueError(
            f"{name}: token ids must be in [0, model.vocab_size={V}), got min {lo}, max {hi}; "
            f"the tokenizer and model.vocab_size disagree"
        )
    if not allow_mask and bool((ids == model.mask_id).any()):
        raise ValueError(
            f"{name}: contains the mask id {model.mask_id}, which generate_diffusion reserves for the "
            f"positions it fills; the prompt is kept as given, so remove the mask tokens (infilling is not supported)"
        )


class PromptBatch:
    """Prompts as one left-padded batch: ids [B, T0] (T0 = the longest prompt), ``pad`` [B] leading pad
    counts (None when no row is padded), ``as_list`` when the caller passed a list of prompts."""

    def __init__(self, ids: torch.Tensor, lengths: list[int] | None):
        self.ids, self.as_list = ids, lengths is not None
        T0 = ids.shape[1]
        self.pad = None
        if lengths is not None and any(n != T0 for n in lengths):
            self.pad = torch.tensor([T0 - n for n in lengths], dtype=torch.long, device=ids.device)

    def key_mask(self, S: int) -> torch.Tensor | None:
        """[B, S] bool, False at the padding positions (None when nothing is padded)."""
        if self.pad is None:
            return None
        return torch.arange(S, device=self.ids.device)[None, :] >= self.pad[:, None]

    def positions(self, lo: int, hi: int):
        """RoPE positions of columns lo .. hi-1: the int lo when unpadded, else [B, hi - lo] per row (padding 0)."""
        if self.pad is None:
            return lo
        cols = torch.arange(lo, hi, device=self.ids.device)
        return (cols[None, :] - self.pad[:, None]).clamp(min=0)

    def row(self, b: int) -> torch.Tensor:
        """Prompt b without its padding, [1, len_b]."""
        start = 0 if self.pad is None else int(self.pad[b])
        return self.ids[b : b + 1, start:]

    def unpad(self, out: torch.Tensor):
        """out [B, T0 + n] -> the same tensor, or (list input) a list of 1-D rows without their padding."""
        if not self.as_list:
            return out
        return [out[b, (0 if self.pad is None else int(self.pad[b])) :] for b in range(out.shape[0])]


def _check_prompt(model, prompt_ids, *, min_len: int, allow_mask: bool) -> PromptBatch:
    """Validate prompt_ids ([B, T0] tensor, or a list of 1-D prompts of any lengths) and left-pad them."""
    device = _device(model)
    if isinstance(prompt_ids, (list, tuple)):
        return _check_prompt_list(model, prompt_ids, min_len=min_len, allow_mask=allow_mask, device=device)
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dtype not in (torch.int64, torch.int32):
        got = prompt_ids.dtype if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
        raise TypeError(f"prompt_ids must be an int64/int32 tensor [B, T0] or a list of 1-D prompts, got {got}")
    if prompt_ids.dim() != 2:
        raise ValueError(
            f"prompt_ids must be 2-D [B, T0], got shape {tuple(prompt_ids.shape)}; "
            f"for one sequence use prompt_ids.unsqueeze(0)"
        )
    B, T0 = prompt_ids.shape
    if B < 1 or T0 < min_len:
        raise ValueError(
            f"prompt_ids must have at least 1 row and {min_len} token(s), got shape {(B, T0)}; "
            f"causal generation conditions on at least one token (e.g. a BOS id)"
        )
    _check_ids(model, prompt_ids, name="prompt_ids", allow_mask=allow_mask)
    return PromptBatch(prompt_ids.to(device=device, dtype=torch.long), None)


def _check_prompt_list(model, prompts, *, min_len: int, allow_mask: bool, device) -> PromptBatch:
    if not prompts:
        raise ValueError("prompt_ids is an empty list; pass at least one prompt")
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            if p.dtype not in (torch.int64, torch.int32) or p.dim() != 1:
                raise TypeError(f"prompt_ids[{i}] must be a 1-D int64/int32 tensor or a list of ints, got "
                                f"{p.dtype} of shape {tuple(p.shape)}")
        elif not isinstance(p, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) for t in p):
            raise TypeError(f"prompt_ids[{i}] must be a 1-D int tensor or a list of ints, got {type(p).__name__}")
        row = torch.as_tensor(p, dtype=torch.long).reshape(-1)
        if row.numel() < min_len:
            raise ValueError(f"prompt_ids[{i}] must have at least {min_len} token(s), got {row.numel()}; "
                             f"causal generation conditions on at least one token (e.g. a BOS id)")
        _check_ids(model, row, name=f"prompt_ids[{i}]", allow_mask=allow_mask)
        rows.append(row)
    T0 = max(r.numel() for r in rows)
    ids = torch.full((len(rows), T0), PAD_ID, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T0 - r.numel() :] = r
    return PromptBatch(ids.to(device), [r.numel() for r in rows])


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def _check_length(model, T0: int, n_new: int, name: str) -> None:
    L = model.cfg.max_seq_len
    if T0 + n_new > L:
        raise ValueError(
            f"prompt length ({T0}) + {name} ({n_new}) = {T0 + n_new} exceeds model.max_seq_len ({L}); "
            f"shorten the prompt, lower {name} to at most {max(L - T0, 0)}, or use a model with a larger max_seq_len"
        )


def _check_one_generator(generator, device: torch.device, name: str) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator, a list of them (one per row) or None, "
                        f"got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"{name} is on {generator.device} but the model is on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )


def _check_generator(generator, device: torch.device, B: int):
    """None, one torch.Generator (rows share one stream), or a list of B generators (row b draws from
    generator[b] alone, so its tokens do not depend on the other rows)."""
    if generator is None:
        return None
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"generator is a list of {len(generator)} generators but there are {B} prompts; "
                             f"pass one torch.Generator per prompt (or a single one)")
        for i, g in enumerate(generator):
            _check_one_generator(g, device, f"generator[{i}]")
        return list(generator)
    _check_one_generator(generator, device, "generator")
    return generator


def _row_generator(generator, b: int):
    return generator[b] if isinstance(generator, list) else generator


def _check_sampling(temperature, top_k, top_p) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    _check_int("top_k", top_k, 0)
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filtering), got {top_p!r}")


# --------------------------------------------------------------------------------------------- sampling


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering of logits [..., V]: removed entries become -inf.

    top_k=0 and top_p=1 keep everything. Nucleus keeps the smallest set of the most likely tokens whose
    probability sums to at least top_p (always at least the most likely token).
    """
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Draw one token per row from logits [B, V] -> [B] (int64). temperature 0 is greedy (argmax).

    ``generator`` may be a list of B generators: row b then draws from generator[b] only.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    if isinstance(generator, list):
        return torch.cat([sample_next(logits[b : b + 1], temperature=temperature, top_k=top_k, top_p=top_p,
                                      generator=g) for b, g in enumerate(generator)])
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
