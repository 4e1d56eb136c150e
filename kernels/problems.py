"""One list of 3DNA problems shared by tests, benchmarks and the README.

``WORKLOADS`` are the named workloads of docs/design.md section 6; ``WINDOW_WORKLOADS``
v2-option variants of them (cpu-mid dilated, strided and frame-causal; nuwa-video
strided) for the GPU perf report and the AOT report (kernels/perf.py, kernels/report.py). ``TEST_PROBLEMS``
are small, deliberately odd shapes (no size a multiple of any block) for
correctness tests, including under the Triton interpreter. ``WINDOW_PROBLEMS`` add
the v2 window options (docs/design.md section 7: dilation, stride, per-axis causal,
shifted borders) on the same kind of odd shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import torch

from nuwa3dna.kernels.geometry import count_visible, resolve_extent


@dataclass(frozen=True)
class Problem:
    B: int
    q_grid: Tuple[int, int, int]
    heads: int
    D: int
    extent: Tuple[Optional[int], Optional[int], Optional[int]]
    causal: Union[bool, Tuple[bool, bool, bool]] = False    # True: raster order; a tuple: per axis
    kv_grid: Optional[Tuple[int, int, int]] = None   # None: self-attention
    name: Optional[str] = None
    dilation: Tuple[int, int, int] = (1, 1, 1)
    stride: Tuple[int, int, int] = (1, 1, 1)
    border: str = "clip"

    @property
    def kv(self) -> Tuple[int, int, int]:
        return self.q_grid if self.kv_grid is None else self.kv_grid

    @property
    def id(self) -> str:
        """Readable test id, e.g. ``B2-T3H5W7-h2-d24-e1x2x2-causal``."""
        grid = lambda g: "T{}H{}W{}".format(*g)
        parts = [f"B{self.B}", grid(self.q_grid)]
        if self.kv_grid is not None:
            parts.append("kv" + grid(self.kv_grid))
        parts += [f"h{self.heads}", f"d{self.D}",
                  "e" + "x".join("a" if e is None else str(e) for e in self.extent)]
        if self.causal is True:
            parts.append("causal")
        elif self.causal:
            parts.append("causal" + "".join("TF"[not c] for c in self.causal))
        for tag, x in (("dil", self.dilation), ("str", self.stride)):
            if x != (1, 1, 1):
                parts.append(tag + "x".join(map(str, x)))
        if self.border != "clip":
            parts.append(self.border)
        return (self.name + ":" if self.name else "") + "-".join(parts)

    @property
    def resolved_extent(self):
        return resolve_extent(self.extent, self.kv)

    @property
    def options(self) -> dict:
        """The v2 window options as ``nearby_attention`` keywords."""
        return dict(dilation=self.dilation, stride=self.stride, border=self.border)

    def visible_pairs(self) -> int:
        return count_visible(self.q_grid, self.kv, self.resolved_extent, self.causal, **self.options)

    def flops(self, backward: bool = False) -> float:
        """Useful FLOPs (docs/design.md section 1): 4*D*heads*B*pairs; backward counts 2.5x."""
        f = 4.0 * self.D * self.heads * self.B * self.visible_pairs()
        return f * 3.5 if backward else f

    def scaled(self, t: int = 1, h: int = 1, w: int = 1) -> "Problem":
        """The same problem with grids divided per axis (documented CPU scaling)."""
        div = lambda g: (max(1, g[0] // t), max(1, g[1] // h), max(1, g[2] // w))
        return replace(self, q_grid=div(self.q_grid),
                       kv_grid=None if self.kv_grid is None else div(self.kv_grid))

    def make(self, dtype=torch.float32, device="cpu", requires_grad=False, generator=None):
        """Fresh random q, k, v for this problem."""
        def rand(grid):
            x = torch.randn(self.B, *grid, self.heads, self.D, dtype=torch.float32,
                            generator=generator).to(device=device, dtype=dtype)
            return x.requires_grad_(requires_grad)
        return rand(self.q_grid), rand(self.kv), rand(self.kv)


WORKLOADS = {
    p.name: p for p in [
        Problem(1, (1, 21, 21), 8, 64, (0, 3, 3), causal=True, name="nuwa-image"),
        Problem(1, (10, 21, 21), 8, 64, (3, 3, 3), causal=True, name="nuwa-video"),
        Problem(1, (8, 32, 32), 8, 64, (1, 3, 3), name="cpu-mid"),
        Problem(1, (32, 32, 32), 8, 64, (1, 3, 3), name="cpu-mid-4x"),
        Problem(2, (16, 48, 48), 16, 64, (1, 3, 3), name="gpu-large"),
        Problem(1, (10, 21, 21), 8, 64, (1, 2, 2), kv_grid=(10, 14, 14), name="cross-sketch"),
    ]
}

# cpu-mid with one v2 option each (issue 13's benchmark rows), and nuwa-video with strided
# windows under raster causality (the kernels' causal table path).
WINDOW_WORKLOADS = {
    p.name: p for p in [
        Problem(1, (8, 32, 32), 8, 64, (1, 3, 3), dilation=(1, 2, 2), name="cpu-mid-dilation"),
        Problem(1, (8, 32, 32), 8, 64, (1, 3, 3), stride=(1, 2, 2), name="cpu-mid-stride"),
        Problem(1, (8, 32, 32), 8, 64, (1, 3, 3), causal=(True, False, False), name="cpu-mid-frame-causal"),
        Problem(1, (10, 21, 21), 8, 64, (3, 3, 3), causal=True, stride=(1, 2, 2), name="nuwa-video-stride"),
    ]
}

TEST_PROBLEMS = [
    Problem(2, (3, 5, 7), 2, 24, (1, 2, 2)),
    Problem(2, (3, 5, 7), 2, 24, (1, 2, 2), causal=True),
    Problem(2, (1, 1, 9), 3, 8, (0, 0, 2)),
    Problem(1, (1, 1, 9), 2, 8, (0, 0, None), causal=True),
    Problem(2, (2, 6, 5), 2, 64, (None, 1, 3)),
    Problem(2, (2, 6, 5), 2, 64, (1, 1, 1), causal=True),
    Problem(2, (3, 5, 7), 3, 24, (1, 1, 2), kv_grid=(2, 3, 4)),
    Problem(1, (2, 6, 5), 2, 8, (0, None, 1), kv_grid=(3, 9, 11)),
    Problem(2, (1, 11, 13), 2, 40, (0, 3, 3), causal=True),
    Problem(1, (5, 3, 3), 2, 16, (2, 0, 0)),
]

WINDOW_PROBLEMS = [
    Problem(2, (3, 5, 7), 2, 16, (1, 2, 2), dilation=(1, 2, 2)),
    Problem(2, (3, 5, 7), 2, 16, (1, 1, 2), stride=(1, 2, 3)),
    Problem(1, (4, 7, 9), 2, 8, (1, 1, 1), stride=(2, 3, 2), dilation=(1, 2, 3), border="shift"),
    Problem(2, (5, 6, 7), 2, 16, (1, 1, 2), causal=(True, False, False), border="shift"),
    Problem(1, (5, 6, 7), 3, 8, (2, 1, 1), causal=(True, True, False), stride=(3, 2, 1), dilation=(1, 1, 2),
            border="shift"),
    Problem(1, (4, 5, 7), 2, 8, (2, 1, 2), causal=(True, False, True), stride=(2, 2, 3), dilation=(1, 2, 1)),
    Problem(2, (3, 5, 7), 2, 16, (1, 1, 1), causal=True, stride=(1, 3, 2), dilation=(1, 2, 1)),
    Problem(1, (3, 6, 11), 2, 8, (0, 1, 2), causal=True, border="shift", dilation=(1, 1, 2)),
    Problem(2, (3, 5, 7), 2, 16, (1, 1, 2), kv_grid=(2, 9, 11), dilation=(1, 2, 2), stride=(1, 3, 1)),
    Problem(1, (2, 6, 5), 2, 8, (None, 1, 1), kv_grid=(3, 9, 7), border="shift", stride=(1, 2, 3),
            dilation=(1, 3, 2)),
]

# WINDOW_PROBLEMS keep the frame axis plain; these dilate and stride it too, and mix the rest
# (the window tests of both backends run them).
FRAME_WINDOW_PROBLEMS = [
    Problem(1, (5, 4, 6), 2, 8, (1, 1, 1), dilation=(2, 1, 2), stride=(2, 1, 1)),
    Problem(1, (7, 4, 5), 1, 8, (1, 1, 1), dilation=(2, 1, 1), border="shift", causal=(True, False, False)),
    Problem(2, (6, 5, 4), 1, 8, (2, 2, 1), stride=(3, 1, 2), causal=(True, False, False)),
    Problem(1, (5, 3, 4), 2, 8, (1, 1, 1), kv_grid=(9, 5, 7), dilation=(3, 2, 1), stride=(1, 1, 3)),
    Problem(1, (6, 6, 11), 1, 8, (1, 1, 2), causal=True, dilation=(2, 1, 2), stride=(2, 2, 1), border="shift"),
    Problem(1, (3, 11, 7), 1, 8, (1, 2, 1), causal=(False, True, True), dilation=(1, 2, 2), border="shift"),
]
