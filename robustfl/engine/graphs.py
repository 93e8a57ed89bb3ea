"""CUDA graphs of the engine's steps: :func:`capture`, and :class:`GraphCache`, captured steps kept from
one call to the next (keyed on everything that changes the kernels: shapes, data, the options)."""
from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch


def capture(fn: Callable[[], Any], warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture ``fn()`` (no host synchronisation, fixed shapes, inputs in static tensors) as a CUDA graph
    after ``warmup`` eager calls on a side stream (as torch.cuda.graph's documentation asks); returns the
    graph and the outputs that every ``graph.replay()`` rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class GraphCache:
    """At most ``size`` entries, least recently used dropped first (``size`` 0: nothing is kept)."""

    def __init__(self) -> None:
        self._entries: collections.OrderedDict[Any, Any] = collections.OrderedDict()

    def take(self, key: Any) -> Any:
        """The entry of ``key`` (removed until :meth:`keep` puts it back), or None."""
        return self._entries.pop(key, None)

    def keep(self, key: Any, entry: Any, size: int) -> None:
        """Store ``entry`` as the most recently used, then drop the oldest beyond ``size``."""
        self._entries[key] = entry
        while len(self._entries) > size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
