"""``Nuwa``: the encoder-decoder of NÜWA on ``nuwa3dna.NearbyAttention3D``.

* Two encoders of pre-norm 3DNA self-attention layers: one for the text stream
  (grid (1, 1, L), extent ``text_extent``), one for the visual condition stream
  (sketch or source codes, extent ``sketch_extent`` / ``source_extent``).
* Decoder layers: causal 3DNA self-attention over the target grid (extent
  ``image_extent`` / ``video_extent``), 3DNA cross-attention to the text memory
  (the whole text) and to the visual memory (rescaled centres, extent
  ``cross_sketch_extent`` / ``cross_source_extent``), then a feed-forward.
* Learned per-axis position tables (time, height, width), a learned task
  embedding added to every stream, learned BOS; with ``config.rotary`` every
  self-attention also gets learned 3D rotary (relative) positions.
* Shifted input: the decoder input at raster position p is the embedding of
  target token p-1 (BOS at p = 0), so the non-strict causal mask of 3DNA is
  exactly the autoregressive condition; logits at p predict token p.

Every attention layer is a ``NearbyAttention3D`` (its projections are the
weights). A stream whose extent differs from the module's construction extent
(e.g. one visual encoder for sketch and source grids) passes its own extent
to the module's forward (same weights, same backend).

Incremental decoding (``step``) is in cache.py's ``DecoderCache``.
Untested: dropout (there is none) and mixed-precision training.
"""
from __future__ import annotations

import torch
from torch import nn

from nuwa3dna import NearbyAttention3D

from nuwa3dna.model.tasks import IMAGE_TASKS, TASKS, Formation, none_ids, task_index, visual_kind
from nuwa3dna.model.text import TEXT_VOCAB


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class AxialPosition(nn.Module):
    """Learned per-axis tables: pos(t, h, w) = T[t] + H[h] + W[w]."""

    def __init__(self, grid, dim: int):
        super().__init__()
        self.grid = tuple(grid)
        self.tables = nn.ModuleList([nn.Embedding(n, dim) for n in self.grid])
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.02)

    def forward(self, grid) -> torch.Tensor:
        """(T, H, W, dim) position embeddings of a grid no larger than the tables."""
        if any(n > m for n, m in zip(grid, self.grid)):
            raise ValueError(f"grid {tuple(grid)} exceeds the position tables' grid {self.grid}")
        t, h, w = (tab.weight[:n] for tab, n in zip(self.tables, grid))
        return t[:, None, None] + h[None, :, None] + w[None, None, :]


class EncoderLayer(nn.Module):
    def __init__(self, c, extent):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.dim)
        self.attn = NearbyAttention3D(c.dim, heads=c.heads, dim_head=c.dim_head, extent=extent,
                                      causal=False, backend=c.backend, rotary=c.rotary, kv_heads=c.kv_heads)
        self.norm2 = nn.LayerNorm(c.dim)
        self.ff = FeedForward(c.dim, c.ff_mult)

    def forward(self, x, extent):
        x = x + self.attn(self.norm1(x), extent=extent)
        return x + self.ff(self.norm2(x))


class DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        mk = lambda extent, causal, rotary=False: NearbyAttention3D(
            c.dim, heads=c.heads, dim_head=c.dim_head, extent=extent, causal=causal, backend=c.backend, rotary=rotary,
            kv_heads=c.kv_heads)
        self.text_global = c.text_global
        self.norm_self, self.self_attn = nn.LayerNorm(c.dim), mk(c.video_extent, True, c.rotary)
        if not c.text_global:       # else the text memory joins the self-attention's softmax
            self.norm_text, self.cross_text = nn.LayerNorm(c.dim), mk(c.cross_text_extent, False)
        self.norm_vis, self.cross_vis = nn.LayerNorm(c.dim), mk(c.cross_source_extent, False)
        self.norm_ff, self.ff = nn.LayerNorm(c.dim), FeedForward(c.dim, c.ff_mult)

    def forward(self, x, text_mem, vis_mem, self_extent, vis_extent):
        if self.text_global:
            # text (B, 1, 1, L, dim) as global tokens of the causal self-attention (one softmax)
            x = x + self.self_attn(self.norm_self(x), extent=self_extent, global_context=text_mem.flatten(1, 3))
        else:
            x = x + self.self_attn(self.norm_self(x), extent=self_extent)
            x = x + self.cross_text(self.norm_text(x), text_mem)
        x = x + self.cross_vis(self.norm_vis(x), vis_mem, extent=vis_extent)
        return x + self.ff(self.norm_ff(x))


class Nuwa(nn.Module):
    def __init__(self, *, config):
        super().__init__()
        c = self.config = config
        K, Ks = c.vq_codebook_size, c.sketch_codebook_size
        self.text_none, self.vis_none = none_ids(c)
        T, h, w = c.token_grid
        _, hs, ws = c.sketch_grid
        self.text_emb = nn.Embedding(TEXT_VOCAB, c.dim)
        self.text_pos = AxialPosition((1, 1, c.text_len), c.dim)
        self.vis_emb = nn.Embedding(K + Ks + 1, c.dim)
        self.vis_pos = AxialPosition((T, max(h, hs), max(w, ws)), c.dim)
        self.task_emb = nn.Embedding(len(TASKS), c.dim)
        self.text_layers = nn.ModuleList([EncoderLayer(c, c.text_extent) for _ in range(c.enc_depth)])
        self.text_norm = nn.LayerNorm(c.dim)
        self.vis_layers = nn.ModuleList([EncoderLayer(c, c.source_extent) for _ in range(c.enc_depth)])
        self.vis_norm = nn.LayerNorm(c.dim)
        self.tgt_emb = nn.Embedding(K, c.dim)
        self.bos = nn.Parameter(torch.randn(c.dim) * 0.02)
        self.tgt_pos = AxialPosition(c.token_grid, c.dim)
        self.layers = nn.ModuleList([DecoderLayer(c) for _ in range(c.dec_depth)])
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, K)
        for emb in (self.text_emb, self.vis_emb, self.task_emb, self.tgt_emb):
            nn.init.normal_(emb.weight, std=0.02)

    # ---- extents per task --------------------------------------------------------------
    def self_extent(self, task: str):
        return self.config.image_extent if task in IMAGE_TASKS else self.config.video_extent

    def vis_extents(self, task: str):
        """(encoder self extent, decoder cross extent) of the visual stream."""
        c = self.config
        if visual_kind(task) == "sketch":
            return c.sketch_extent, c.cross_sketch_extent
        return c.source_extent, c.cross_source_extent

    # ---- encoder ----------------------------------------------------------------------
    def _stream(self, emb, pos, ids, none_id, task):
        x = emb(ids)
        # NONE tokens get no position, so a NONE grid of any shape is one constant vector.
        x = x + pos(ids.shape[1:]) * (ids != none_id).unsqueeze(-1).to(x.dtype)
        return x + self.task_emb.weight[task_index(task)]

    def encode(self, f: Formation):
        """Condition memories (text (B, 1, 1, L, dim), visual (B, T', h', w', dim))."""
        x = self._stream(self.text_emb, self.text_pos, f.text_ids, self.text_none, f.task)
        for layer in self.text_layers:
            x = layer(x, self.config.text_extent)
        text_mem = self.text_norm(x)
        enc_extent, _ = self.vis_extents(f.task)
        y = self._stream(self.vis_emb, self.vis_pos, f.vis_ids, self.vis_none, f.task)
        for layer in self.vis_layers:
            y = layer(y, enc_extent)
        return text_mem, self.vis_norm(y)

    # ---- decoder ----------------------------------------------------------------------
    def decoder_input(self, tokens: torch.Tensor, task: str) -> torch.Tensor:
        """Shifted input (B, T, H, W, dim): position p holds emb(token p-1), BOS at p = 0."""
        B, T, H, W = tokens.shape
        flat = tokens.reshape(B, -1)
        prev = self.tgt_emb(flat[:, :-1])
        x = torch.cat([self.bos.expand(B, 1, -1), prev], dim=1).reshape(B, T, H, W, -1)
        return x + self.tgt_pos((T, H, W)) + self.task_emb.weight[task_index(task)]

    def decode(self, tokens, text_mem, vis_mem, task: str) -> torch.Tensor:
        x = self.decoder_input(tokens, task)
        self_ext, (_, vis_ext) = self.self_extent(task), self.vis_extents(task)
        for layer in self.layers:
            x = layer(x, text_mem, vis_mem, self_ext, vis_ext)
        return self.head(self.norm(x))

    def forward(self, f: Formation, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, h, w, K): entry p predicts tokens[p] from tokens[< p]."""
        want = (f.batch, *f.out_grid)
        if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tuple(tokens.shape) != want:
            desc = (tuple(tokens.shape), tokens.dtype) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor of shape {want} for task {f.task!r}, got {desc}")
        K = self.config.vq_codebook_size
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= K):
            raise ValueError(f"tokens must lie in [0, {K}), got min={int(tokens.min())}, max={int(tokens.max())}")
        text_mem, vis_mem = self.encode(f)
        return self.decode(tokens, text_mem, vis_mem, f.task)
