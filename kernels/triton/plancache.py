"""``PlanCache``: the thread-safe, bounded LRU that keeps the launchers' plans
(``launch.PLANS``), with the host and device bytes it holds (``nuwa3dna.memory``)."""
from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from types import MappingProxyType

import torch


def _host_bytes(obj) -> int:
    """Approximate host bytes of a key or plan: its containers and the numbers and strings
    in them. Shared objects (kernels, functions, devices, dtypes) and tensors are not counted."""
    if isinstance(obj, (tuple, list)):
        return sys.getsizeof(obj) + sum(_host_bytes(x) for x in obj)
    if isinstance(obj, (dict, MappingProxyType)):
        return sys.getsizeof(dict(obj)) + sum(_host_bytes(a) + _host_bytes(b) for a, b in obj.items())
    if isinstance(obj, (int, float, str)):
        return sys.getsizeof(obj)
    return 0


def _tensors(obj) -> list:
    """The tensors a plan holds (the window tables), found through its (named) tuples."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, tuple):
        return [t for x in obj for t in _tensors(x)]
    return []


class PlanCache:
    """A thread-safe LRU of launch plans: at most ``maxsize`` entries, the least recently
    used dropped first. A miss builds outside the lock (a new grid's tile planning takes
    milliseconds), so two threads may build the same plan once each; both are equal and
    the later one is kept."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._plans: "OrderedDict[tuple, tuple]" = OrderedDict()     # key -> (plan, host bytes)
        self._lock = threading.Lock()

    def get(self, key: tuple, build, *args):
        with self._lock:
            hit = self._plans.get(key)
            if hit is not None:
                self._plans.move_to_end(key)
                return hit[0]
        plan = build(*args)
        nbytes = _host_bytes(key) + _host_bytes(plan)
        with self._lock:
            self._plans[key] = (plan, nbytes)
            self._plans.move_to_end(key)
            while len(self._plans) > self.maxsize:
                self._plans.popitem(last=False)
        return plan

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()

    def nbytes(self) -> int:
        """Host bytes of the keys and plans (approximate, ``_host_bytes``) plus the device
        bytes of the window tables they hold (each counted once; tables on "meta" hold none)."""
        with self._lock:
            entries = list(self._plans.values())
        tabs = {id(t): t for plan, _ in entries for t in _tensors(plan)}
        return sum(n for _, n in entries) + sum(t.untyped_storage().nbytes() for t in tabs.values()
                                                if t.device.type != "meta")
