# SPDX-License-Identifier: MIT
"""Generation from a ``StackWiseLM``: causal sampling with a KV cache, and masked-diffusion sampling.

- ``generate_clm``: left-to-right sampling (greedy, temperature, top-k, nucleus top-p; Holtzman et al. 2020).
  One prefill pass fills a per-layer cache (``kv_cache.make_caches``); each later step runs only the newest
  token. MLA caches its compressed KV latent and shared RoPE key and decodes in DeepSeek-V2's absorbed form.
  Random-feature ("kernel") attention has no KV cache, so it recomputes the whole prefix every step.
- ``generate_diffusion``: masked-diffusion sampling by iterative unmasking (LLaDA, Nie et al. 2025): the
  continuation starts as all [MASK]; each step predicts every masked position with bidirectional attention and
  commits a scheduled number of them, the most confident first ("low_confidence" remasking) or at random.
  Optional semi-autoregressive blocks (``block_len``) unmask the continuation block by block, left to right.

Both take a [B, T0] tensor or a list of prompts of different lengths (left-padded, padding keys masked,
per-row RoPE positions), and one generator or one per row. Both put the model in eval mode under
``torch.no_grad`` and restore its training mode afterwards. The mask token (``model.mask_id``) is reserved:
neither sampler ever emits it.

Examples::

    >>> ids = generate_clm(model, prompt, 32, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0))
    >>> rows = generate_clm(model, [[5, 6, 7], [9]], 8, generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
    >>> ids = generate_diffusion(model, prompt, 64, steps=64, block_len=16)
"""

from ._common import PAD_ID, _logged_once, filter_logits, sample_next
from .clm import generate_clm
from .diffusion import REMASKING, diffusion_schedule, generate_diffusion
from .kv_cache import MLA_CACHES, cache_bytes, make_caches

__all__ = [
    "MLA_CACHES",
    "PAD_ID",
    "REMASKING",
    "cache_bytes",
    "diffusion_schedule",
    "filter_logits",
    "generate_clm",
    "generate_diffusion",
    "make_caches",
    "sample_next",
]
