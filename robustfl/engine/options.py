"""How the engine computes: :class:`EngineOptions`, one immutable value that every engine call takes.

``kind`` picks the engine (``vectorised``: all clients of a call in one stacked step; ``sequential``: one
model and one ``torch.optim.Adam`` per client, the reference); ``conv`` how the vectorised engine computes
its layers (``vmap``: ``torch.func.vmap`` over the per-client models, any model; a layout of
:mod:`robustfl.engine.stacked`: the forward pass written out on stacked parameters); ``cuda_graph``
whether a stacked step is captured as a CUDA graph. ``auto`` values are settled by :meth:`resolve` from
the model, the device and the precision (the measured table :data:`AUTO_CUDA_CONV`). The other fields
are the engine's own knobs, with the measured defaults.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: the engines: ``auto`` = vectorised on CUDA, sequential on the CPU
KINDS = ("auto", "vectorised", "sequential")
#: the stacked engine's layouts (robustfl.engine.stacked)
LAYOUTS = ("grouped", "channels_last", "triton")
#: the vectorised engine's ``conv``: ``vmap`` or a stacked layout (``auto``: :meth:`EngineOptions.resolve`)
CONVS = ("auto", "vmap", *LAYOUTS)
#: ``conv`` values of earlier versions: why each is gone
REMOVED_CONVS = {
    "cudnn": "'cudnn' is now called 'vmap' (torch.func.vmap over the per-client models)",
    "matmul": "'matmul' (im2col + batched GEMM) was removed: 2-5.5x slower than vmap's grouped convolution "
              "(bench/results/vmap_conv_paths_*_h100.json); use 'vmap'",
    "loop": "'loop' (one convolution per client) was removed: slower than the grouped layouts for every model "
            "(bench/results/stacked_layouts_*_h100.json); use 'grouped'",
}
#: the run precisions (robustfl.engine.train.precision_context says what each computes in)
PRECISIONS = ("fp32", "tf32", "bf16")
#: the fields a run configuration sets (RunConfig.engine); the others keep their defaults there
CONFIG_KEYS = ("kind", "conv", "cuda_graph")

#: what ``conv="auto"`` means on a CUDA device, per model class, in fp32: the fastest layout with CUDA
#: graphs for the paper's models. Among cuDNN's layouts grouped (fmnist) and channels-last (CIFAR-10,
#: Kather) were fastest (bench/results/stacked_layouts_*_h100.json); the implicit-GEMM Triton kernels
#: beat both for every model at 10 and at 90/30 clients (triton_conv_step_*_h200.json).
AUTO_CUDA_CONV = {"FMNISTNet": "triton", "CIFARNet": "triton", "KatherNet": "triton"}
#: in bf16 (channels-last the fastest cuDNN layout; Triton faster still, except CIFAR-10 at 10 clients,
#: within 6%: triton_conv_step_*_h200.json)
AUTO_CUDA_CONV_BF16 = "triton"


@dataclass(frozen=True)
class EngineOptions:
    """How many models at once are trained or crafted, and with which kernels (module docstring)."""

    kind: str = "auto"  # auto | vectorised | sequential
    conv: str = "auto"  # auto | vmap | grouped | channels_last | triton
    cuda_graph: bool | None = None  # capture the stacked training step as a CUDA graph (None: where it applies)
    skip_idle: bool = True  # skip clients whose batches have run out (unequal shards, packed runs)
    graph_cache: int = 2  # CUDA-graph sets kept from one training call to the next (0: none)
    graph_min_steps: int = 8  # capture a graph for a client count only if this many steps use it
    stacked_attacks: bool = True  # craft all attackers at once where training runs a stacked layout
    attack_cuda_graph: bool = True  # capture the crafting loops' iterations as CUDA graphs (CUDA only)
    attack_graph_min_steps: int = 8  # ... when at least this many iterations run

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> None:
            raise ValueError(f"engine option {key!r}: {msg}")

        if self.kind not in KINDS:
            bad("kind", f"must be one of {list(KINDS)}, got {self.kind!r}")
        if self.conv in REMOVED_CONVS:
            bad("conv", REMOVED_CONVS[self.conv])
        if self.conv not in CONVS:
            bad("conv", f"must be one of {list(CONVS)}, got {self.conv!r}")
        if self.cuda_graph not in (None, True, False):
            bad("cuda_graph", f"must be true, false or null (auto), got {self.cuda_graph!r}")
        if self.cuda_graph and self.conv == "vmap":
            bad("cuda_graph", f"CUDA graphs need a stacked layout {list(LAYOUTS)} (or conv auto), not 'vmap'")
        for key in ("skip_idle", "stacked_attacks", "attack_cuda_graph"):
            if not isinstance(getattr(self, key), bool):
                bad(key, f"must be true or false, got {getattr(self, key)!r}")
        for key in ("graph_cache", "graph_min_steps", "attack_graph_min_steps"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(key, f"must be an integer >= 0, got {v!r}")

    @classmethod
    def from_config(cls, mapping: Mapping[str, Any] | None) -> EngineOptions:
        """The options a run configuration's ``engine`` mapping names (keys :data:`CONFIG_KEYS`)."""
        mapping = dict(mapping or {})
        unknown = sorted(set(mapping) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"engine option(s) {unknown} unknown; known: {list(CONFIG_KEYS)}")
        return cls(**mapping)

    def config(self) -> dict[str, Any]:
        """The :data:`CONFIG_KEYS` fields as a plain mapping (RunConfig.engine)."""
        return {k: getattr(self, k) for k in CONFIG_KEYS}

    def replace(self, **changes: Any) -> EngineOptions:
        return dataclasses.replace(self, **changes)

    @property
    def resolved(self) -> bool:
        return self.kind != "auto" and self.conv != "auto" and self.cuda_graph is not None

    @property
    def layout(self) -> str | None:
        """The stacked layout the vectorised engine runs, or None (vmap, the sequential engine)."""
        return self.conv if self.kind == "vectorised" and self.conv in LAYOUTS else None

    def packed(self) -> EngineOptions:
        """The options of one training call for several runs packed together (the vectorised engine)."""
        return dataclasses.replace(self, kind="vectorised")

    def report(self) -> dict[str, Any]:
        """What run.json records of resolved options: the vectorised engine's conv and CUDA graphs."""
        return {"engine_conv": self.conv, "engine_cuda_graph": self.cuda_graph} if self.kind == "vectorised" else {}

    def resolve(self, model: Any, device: Any, precision: str = "fp32") -> EngineOptions:
        """These options with ``auto`` settled for ``model`` on ``device`` (a ``torch.device``) in
        ``precision``: ``kind`` vectorised on CUDA, else sequential; ``conv`` on CUDA the layout of
        :data:`AUTO_CUDA_CONV` for the model's class (``grouped`` for others; :data:`AUTO_CUDA_CONV_BF16`
        in bf16; ``grouped`` where that is ``triton`` and :func:`triton_ready` says no), on the CPU or for a
        model the stacked engine cannot compute ``vmap``; ``cuda_graph`` on wherever it applies (CUDA and
        a stacked layout)."""
        from robustfl.engine import stacked

        cuda = device.type == "cuda"
        kind = ("vectorised" if cuda else "sequential") if self.kind == "auto" else self.kind
        conv = self.conv
        if conv == "auto":
            if cuda and stacked.supports(model):
                conv = AUTO_CUDA_CONV_BF16 if precision == "bf16" else AUTO_CUDA_CONV.get(type(model).__name__, "grouped")
                if conv == "triton" and not triton_ready(model):
                    conv = "grouped"
            else:
                conv = "vmap"
        graph = self.cuda_graph
        if graph is None:
            graph = cuda and conv in LAYOUTS
        return dataclasses.replace(self, kind=kind, conv=conv, cuda_graph=bool(graph))


def triton_ready(model: Any) -> bool:
    """Whether the ``triton`` layout can compute ``model``: Triton is installed and every convolution is
    one that :func:`robustfl.engine.triton_conv.supported` accepts."""
    from torch import nn

    from robustfl.engine import stacked

    if importlib.util.find_spec("triton") is None or not stacked.supports(model):
        return False
    from robustfl.engine import triton_conv

    return all(triton_conv.supported(m) for _, m in stacked.layers(model) if isinstance(m, nn.Conv2d))
