"""ByzFL's reference implementations for the cross-checks, imported without running ``byzfl/__init__`` (which
pulls in torchvision and the benchmark framework: ~10 s of imports). The temporary ``byzfl.*`` entries are
removed from ``sys.modules`` again, so a later plain ``import byzfl`` elsewhere is unaffected."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from types import ModuleType


def load_byzfl(module: str = "aggregators.aggregators") -> ModuleType | None:
    """``byzfl.<module>`` (e.g. ``aggregators.aggregators``, ``aggregators.preaggregators``), or None when
    byzfl is not installed (it is a test dependency: pyproject's ``test`` extra)."""
    if "byzfl" in sys.modules and hasattr(sys.modules["byzfl"], "Krum"):  # a full import already happened
        return importlib.import_module(f"byzfl.{module}")
    spec = importlib.util.find_spec("byzfl")
    if spec is None or not spec.submodule_search_locations:
        return None
    before = set(sys.modules)
    stub = types.ModuleType("byzfl")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["byzfl"] = stub
    try:
        return importlib.import_module(f"byzfl.{module}")
    finally:
        for name in set(sys.modules) - before:
            if name == "byzfl" or name.startswith("byzfl."):
                del sys.modules[name]
