"""Backward of the CPU tile path, by recomputation, key-frame stationary like the forward.

For one row tile and key frame, the stacked query frames' probabilities are
recomputed from the saved log-sum-exp in one bmm; dK and dV of that key halo
come out of one bmm each (inner dim frames*bh*bw). Products are formed in
contiguous scratch and added into the strided accumulators (MKL's in-place path
on strided batches was ~3x slower per op). dK/dV accumulate in strip layout and
are summed back onto the grid at the end (``layout.unstrip``). Grouped queries:
the bmm's inner dim then also runs over the group's G query heads, so dK/dV
come out summed over the group. A relative position bias: each block's dS,
summed over its batch entries, is added into a per-worker buffer in the bias
table's layout; one scatter per call turns the buffers into d_bias
(``bias.TileBias``), never a (queries x keys) tensor.
"""
from __future__ import annotations

import torch

from nuwa3dna.kernels.cpu.forward import Call, add_mask, blocks, chunks, guarded
from nuwa3dna.kernels.cpu.layout import relay, strips_kv, tile_rows, unrelay, unstrip, untile_rows
from nuwa3dna.kernels.cpu.planner import PLAIN, CpuConfig
from nuwa3dna.kernels.windows import Options
from nuwa3dna.kernels.cpu.workers import run, split


def backward(dout, dlse, q, k, v, out, lse, extent, causal: bool, scale: float, config: CpuConfig,
             opts: Options = PLAIN, rel_bias=None):
    """Returns (dq, dk, dv) in the inputs' dtypes, and d_bias (like ``rel_bias``) when a bias is
    given. Unchecked. ``opts``, grouped k/v and ``rel_bias`` as in ``forward``; ``dlse``: the
    gradient of the returned log-sum-exp, or None."""
    return guarded(lambda c: _backward(dout, dlse, q, k, v, out, lse, causal, scale, c, config, rel_bias),
                   q, k, extent, causal, config, opts, rel_bias)


def _backward(dout, dlse, q, k, v, out, lse, causal, scale, c: Call, config: CpuConfig, rel_bias=None):
    g, acc, ws, G = c.g, c.acc, c.ws, c.G
    D = q.shape[-1]
    ns, nq, nk = g.ns, G * g.bh * g.bw, g.lh * g.lw
    # delta = rowsum(dO * O): the softmax-Jacobian term of every query.
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:        # d lse_i / d s_ij = p_ij: dS = P * (dP - (delta - dlse))
        delta = delta - dlse.to(acc)
    dout, q, delta, lse = (relay(x, g, "q") for x in (dout, q, delta, lse))   # dilated axes by residue
    k, v = relay(k, g, "k"), relay(v, g, "k")
    qs = tile_rows(q, g, acc, ws, "q", scale, G)           # (nht, BHk*ns, T, G*nq, D), pre-scaled
    dos = tile_rows(dout, g, acc, ws, "do", groups=G)
    ks, vs = strips_kv(k, v, g, acc, ws, c.workers)        # (BHk, ns, T2, h2p, lw, D)
    deltas = tile_rows(delta, g, acc, ws, "delta", groups=G)    # (nht, BHk*ns, T, G*nq)
    lses = tile_rows(lse, g, acc, ws, "lse", groups=G)
    dqs = ws.get("dq", qs.shape, acc, q.device).zero_()
    dks = ws.get("dk", ks.shape, acc, q.device).zero_()
    dvs = ws.get("dv", vs.shape, acc, q.device).zero_()
    parts = chunks(c, config, min_parts=config.parts_per_worker * c.workers)
    n_max = max(b1 - b0 for b0, b1 in parts) * ns
    size = n_max * c.max_nf * nq * nk
    dbias = []          # one buffer per worker (they share heads, so they cannot share one)
    # Key halos of neighbouring row tiles overlap, so the dK/dV accumulations of two workers
    # must never meet: workers own disjoint batch*head ranges. With grouped queries there may
    # be fewer such ranges than workers (MQA at batch 1: one); then workers take row tiles
    # instead, each with dK/dV buffers of its own (small: the strips of so few kv heads),
    # summed at the end. (Plain calls keep the one path, results bit for bit.)
    own_kv = G > 1 and len(parts) < c.workers
    private = []

    def work(groups):
        pbuf, dpbuf = (torch.empty(size, dtype=acc, device=q.device) for _ in range(2))
        tq = torch.empty(n_max * c.max_nf * nq * D, dtype=acc, device=q.device)
        tk = torch.empty(n_max * nk * D, dtype=acc, device=q.device)
        db = None
        dks_, dvs_ = dks, dvs
        if own_kv:
            dks_, dvs_ = torch.zeros_like(dks), torch.zeros_like(dvs)
            private.append((dks_, dvs_))
        for blk in blocks(g, groups, G):
            n, M = blk.n, blk.M
            qc, doc = blk.queries(qs, ns), blk.queries(dos, ns)               # [n, M, D]
            kc, vc = blk.keys(ks), blk.keys(vs)                               # [n, nk, D]
            p = pbuf[:n * M * nk].view(n, M, nk)                              # [n, M, nk]
            dp = dpbuf[:n * M * nk].view(n, M, nk)                            # [n, M, nk]
            torch.bmm(qc, kc.transpose(1, 2), out=p)
            torch.bmm(doc, vc.transpose(1, 2), out=dp)
            add_mask(p, c, blk, causal)
            p.sub_(blk.queries(lses, ns).unsqueeze(-1)).exp_()
            dp.sub_(blk.queries(deltas, ns).unsqueeze(-1)).mul_(p)           # dS
            if c.rel is not None:
                if db is None:
                    db = c.rel.new_grad()
                    dbias.append(db)
                c.rel.accumulate(dp, blk, db)
            tmp_q = tq[:n * M * D].view(n, M, D)
            tmp_k = tk[:n * nk * D].view(n, nk, D)
            blk.queries(dqs, ns).add_(torch.bmm(dp, kc, out=tmp_q))
            blk.keys(dks_).add_(torch.bmm(dp.transpose(1, 2), qc, out=tmp_k))
            blk.keys(dvs_).add_(torch.bmm(p.transpose(1, 2), doc, out=tmp_k))

    if own_kv:
        work_parts = split([(b0, b1, j) for b0, b1 in parts for j in range(g.nht)],
                           config.parts_per_worker * c.workers)
    else:
        work_parts = [[(b0, b1, j) for b0, b1 in part for j in range(g.nht)]
                      for part in split(parts, config.parts_per_worker * c.workers)]
    run(work, work_parts, c.workers)
    for dk_, dv_ in private:
        dks.add_(dk_)
        dvs.add_(dv_)
    dq = untile_rows(dqs, g, q.shape, q.dtype, scale, G)
    dk = unstrip(dks, g, k.shape, k.dtype, ws)
    dv = unstrip(dvs, g, v.shape, v.dtype, ws)
    grads = unrelay(dq, g, "q"), unrelay(dk, g, "k"), unrelay(dv, g, "k")
    if c.rel is None:
        return grads
    return grads + (c.rel.grad(dbias, rel_bias) if dbias else torch.zeros_like(rel_bias),)
