# SPDX-License-Identifier: MIT
"""Generation from a ``StackWiseLM``: causal sampling with a KV cache, and masked-diffusion sampling.

- ``generate_clm``: left-to-right sampling (greedy, temperature, top-k, nucleus top-p; Holtzman et al. 2020).
  One prefill pass fills a per-layer ``KVCache``; each later step runs only the newest token. Random-feature
  ("kernel") attention has no KV cache, so it recomputes the whole prefix every step.
- ``generate_diffusion``: masked-diffusion sampling by iterative unmasking (LLaDA, Nie et al. 2025): the
  continuation starts as all [MASK]; each step predicts every masked position with bidirectional attention and
  commits a scheduled number of them, the most confident first ("low_confidence" remasking) or at random.
  Optional semi-autoregressive blocks (``block_len``) unmask the continuation block by block, left to right.

Both put the model in eval mode under ``torch.no_grad`` and restore its training mode afterwards. The mask
token (``model.mask_id``) is reserved: neither sampler ever emits it.

Examples::

    >>> ids = generate_clm(model, prompt, 32, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0))
    >>> ids = generate_diffusion(model, prompt, 64, steps=64, block_len=16)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from .blocks import KVCache

logger = logging.getLogger("stackwise")

REMASKING = ("low_confidence", "random")
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


def _check_prompt(model, prompt_ids, *, min_len: int, allow_mask: bool) -> torch.Tensor:
    """Validate prompt_ids [B, T0] and move it to the model's device as int64."""
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dtype not in (torch.int64, torch.int32):
        got = prompt_ids.dtype if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
        raise TypeError(f"prompt_ids must be an int64/int32 tensor [B, T0], got {got}")
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
    V = model.cfg.vocab_size
    if prompt_ids.numel():
        lo, hi = int(prompt_ids.min()), int(prompt_ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(
                f"prompt token ids must be in [0, model.vocab_size={V}), got min {lo}, max {hi}; "
                f"the tokenizer and model.vocab_size disagree"
            )
        if not allow_mask and bool((prompt_ids == model.mask_id).any()):
            raise ValueError(
                f"prompt_ids contain the mask id {model.mask_id}, which generate_diffusion reserves for the "
                f"positions it fills; the prompt is kept as given, so remove the mask tokens (infilling is not supported)"
            )
    return prompt_ids.to(device=_device(model), dtype=torch.long)


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


def _check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the model is on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )


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
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row from logits [B, V] -> [B] (int64). temperature 0 is greedy (argmax)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------ causal (CLM)


def generate_clm(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Sample a causal continuation of prompt_ids.

    Args:
        model: a ``StackWiseLM`` with every layer built.
        prompt_ids: [B, T0] int, T0 >= 1, ids in [0, vocab_size); moved to the model's device.
        max_new_tokens: tokens to add (>= 0); T0 + max_new_tokens must be <= model.cfg.max_seq_len.
        temperature: 0 = greedy (argmax), otherwise logits are divided by it before sampling.
        top_k: keep only the k most likely tokens (0 = off).
        top_p: nucleus sampling; keep the smallest set of tokens with probability mass >= top_p (1 = off).
        generator: ``torch.Generator`` on the model's device; the same seed gives the same tokens.
        use_cache: prefill once into a per-layer ``KVCache`` and then run one token per step. Models with
            ``attention_type="kernel"`` have no KV cache and always recompute the whole prefix each step
            (logged once). ``use_cache=False`` forces recomputation for any model.
        eos_id: once a row emits it, the rest of that row is filled with eos_id; generation stops early
            when every row has finished (the output keeps its full length).

    Returns:
        torch.Tensor: [B, T0 + max_new_tokens] int64, the prompt followed by the generated tokens. The mask
        token (``model.mask_id``) is never generated.

    Raises:
        TypeError / ValueError: bad prompt, lengths, sampling settings or generator, with the fix.
    """
    _check_model(model)
    prompt = _check_prompt(model, prompt_ids, min_len=1, allow_mask=True)
    _check_int("max_new_tokens", max_new_tokens, 0)
    _check_sampling(temperature, top_k, top_p)
    B, T0 = prompt.shape
    _check_length(model, T0, max_new_tokens, "max_new_tokens")
    _check_generator(generator, prompt.device)
    V = model.cfg.vocab_size
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < V):
        raise ValueError(f"eos_id must be None or an int in [0, model.vocab_size={V}), got {eos_id!r}")
    if max_new_tokens == 0:
        return prompt.clone()

    kernel = model.cfg.attention.attention_type == "kernel"
    if use_cache and kernel:
        _log_once("kernel-no-cache", "generate_clm: kernel (random-feature) attention has no KV cache; "
                  "recomputing the whole prefix at every step")
    cached = use_cache and not kernel
    n_layers = model.cfg.n_layers
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=prompt.device)
            out[:, :T0] = prompt
            finished = torch.zeros(B, dtype=torch.bool, device=prompt.device)
            caches = [KVCache() for _ in range(n_layers)] if cached else None
            # prefill: only the last position's logits are needed
            h = model.run_layers(model.embed(prompt), 0, n_layers, "causal", caches=caches, start_pos=0)
            logits = model.head(h[:, -1:])[:, -1]
            for t in range(max_new_tokens):
                pos = T0 + t
                logits = logits.float()
                logits[:, model.mask_id] = float("-inf")
                tok = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                if eos_id is not None:
                    tok = torch.where(finished, torch.full_like(tok, eos_id), tok)
                    finished |= tok == eos_id
                out[:, pos] = tok
                if t == max_new_tokens - 1:
                    break
                if eos_id is not None and bool(finished.all()):
                    out[:, pos + 1 :] = eos_id
                    break
                if cached:
                    h = model.run_layers(model.embed(tok[:, None]), 0, n_layers, "causal", caches=caches, start_pos=pos)
                else:
                    h = model.run_layers(model.embed(out[:, : pos + 1]), 0, n_layers, "causal")
                logits = model.head(h[:, -1:])[:, -1]
    finally:
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------------ masked diffusion


def diffusion_schedule(n_masked: int, steps: int) -> list[int]:
    """Tokens to commit at each of ``steps`` steps so that all ``n_masked`` are committed (linear schedule).

    Each step commits n_masked // steps tokens; the first n_masked % steps steps commit one more (LLaDA's
    ``get_num_transfer_tokens``), so the masked fraction falls linearly and reaches 0 at the last step.
    """
    base, extra = divmod(n_masked, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


def _split_steps(steps: int, n_blocks: int) -> list[int]:
    base, extra = divmod(steps, n_blocks)
    return [base + (1 if b < extra else 0) for b in range(n_blocks)]


def generate_diffusion(
    model,
    prompt_ids: torch.Tensor,
    gen_len: int,
    *,
    steps: int | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    generator: torch.Generator | None = None,
    block_len: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Masked-diffusion sampling by iterative unmasking (LLaDA-style).

    The continuation starts as ``gen_len`` mask tokens after the prompt. At each step the model (bidirectional
    attention) predicts every position; among the still-masked positions of the current block, a scheduled
    number (``diffusion_schedule``) is committed and the rest stay masked. With ``block_len`` the continuation
    is split into blocks of that length (the last may be shorter) unmasked left to right, the ``steps`` shared
    among blocks as evenly as possible (semi-autoregressive sampling).

    Args:
        model: a ``StackWiseLM`` with every layer built (any attention type).
        prompt_ids: [B, T0] int (T0 may be 0), ids in [0, vocab_size) and never the mask id; kept unchanged.
        gen_len: number of tokens to generate (>= 0); T0 + gen_len <= model.cfg.max_seq_len.
        steps: denoising steps (default gen_len, one token per step); at least the number of blocks.
        temperature: 0 commits the argmax; > 0 samples each prediction from softmax(logits / temperature).
        remasking: "low_confidence" commits the positions whose prediction has the highest probability (the
            least confident stay masked); "random" commits uniformly chosen masked positions.
        generator: ``torch.Generator`` on the model's device, for temperature > 0 and "random" remasking.
        block_len: length of a semi-autoregressive block (default gen_len: one block).
        callback: called as ``callback(step, ids)`` after every step with the current ids [B, T0 + gen_len].

    Returns:
        torch.Tensor: [B, T0 + gen_len] int64 with every generated position filled (never the mask id).
    """
    _check_model(model)
    prompt = _check_prompt(model, prompt_ids, min_len=0, allow_mask=False)
    _check_int("gen_len", gen_len, 0)
    B, T0 = prompt.shape
    _check_length(model, T0, gen_len, "gen_len")
    _check_generator(generator, prompt.device)
    _check_sampling(temperature, 0, 1.0)
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {list(REMASKING)}, got {remasking!r}")
    if gen_len == 0:
        return prompt.clone()
    block_len = gen_len if block_len is None else _check_int("block_len", block_len, 1)
    n_blocks = math.ceil(gen_len / block_len)
    steps = gen_len if steps is None else _check_int("steps", steps, 1)
    if steps < n_blocks:
        raise ValueError(
            f"steps ({steps}) must be >= the number of blocks ceil(gen_len / block_len) = {n_blocks}; "
            f"raise steps or block_len"
        )

    mask_id = model.mask_id
    x = torch.cat([prompt, torch.full((B, gen_len), mask_id, dtype=torch.long, device=prompt.device)], dim=1)
    positions = torch.arange(T0 + gen_len, device=x.device)
    was_training = model.training
    model.eval()
    step = 0
    try:
        with torch.no_grad():
            for b, block_steps in enumerate(_split_steps(steps, n_blocks)):
                lo, hi = T0 + b * block_len, min(T0 + (b + 1) * block_len, T0 + gen_len)
                in_block = (positions >= lo) & (positions < hi)
                for k in diffusion_schedule(hi - lo, block_steps):
                    if k > 0:
                        x = _denoise_step(model, x, in_block, k, temperature, remasking, generator)
                    if callback is not None:
                        callback(step, x)
                    step += 1
    finally:
        model.train(was_training)
    if bool((x[:, T0:] == mask_id).any()):  # internal invariant: the schedule commits every position
        raise RuntimeError("generate_diffusion left masked positions; this is a bug, please report it")
    return x


def _denoise_step(model, x, in_block, k, temperature, remasking, generator) -> torch.Tensor:
    """Predict every position of x [B, T] and commit k masked positions per row inside in_block [T]."""
    mask_id = model.mask_id
    logits = model(x, attention_mode="bidirectional").float()  # [B, T, V]
    logits[..., mask_id] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if temperature == 0:
        pred = logits.argmax(-1)
    else:
        sample_probs = torch.softmax(logits / temperature, dim=-1)
        pred = torch.multinomial(sample_probs.flatten(0, 1), 1, generator=generator).view(x.shape)
    if remasking == "low_confidence":
        conf = probs.gather(-1, pred.unsqueeze(-1)).squeeze(-1)
    else:  # "random" (validated by the caller)
        conf = torch.rand(x.shape, generator=generator, device=x.device)
    candidates = (x == mask_id) & in_block
    conf = conf.masked_fill(~candidates, float("-inf"))
    chosen = torch.zeros_like(candidates)
    chosen.scatter_(1, torch.topk(conf, k, dim=1).indices, True)
    return torch.where(chosen & candidates, pred, x)
