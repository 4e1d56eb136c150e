"""Fused Triton kernels of 3D Nearby Attention (3DNA), forward and backward.

Reads top-down: ``jit`` (jit helpers and the key walk shared by the forward
and dQ kernels) -> ``extras`` (grouped kv heads, relative position bias) -> ``forward`` (forward kernel) -> ``backward`` (preprocess,
dK/dV, dQ kernels) -> ``relayout`` (the window tables of the v2 options) -> ``plan``
(exact computed-pair counts) -> ``tables`` /
``configs`` (per-architecture launch tables, tile planner, ``pick_configs``)
-> ``launch`` (launchers returning (kernel, grid, args, meta), ``forward()`` /
``backward()`` drivers) -> ``op`` (the
``torch.library`` custom ops and ``triton_attention``, which ``nuwa3dna.ops``
imports lazily). Importing this package imports no Triton, so the library
loads where Triton is absent.

Semantics are those of docs/design.md section 1 / ``nuwa3dna.kernels.geometry``: the
query (t, h, w) of grid (T, H, W) is centred at (t*T2//T, h*H2//H, w*W2//W)
in the key grid (T2, H2, W2); a key is visible iff it lies within the
(clipped) window of radius ``extent`` on every axis and, when causal, its
raster index is <= the query's. The v2 window options (docs/design.md section 7:
dilation, stride, per-axis causal, shifted borders, asymmetric windows) take
the kernels' table path (the ``TABLES`` constexpr): each axis re-laid by
residue so every window is a contiguous run, windows and their inverses read
from small per-axis int32 tables (``relayout``), the grid addressed through
them (no copies); the plain case keeps the closed-form arithmetic, unchanged.

Tiling. A program owns a 3D query tile (BT x BH x BW queries, flattened to
BLOCK_Q rows) of one (batch, head). The tile's windows, unioned per axis,
form a key box; the program walks that box in one flat, software-pipelined
loop over 1 x KH x KW key tiles with runtime bounds and builds the visibility
mask from coordinates, so no (queries x keys) tensor exists anywhere. Causal:
key tiles whose first key comes after the tile's last query are a tail of the
walk and are never visited, and the programs run in reverse raster order so
the longest (latest) tiles start first. Tile shapes minimise the exact count
of computed score pairs on the actual grids, causal skips included
(``configs.plan_tiles``, ``plan.computed_pairs``); rows, warps and stages come
from a per-architecture table (``tables.LAUNCH_TABLES``) checked by
``kernels/report.py``. ``bounds`` checks every load and store under the interpreter.

Backward (FlashAttention-2): ``delta = rowsum(dO * O)``, then dK/dV with one
program per 3D key tile walking the query tiles whose windows reach it, then
dQ like the forward. Deterministic, no atomics, except a relative position
bias's gradient (float32 atomic adds of dS from the dQ kernel).

Grouped kv heads (GQA/MQA, docs/design.md section 8): the forward and dQ read the
kv head h // group in place; a dK/dV program owns a (batch, kv head, key tile) and
walks its group's query heads in one loop. A relative position bias is gathered
per score at an index linear in the walked coordinates (``extras``); with a bias
the kernels take smaller tiles (``configs.pick_configs``). Without either, the
kernels compile exactly as before (GROUPED and HAS_BIAS off, PTX bodies unchanged).

Numerics: scores and softmax in float32, exponent in base 2 (the scale is
premultiplied by log2(e)); the saved log-sum-exp is the natural one, float32,
shape (B, heads, T, H, W). bf16 P and dS enter their dots as a hi + lo pair of
bf16 tiles (``jit.dot_acc``); float32 dots are exact (``input_precision="ieee"``).

Untested here: the compiled GPU path is never run in this project's CI (no
GPU); it is compiled ahead of time by ``kernels/report.py``. Under the Triton
interpreter bf16 ``tl.dot`` returns garbage (it multiplies the raw 16-bit
patterns), so the interpreter path upcasts bf16 tiles to float32 before every
dot (UPCAST_DOT); the native bf16 dot is only compiled, not run.
"""
