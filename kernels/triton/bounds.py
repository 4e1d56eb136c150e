"""An exact bounds checker for Triton kernels run under the interpreter (``TRITON_INTERPRET=1``).

``with BoundsChecker() as chk: <launch kernels>`` checks every masked-in
address of every ``tl.load`` / ``tl.store`` (the interpreter turns both into
``InterpreterBuilder.create_masked_load`` / ``create_masked_store`` on raw
numpy pointer arrays; the unmasked forms call those too) and of every atomic
read-modify-write (``tl.atomic_add``: ``create_atomic_rmw``, op "atomic") against the tensors
passed to that launch: each load or store must address, with every lane its
mask lets through, elements of one tensor argument of the launch whose element
size is the access's. "Elements" is exact: the byte addresses
``data_ptr + sum(i_k * stride_k) * itemsize`` of the tensor's indices, so an
address in a padded view's gap, or past a too-small view into the rest of its
buffer, is a violation even though the memory exists.

Per launch the argument tensors are taken from the interpreter's host copies
(``GridExecutor._init_args_hst``), whose addresses the kernel sees. Violations
are recorded (``chk.violations``: kernel, program id, op, bad lanes, first bad
addresses), not raised inside the kernel; ``chk.assert_clean()`` fails with them.
``chk.checked`` counts the accesses seen, so a test can tell that it ran.

Why not triton-viz: its 3.0 release does not run on Triton 3.9, and its
sanitizer reports false out-of-bounds accesses on kernels whose loop trip
count depends on the program id (ours). This checker is slow (each access is
looked up in sorted address arrays), so it is for the small test problems only.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch


def element_addresses(t: torch.Tensor) -> np.ndarray:
    """Sorted, unique byte addresses of the elements of ``t`` (any strides, stride 0 included)."""
    offs = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offs = offs[..., None] + torch.arange(size, dtype=torch.int64) * stride
    offs = offs.reshape(-1).numpy() * t.element_size()
    return np.unique(offs.astype(np.uint64) + np.uint64(t.data_ptr()))


@dataclass
class _Arg:
    name: str
    itemsize: int
    addrs: np.ndarray        # sorted uint64

    def contains(self, a: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.addrs, a)
        i = np.minimum(i, len(self.addrs) - 1)
        return self.addrs[i] == a


@dataclass
class BoundsChecker:
    """Context manager: patches the interpreter while open; see the module docstring."""
    violations: List[dict] = field(default_factory=list)
    checked: int = 0
    launches: int = 0

    def __post_init__(self):
        self._args: List[_Arg] = []
        self._kernel = "?"
        self._stack = contextlib.ExitStack()

    # ----------------------------------------------------------------- patching
    def __enter__(self):
        from triton.runtime import interpreter as itp
        if not hasattr(itp, "GridExecutor"):
            raise RuntimeError("BoundsChecker needs the Triton interpreter (TRITON_INTERPRET=1)")
        mp = self._stack.enter_context(_Patch())
        init_args, load, store = (itp.GridExecutor._init_args_hst, itp.InterpreterBuilder.create_masked_load,
                                  itp.InterpreterBuilder.create_masked_store)
        rmw = itp.InterpreterBuilder.create_atomic_rmw
        chk = self

        def _init_args_hst(executor, args_dev, kwargs):
            args_hst, kwargs_hst = init_args(executor, args_dev, kwargs)
            chk._begin(getattr(executor.fn, "__name__", "?"), executor.arg_names, args_hst, kwargs_hst)
            return args_hst, kwargs_hst

        def create_masked_load(builder, ptrs, mask, other, *rest):
            chk._check(builder, "load", ptrs, mask)
            return load(builder, ptrs, mask, other, *rest)

        def create_masked_store(builder, ptrs, value, mask, *rest):
            chk._check(builder, "store", ptrs, mask)
            return store(builder, ptrs, value, mask, *rest)

        def create_atomic_rmw(builder, op, ptrs, value, mask, *rest):
            chk._check(builder, "atomic", ptrs, mask)
            return rmw(builder, op, ptrs, value, mask, *rest)

        mp.setattr(itp.GridExecutor, "_init_args_hst", _init_args_hst)
        mp.setattr(itp.InterpreterBuilder, "create_atomic_rmw", create_atomic_rmw)
        mp.setattr(itp.InterpreterBuilder, "create_masked_load", create_masked_load)
        mp.setattr(itp.InterpreterBuilder, "create_masked_store", create_masked_store)
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    # ----------------------------------------------------------------- checking
    def _begin(self, kernel, arg_names, args_hst, kwargs_hst):
        self.launches += 1
        self._kernel = kernel
        named = list(zip(arg_names, args_hst)) + list(kwargs_hst.items())
        self._args = [_Arg(name, t.element_size(), element_addresses(t))
                      for name, t in named if isinstance(t, torch.Tensor) and t.numel() > 0]

    def _check(self, builder, op, ptrs, mask):
        self.checked += 1
        addrs = np.asarray(ptrs.data, dtype=np.uint64).reshape(-1)
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).reshape(-1)
        a = addrs[m]
        if a.size == 0:
            return
        itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
        best = None
        for arg in self._args:
            if arg.itemsize != itemsize:
                continue
            ok = arg.contains(a)
            if ok.all():
                return
            if best is None or ok.sum() > best[1].sum():
                best = (arg, ok)
        bad = a if best is None else a[~best[1]]
        self.violations.append(dict(
            kernel=self._kernel, pid=tuple(builder.grid_idx), op=op, itemsize=itemsize,
            nearest=None if best is None else best[0].name, bad_lanes=int(bad.size), lanes=int(a.size),
            first_bad=[hex(int(x)) for x in bad[:4]]))

    def assert_clean(self):
        assert self.checked > 0, "no load or store was checked: is the interpreter on?"
        assert not self.violations, (f"{len(self.violations)} out-of-bounds accesses, first: "
                                     f"{self.violations[:3]}")


class _Patch:
    """A minimal monkeypatch (setattr, undone in reverse on exit), usable outside pytest."""
    def __enter__(self):
        self._undo = []
        return self

    def setattr(self, obj, name, value):
        self._undo.append((obj, name, obj.__dict__[name]))
        setattr(obj, name, value)

    def __exit__(self, *exc):
        for obj, name, old in reversed(self._undo):
            setattr(obj, name, old)
        return False
