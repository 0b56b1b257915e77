# SPDX-License-Identifier: MIT
"""Random-feature ("random kitchen sinks") attention in pure PyTorch: the spec and the linear torch path.

Attention weights are replaced by an inner product of feature maps, a(q, k) = phi(q) . phi(k), so
``o_i = sum_j a(q_i, k_j) v_j / sum_j a(q_i, k_j)`` (j <= i when causal) costs O(T M D) instead of O(T^2 D).

Feature maps, with x' = x * sqrt(scale) (so q'.k' = scale * q.k) and W [D, M] from :func:`draw_features`:
- ``softmax``: phi(x) = exp(x'W - |x'|^2 / 2) / sqrt(M), positive random features (Choromanski et al. 2021,
  "Rethinking Attention with Performers", FAVOR+) with E[phi(q).phi(k)] = exp(q'.k') for Gaussian W, so the
  result estimates softmax attention. Stabilised: per query the max over features is subtracted; for keys,
  bidirectional subtracts the max over all keys and features of a (batch, head), causal subtracts for query i
  the running max m_i = max_{j <= i} r_j of the per-key maxima r_j (see :func:`key_features_causal`), so no
  future key can push past keys' features to zero. All factors cancel exactly in the ratio.
- ``trig``: random Fourier features (Rahimi & Recht 2007) on unit-normalised inputs, as in RFA (Peng et al.
  2021): x^ = tau * s * x / |x| with s = sqrt(scale) * D^(1/4) (s = 1 at the default scale) and a temperature
  tau (default 1; per kv head, learnable in ``FeatureAttention``), phi(x) = [cos(x^W), sin(x^W)] / sqrt(M). For
  Gaussian W this estimates exp(-|q^-k^|^2 / 2) = exp(tau^2 s^2 (cos(q, k) - 1)), softmax over cosine
  similarity at temperature tau^2 s^2 (at tau = 1 two keys' weights differ by at most e^2 = 7.4); for "laplacian" W (Cauchy entries scaled by 1/sqrt(D))
  it estimates exp(-|q^-k^|_1 / sqrt(D)). Without the normalisation the kernel values of raw q, k fall far
  below the features' noise. Weights can still be negative for few features; the normaliser is clamped.

``feature_attention_ref`` materialises the T x T weight matrix (readable spec, tests only);
``feature_attention_chunked`` is the linear-time torch path (one pass bidirectional, chunked prefix sums
causal) that runs when Triton does not.
"""

from __future__ import annotations

import math

import torch

FAMILIES = ("gaussian", "orthogonal", "laplacian")
# sequences at least this long run the linear torch path one (batch, kv head) group at a time
GROUP_MIN_T = 1024
FEATURE_MAPS = ("softmax", "trig")


def draw_features(
    head_dim: int,
    n_features: int,
    *,
    family: str = "gaussian",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw the random projection W [head_dim, n_features], bit-identical for the same arguments.

    Args:
        head_dim: D, the query/key head dimension.
        n_features: M, the number of random features.
        family: "gaussian" (i.i.d. N(0, 1)), "orthogonal" (blocks of D orthonormal directions with
            chi(D)-distributed norms, lower-variance estimates), or "laplacian" (i.i.d. standard Cauchy / sqrt(D),
            whose Fourier features estimate the Laplacian kernel; for feature_map="trig" only).
        seed: generator seed; drawn on CPU in float64 so every device and backend gets the same W.

    Returns:
        torch.Tensor: [head_dim, n_features] in ``dtype`` on ``device``.
    """
    if head_dim < 1 or n_features < 1:
        raise ValueError(f"head_dim and n_features must be >= 1, got {head_dim}, {n_features}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    if family == "gaussian":
        w = torch.randn(head_dim, n_features, generator=g, dtype=torch.float64)
    elif family == "laplacian":
        u = torch.rand(head_dim, n_features, generator=g, dtype=torch.float64)
        # standard Cauchy, bandwidth sqrt(D) so the Laplacian kernel of unit vectors is O(1)
        w = torch.tan(math.pi * (u - 0.5)) / math.sqrt(head_dim)
    else:
        blocks = []
        for _ in range(math.ceil(n_features / head_dim)):
            qmat, r = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=g, dtype=torch.float64))
            # sign fix makes Q Haar-distributed
            qmat = qmat * torch.sign(torch.diagonal(r)).unsqueeze(0)
            norms = torch.randn(head_dim, head_dim, generator=g, dtype=torch.float64).norm(dim=0)
            blocks.append(qmat * norms.unsqueeze(0))
        w = torch.cat(blocks, dim=1)[:, :n_features]
    return w.to(dtype=dtype, device=device).contiguous()


def head_temperature(temperature: torch.Tensor | float, n_heads: int) -> torch.Tensor:
    """tau as a tensor broadcasting over x [B, n_heads, T, D]: a scalar, or [Hkv] repeated to the heads of x.

    Query head h uses kv head h // (H / Hkv)'s tau, so q and k of a group share one temperature.

    Raises:
        ValueError: a temperature that is not a scalar or a 1-d tensor whose length divides n_heads.
    """
    t = torch.as_tensor(temperature)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.numel() == 0 or n_heads % t.numel():
        raise ValueError(
            f"temperature must be a scalar or a [n_kv_heads] tensor dividing the {n_heads} heads, got shape "
            f"{tuple(t.shape)}"
        )
    return t.repeat_interleave(n_heads // t.numel()).view(-1, 1, 1)


def trig_normalise(x: torch.Tensor, *, scale: float, temperature: torch.Tensor | float | None = None) -> torch.Tensor:
    """The "trig" map's input x^ = tau * s * x / max(|x|, 1e-6), s = sqrt(scale) * D^(1/4), for x [B, H, T, D].

    tau (``temperature``, default 1) sharpens the estimated weight exp(tau^2 s^2 (cos(q, k) - 1)): at tau = 1 it
    lies in [e^-2, 1] at the default scale (a ratio of at most 7.4 between two keys), at tau = 3 in [e^-18, 1].
    """
    s = math.sqrt(scale) * x.shape[-1] ** 0.25
    factor = s / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    if temperature is not None:
        factor = factor * head_temperature(temperature, x.shape[1]).to(device=x.device, dtype=x.dtype)
    return x * factor


def feature_map_ref(
    x: torch.Tensor,
    W: torch.Tensor,
    *,
    feature_map: str,
    scale: float,
    is_query: bool,
    temperature: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """phi(x) for x [B, H, T, D] -> [B, H, T, M] (softmax) or [B, H, T, 2M] (trig), float32 or float64."""
    M = W.shape[1]
    if feature_map == "trig":
        xs = trig_normalise(x, scale=scale, temperature=temperature)
        proj = torch.matmul(xs, W.to(xs.dtype))  # [B, H, T, M]
        return torch.cat([torch.cos(proj), torch.sin(proj)], dim=-1) / math.sqrt(M)
    xs = x * math.sqrt(scale)
    proj = torch.matmul(xs, W.to(xs.dtype))  # [B, H, T, M]
    if feature_map != "softmax":
        raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}")
    logits = proj - 0.5 * (xs * xs).sum(-1, keepdim=True)
    if is_query:
        stab = proj.amax(dim=-1, keepdim=True) - 0.5 * (xs * xs).sum(-1, keepdim=True)
    else:
        stab = logits.amax(dim=(-1, -2), keepdim=True)
    return torch.exp(logits - stab.detach()) / math.sqrt(M)


def key_features_causal(x: torch.Tensor, W: torch.Tensor, *, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal "softmax" key map: own-stabilised features and per-key maxima, both detached-stabilised.

    Returns ``(pk, r)``: pk = exp(l - r) / sqrt(M) [..., T, M] and r = max_f l [..., T] (detached), with
    l = x'W - |x'|^2 / 2. The weight of key j for query i >= j is ``pq_i . pk_j * exp(r_j - m_i)`` with
    m_i = cummax(r)_i, i.e. the key features stabilised by the running max over keys <= i only, and the
    factor exp(r_j - m_i) <= 1 never overflows.
    """
    M = W.shape[1]
    xs = x * math.sqrt(scale)
    logits = torch.matmul(xs, W.to(xs.dtype)) - 0.5 * (xs * xs).sum(-1, keepdim=True)
    r = logits.amax(dim=-1).detach()
    return torch.exp(logits - r.unsqueeze(-1)) / math.sqrt(M), r


def _prepare(q, k, v, W, scale, upcast):
    dtype = q.dtype
    if upcast and dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    return q, k, v, W.to(q.dtype), scale, dtype


def feature_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    W: torch.Tensor,
    *,
    causal: bool,
    feature_map: str = "softmax",
    scale: float | None = None,
    eps: float = 1e-20,
    upcast: bool = True,
    temperature: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Random-feature attention, quadratic form (the spec).

    Args:
        q (torch.Tensor): [B, H, T, D].
        k (torch.Tensor): [B, Hkv, T, D]; H % Hkv == 0.
        v (torch.Tensor): [B, Hkv, T, Dv].
        W (torch.Tensor): [D, M] from :func:`draw_features`, shared by all heads.
        causal: query i attends to keys j <= i only.
        feature_map: "softmax" or "trig" (see the module docstring).
        scale: defaults to D ** -0.5.
        eps: lower clamp of the normaliser.
        upcast: compute in float32 (float64 stays float64).
        temperature: "trig" only: tau, a scalar or [Hkv] (see :func:`trig_normalise`).

    Returns:
        torch.Tensor: [B, H, T, Dv] in the input dtype.
    """
    q, k, v, W, scale, dtype = _prepare(q, k, v, W, scale, upcast)
    pq = feature_map_ref(q, W, feature_map=feature_map, scale=scale, is_query=True, temperature=temperature)
    if causal and feature_map == "softmax":
        # per query i the key stabiliser m_i = max over keys j <= i only: no dependence on the future
        pk, r = key_features_causal(k, W, scale=scale)
        m = r.cummax(dim=-1).values
        T = r.shape[-1]
        keep = torch.ones(T, T, dtype=torch.bool, device=r.device).tril()
        expo = torch.where(keep, r.unsqueeze(-2) - m.unsqueeze(-1), float("-inf"))  # [B, H, T, T]
        a = torch.matmul(pq, pk.transpose(-1, -2)) * torch.exp(expo)
    else:
        pk = feature_map_ref(k, W, feature_map=feature_map, scale=scale, is_query=False, temperature=temperature)
        a = torch.matmul(pq, pk.transpose(-1, -2))  # [B, H, T, T]
    if causal:
        T = a.shape[-1]
        a = a * torch.ones(T, T, dtype=a.dtype, device=a.device).tril()
    den = a.sum(-1, keepdim=True).clamp_min(eps)
    return (torch.matmul(a, v) / den).to(dtype)


def feature_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    W: torch.Tensor,
    *,
    causal: bool,
    feature_map: str = "softmax",
    scale: float | None = None,
    eps: float = 1e-20,
    chunk: int = 64,
    temperature: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Random-feature attention in O(T): same arguments and result as :func:`feature_attention_ref`.

    For T >= ``GROUP_MIN_T`` it runs one (batch row, kv head) group at a time: the key stabiliser is per
    (batch, kv head) anyway, and a group's working set stays in cache (measured on 2 CPU cores at T 16k, H 8/2, D 64, M 64: causal 183 ->
    81 ms, bidirectional 60 -> 50 ms).
    """
    B, Hkv, T = q.shape[0], k.shape[1], q.shape[2]
    G = q.shape[1] // Hkv
    kw = dict(causal=causal, feature_map=feature_map, scale=scale, eps=eps, chunk=chunk)
    # short sequences fit in cache whole; there the per-group loop would only add Python overhead
    if B * Hkv == 1 or T < GROUP_MIN_T:
        return _feature_attention_group(q, k, v, W, temperature=temperature, **kw)
    tau = None if temperature is None else torch.as_tensor(temperature)
    per_head = tau is not None and tau.dim() == 1
    if per_head and tau.numel() != Hkv:
        raise ValueError(f"temperature must be a scalar or [n_kv_heads={Hkv}], got shape {tuple(tau.shape)}")
    # upcast W once: every group then shares (and saves for backward) the same tensor
    W = W.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    rows = [torch.cat([_feature_attention_group(q[b : b + 1, j * G : (j + 1) * G], k[b : b + 1, j : j + 1],
                                                v[b : b + 1, j : j + 1], W,
                                                temperature=tau[j : j + 1] if per_head else tau, **kw)
                       for j in range(Hkv)], dim=1)
            for b in range(B)]
    return torch.cat(rows, dim=0)


def _feature_attention_group(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    W: torch.Tensor,
    *,
    causal: bool,
    feature_map: str,
    scale: float | None,
    eps: float,
    chunk: int,
    temperature: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The chunked computation for any [B, H, T, D] / [B, Hkv, T, D] (called per group by the function above).

    Bidirectional: one pass builds S = phi(K)^T [V, 1] [M', Dv + 1] (the ones column carries the normaliser
    z = sum_j phi(k_j), so numerator and denominator come from one matmul). Causal: per chunk of ``chunk``
    positions, the state of all earlier chunks (an exclusive cumsum of per-chunk states) plus a masked
    intra-chunk term, all chunks at once (extra memory O(B H T chunk)). Keys, values and states stay
    per kv head; the G = H / Hkv query heads of a group are stacked along the rows of each matmul.
    """
    dtype = q.dtype
    if dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, T, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    W = W.to(q.dtype)
    pq = feature_map_ref(q, W, feature_map=feature_map, scale=scale, is_query=True, temperature=temperature)
    stab_causal = causal and feature_map == "softmax"
    if stab_causal:
        # own-stabilised key features and per-key maxima r; query i uses the running max m_i over keys <= i
        pk, r = key_features_causal(k, W, scale=scale)  # [B, Hkv, T, M'], [B, Hkv, T]
    else:
        # the key stabiliser is a max over all keys of one kv head: the same as over the repeated keys
        pk = feature_map_ref(k, W, feature_map=feature_map, scale=scale, is_query=False, temperature=temperature)
    Mp = pq.shape[-1]
    pq = pq.view(B, Hkv, G, T, Mp)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [B, Hkv, T, Dv + 1]
    if not causal:
        state = torch.matmul(pk.transpose(-1, -2), v1)  # [B, Hkv, M', Dv + 1]
        nd = torch.matmul(pq.reshape(B, Hkv, G * T, Mp), state).view(B, Hkv, G, T, Dv + 1)
    else:
        # chunked prefix sums, vectorised over chunks: per-chunk states, their exclusive cumsum, and the
        # masked intra-chunk term; padded rows have zero features, so they add nothing
        n_c = -(-T // chunk)
        pad = n_c * chunk - T
        pq, pk, v1 = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (pq, pk, v1))
        cq = pq.view(B, Hkv, G, n_c, chunk, Mp).transpose(2, 3).reshape(B, Hkv, n_c, G * chunk, Mp)
        ck = pk.view(B, Hkv, n_c, chunk, Mp)
        cv = v1.view(B, Hkv, n_c, chunk, Dv + 1)
        keep = torch.ones(chunk, chunk, dtype=pq.dtype, device=pq.device).tril().repeat(G, 1)
        if not stab_causal:
            local = torch.matmul(ck.transpose(-1, -2), cv)  # [B, Hkv, n_c, M', Dv + 1]
            prefix = torch.cat([torch.zeros_like(local[:, :, :1]), local[:, :, :-1].cumsum(2)], dim=2)
            a = torch.matmul(cq, ck.transpose(-1, -2)) * keep  # [B, Hkv, n_c, G * chunk, chunk]
            inter = torch.matmul(cq, prefix)
        else:
            # padded keys: r = -inf (weight 0); m = cummax(r) is non-decreasing, m_end[c] = m at chunk c's last row
            r = torch.nn.functional.pad(r, (0, pad), value=float("-inf")).view(B, Hkv, n_c, chunk)
            m = r.flatten(2).cummax(dim=-1).values.view(B, Hkv, n_c, chunk)
            m_end = m[..., -1]  # [B, Hkv, n_c]
            # chunk c's state at base m_end[c]; prefix[c] = state of chunks < c at base m_end[c - 1],
            # rescaled by exp(old base - new base) <= 1 whenever the running max grows
            local = torch.matmul((ck * torch.exp(r - m_end.unsqueeze(-1)).unsqueeze(-1)).transpose(-1, -2), cv)
            prefix = [torch.zeros_like(local[:, :, 0])]
            for c in range(1, n_c):
                step = torch.exp(m_end[:, :, c - 2] - m_end[:, :, c - 1]) if c > 1 else None
                prev = prefix[-1] * step[..., None, None] if step is not None else prefix[-1]
                prefix.append(prev + local[:, :, c - 1])
            prefix = torch.stack(prefix, dim=2)  # [B, Hkv, n_c, M', Dv + 1]
            base = torch.cat([torch.full_like(m_end[:, :, :1], float("-inf")), m_end[:, :, :-1]], dim=2)
            mq = m.unsqueeze(3).expand(B, Hkv, n_c, G, chunk).reshape(B, Hkv, n_c, G * chunk)  # rows of cq
            inter = torch.matmul(cq, prefix) * torch.exp(base.unsqueeze(-1) - mq).unsqueeze(-1)
            expo = torch.where(keep.bool(), r.unsqueeze(-2) - mq.unsqueeze(-1), float("-inf"))
            a = torch.matmul(cq, ck.transpose(-1, -2)) * torch.exp(expo)  # [B, Hkv, n_c, G * chunk, chunk]
        nd = inter + torch.matmul(a, cv)  # [B, Hkv, n_c, G * chunk, Dv + 1]
        nd = nd.view(B, Hkv, n_c, G, chunk, Dv + 1).transpose(2, 3).reshape(B, Hkv, G, n_c * chunk, Dv + 1)
        nd = nd[:, :, :, :T]
    out = nd[..., :Dv] / nd[..., Dv:].clamp_min(eps)  # [B, Hkv, G, T, Dv]
    return out.reshape(B, H, T, Dv).to(dtype)
