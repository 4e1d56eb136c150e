"""Autoregressive sampling of NÜWA's target tokens, raster order, with a KV cache.

* temperature (0 = greedy argmax), top-k, top-p (nucleus), a seeded
  ``torch.Generator``: the same seed gives the same tokens.
* Tokens the task gives (i2i's top rows, v2v's first frames) are forced, never
  sampled; their steps only fill the caches (no logits computed).
* Classifier-free guidance: with ``cond_scale`` != 1 the conditional and the
  null-condition (every condition id NONE, the learned "none" condition)
  branches run as one batch of 2B and logits = null + s * (cond - null).
  Conditionless tasks (i2i, v2v) ignore ``cond_scale``: both branches agree.
* ``use_cache=False`` is the baseline the benchmark compares against: each
  step recomputes the decoder over the prefix frames 0..t (the whole grid
  when the visual condition has more than one frame, since rescaled
  cross-attention centres depend on the query grid's frame count).

Untested: sampling on CUDA (the same code; the generator follows the device).
"""
from __future__ import annotations

from numbers import Real
from typing import Optional

import torch

try:                                   # tqdm is in the "model" extra; sampling works without it
    from tqdm.auto import tqdm
except ImportError:                    # pragma: no cover - tqdm is installed here
    tqdm = None

from nuwa3dna.model.cache import DecoderCache
from nuwa3dna.model.tasks import Formation, null_condition, task_index


def check_sampling_args(temperature, top_k, top_p, cond_scale, generator):
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature=}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k=}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p=}")
    if isinstance(cond_scale, bool) or not isinstance(cond_scale, Real) or cond_scale != cond_scale:
        raise ValueError(f"cond_scale must be a number, got {cond_scale=}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def filter_logits(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """Set logits outside the top-k / the top-p nucleus to -inf; (B, K) -> (B, K)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass BEFORE it already reaches top_p: the top token always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


def _input_table(nuwa, f: Formation) -> torch.Tensor:
    """(N, dim) position + task embedding of every raster position of the target grid."""
    T, H, W = f.out_grid
    return nuwa.tgt_pos((T, H, W)).reshape(T * H * W, -1) + nuwa.task_emb.weight[task_index(f.task)]


def _cat(f: Formation, g: Formation) -> Formation:
    return Formation(f.task, torch.cat([f.text_ids, g.text_ids]), torch.cat([f.vis_ids, g.vis_ids]),
                     f.out_grid, torch.cat([f.given, g.given]), f.given_mask)


def sample_tokens(nuwa, f: Formation, *, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, cond_scale: float = 1.0,
                  generator: Optional[torch.Generator] = None, progress: bool = False,
                  use_cache: bool = True) -> torch.Tensor:
    """Sample the (B, T, h, w) target tokens of formation ``f``; given tokens are copied, not sampled.

    See the module docstring for the arguments. On CPU the loop runs with
    one intra-op thread: a step's ops are tiny (batch x dim ~ 1e3 elements),
    and on 2 busy cores extra threads only added barrier waits (measured 20 s
    instead of 1.2 s for one 256-token video under a load average of 6).
    """
    on_cpu = nuwa.bos.device.type == "cpu"
    threads = torch.get_num_threads()
    if on_cpu:
        torch.set_num_threads(1)
    try:
        return _sample_tokens(nuwa, f, temperature=temperature, top_k=top_k, top_p=top_p,
                              cond_scale=cond_scale, generator=generator, progress=progress,
                              use_cache=use_cache)
    finally:
        if on_cpu:
            torch.set_num_threads(threads)


@torch.no_grad()
def _sample_tokens(nuwa, f, *, temperature, top_k, top_p, cond_scale, generator, progress, use_cache):
    check_sampling_args(temperature, top_k, top_p, cond_scale, generator)
    B = f.batch
    T, H, W = f.out_grid
    N = T * H * W
    guided = cond_scale != 1 and f.has_condition
    run = _cat(f, null_condition(f, nuwa.config)) if guided else f
    text_mem, vis_mem = nuwa.encode(run)
    tokens = f.given.reshape(B, N).clone()
    forced = f.given_mask.reshape(N).tolist()
    table = _input_table(nuwa, f)
    cache = DecoderCache(nuwa, run, text_mem, vis_mem) if use_cache else None
    steps = range(N)
    if progress and tqdm is not None:
        steps = tqdm(steps, desc=f"{f.task}: sampling tokens", unit="tok")
    for p in steps:
        if use_cache:
            x = (nuwa.bos if p == 0 else nuwa.tgt_emb(tokens[:, p - 1])) + table[p]
            x = x.expand(B, -1) if p == 0 else x
            if guided:
                x = torch.cat([x, x])
            logits = cache.step(x, p, logits=not forced[p])
        elif forced[p]:
            logits = None
        else:
            logits = recompute_logits(nuwa, f.task, f.out_grid, text_mem, vis_mem,
                                      torch.cat([tokens, tokens]) if guided else tokens, p)
        if forced[p]:
            continue
        if guided:
            cond, null = logits.chunk(2)
            logits = null + cond_scale * (cond - null)
        tokens[:, p] = pick(logits, temperature, top_k, top_p, generator)
    return tokens.reshape(B, T, H, W)


@torch.no_grad()
def recompute_logits(nuwa, task: str, grid, text_mem, vis_mem, tokens: torch.Tensor, p: int) -> torch.Tensor:
    """Logits (B, K) at raster position ``p`` by a full decoder pass over the prefix: no cache.

    ``tokens`` (B, N) holds the tokens sampled so far (entries >= p are never
    seen: causal). The pass covers frames 0..t of position p when the visual
    memory has one frame (cross centres are then 0 whatever the query grid's
    frame count), else the whole grid.
    """
    T, H, W = grid
    B = tokens.shape[0]
    frames = p // (H * W) + 1 if vis_mem.shape[1] == 1 else T
    grid_tokens = tokens.reshape(B, T, H, W)[:, :frames]
    logits = nuwa.decode(grid_tokens, text_mem, vis_mem, task)
    return logits.reshape(B, -1, logits.shape[-1])[:, p]


@torch.no_grad()
def incremental_logits(nuwa, f: Formation, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits (B, T, h, w, K) computed one step at a time through the KV cache.

    Equal (up to rounding) to ``nuwa(f, tokens)``; used to test the cache.
    """
    B, T, H, W = tokens.shape
    N = T * H * W
    text_mem, vis_mem = nuwa.encode(f)
    cache = DecoderCache(nuwa, f, text_mem, vis_mem)
    table = _input_table(nuwa, f)
    flat = tokens.reshape(B, N)
    out = []
    for p in range(N):
        x = (nuwa.bos.expand(B, -1) if p == 0 else nuwa.tgt_emb(flat[:, p - 1])) + table[p]
        out.append(cache.step(x, p))
    return torch.stack(out, 1).reshape(B, T, H, W, -1)
