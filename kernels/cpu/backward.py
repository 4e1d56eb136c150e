"""Backward of the CPU tile path, by recomputation, key-frame stationary like the forward.

For one row tile and key frame, the stacked query frames' probabilities are
recomputed from the saved log-sum-exp in one bmm; dK and dV of that key halo
come out of one bmm each (inner dim frames*bh*bw). Products are formed in
contiguous scratch and added into the strided accumulators (MKL's in-place path
on strided batches was ~3x slower per op). dK/dV accumulate in strip layout and
are summed back onto the grid at the end (``layout.unstrip``).
"""
from __future__ import annotations

import torch

from nuwa3dna.kernels.cpu.forward import Call, add_window_bias, blocks, chunks, guarded
from nuwa3dna.kernels.cpu.layout import relay, strips_kv, tile_rows, unrelay, unstrip, untile_rows
from nuwa3dna.kernels.cpu.planner import PLAIN, CpuConfig
from nuwa3dna.kernels.windows import Options
from nuwa3dna.kernels.cpu.workers import run, split


def backward(dout, dlse, q, k, v, out, lse, extent, causal: bool, scale: float, config: CpuConfig,
             opts: Options = PLAIN):
    """Returns (dq, dk, dv) in the inputs' dtypes. Unchecked. ``opts`` as in ``forward``;
    ``dlse``: the gradient of the returned log-sum-exp, or None."""
    return guarded(lambda c: _backward(dout, dlse, q, k, v, out, lse, causal, scale, c, config),
                   q, k, extent, causal, config, opts)


def _backward(dout, dlse, q, k, v, out, lse, causal, scale, c: Call, config: CpuConfig):
    g, acc, ws = c.g, c.acc, c.ws
    D = q.shape[-1]
    ns, nq, nk = g.ns, g.bh * g.bw, g.lh * g.lw
    # delta = rowsum(dO * O): the softmax-Jacobian term of every query.
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:        # d lse_i / d s_ij = p_ij: dS = P * (dP - (delta - dlse))
        delta = delta - dlse.to(acc)
    dout, q, delta, lse = (relay(x, g, "q") for x in (dout, q, delta, lse))   # dilated axes by residue
    k, v = relay(k, g, "k"), relay(v, g, "k")
    qs = tile_rows(q, g, acc, ws, "q", scale)              # (nht, BH*ns, T, nq, D), pre-scaled
    dos = tile_rows(dout, g, acc, ws, "do")
    ks, vs = strips_kv(k, v, g, acc, ws, c.workers)        # (BH, ns, T2, h2p, lw, D)
    deltas = tile_rows(delta, g, acc, ws, "delta")          # (nht, BH*ns, T, nq)
    lses = tile_rows(lse, g, acc, ws, "lse")
    dqs = ws.get("dq", qs.shape, acc, q.device).zero_()
    dks = ws.get("dk", ks.shape, acc, q.device).zero_()
    dvs = ws.get("dv", vs.shape, acc, q.device).zero_()
    parts = chunks(c, config, min_parts=config.parts_per_worker * c.workers)
    n_max = (parts[0][1] - parts[0][0]) * ns
    size = n_max * c.max_nf * nq * nk

    def work(groups):
        pbuf, dpbuf = (torch.empty(size, dtype=acc, device=q.device) for _ in range(2))
        tq = torch.empty(n_max * c.max_nf * nq * D, dtype=acc, device=q.device)
        tk = torch.empty(n_max * nk * D, dtype=acc, device=q.device)
        for blk in blocks(g, groups):
            n, M = blk.n, blk.M
            qc, doc = blk.queries(qs, ns), blk.queries(dos, ns)               # [n, M, D]
            kc, vc = blk.keys(ks), blk.keys(vs)                               # [n, nk, D]
            p = pbuf[:n * M * nk].view(n, M, nk)                              # [n, M, nk]
            dp = dpbuf[:n * M * nk].view(n, M, nk)                            # [n, M, nk]
            torch.bmm(qc, kc.transpose(1, 2), out=p)
            torch.bmm(doc, vc.transpose(1, 2), out=dp)
            add_window_bias(p.view(blk.b1 - blk.b0, ns, -1, nq, nk), c.bias, blk.j, causal and blk.t0 == blk.a)
            p.sub_(blk.queries(lses, ns).unsqueeze(-1)).exp_()
            dp.sub_(blk.queries(deltas, ns).unsqueeze(-1)).mul_(p)           # dS
            tmp_q = tq[:n * M * D].view(n, M, D)
            tmp_k = tk[:n * nk * D].view(n, nk, D)
            blk.queries(dqs, ns).add_(torch.bmm(dp, kc, out=tmp_q))
            blk.keys(dks).add_(torch.bmm(dp.transpose(1, 2), qc, out=tmp_k))
            blk.keys(dvs).add_(torch.bmm(p.transpose(1, 2), doc, out=tmp_k))

    # Key halos of neighbouring row tiles overlap, so the dK/dV accumulations of
    # two workers must never meet: workers own disjoint batch*head ranges.
    work_parts = [[(b0, b1, j) for b0, b1 in part for j in range(g.nht)]
                  for part in split(parts, config.parts_per_worker * c.workers)]
    run(work, work_parts, c.workers)
    dq = untile_rows(dqs, g, q.shape, q.dtype, scale)
    dk = unstrip(dks, g, k.shape, k.dtype, ws)
    dv = unstrip(dvs, g, v.shape, v.dtype, ws)
    return unrelay(dq, g, "q"), unrelay(dk, g, "k"), unrelay(dv, g, "k")
