"""k models of one architecture as the rows of one ``(k, d)`` weight matrix, for optimisation loops that
craft several models at once (the backdoor attackers' loops, robustfl.attacks.backdoor).

:class:`ModelRows` gives such a loop what depends on how the models are computed -- their logits, the
gradient of a loss with respect to the matrix, Adam on its rows, dropout's random stream and CUDA-graph
capture -- in one of two ways (its ``layout``):

* ``None``: one model (k = 1) through PyTorch's own layers (:func:`model_forward`), what the sequential
  engine trains with;
* a stacked layout (robustfl.engine.stacked): all k models in one forward and backward pass, each on its
  own inputs (the rows' losses share no parameter, so the gradient of their sum stacks the rows' own).

Adam: :func:`robustfl.engine.adam.adam_rows` (per-row step counts, an inactive row untouched) or
:func:`robustfl.engine.adam.adam_step_counted` (every row the same count).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from robustfl.engine import stacked
from robustfl.engine.adam import adam_rows, adam_step_counted
from robustfl.engine.graphs import capture
from robustfl.engine.options import LAYOUTS, EngineOptions
from robustfl.params import ParamSpec


def _sub_params(params: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix + ".")}


def model_forward(model: nn.Module, params: Mapping[str, torch.Tensor],
                  x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(plr, logits)`` of the template ``model`` run with the parameters ``params``; the PLR is
    ``model.features(x)`` (None for a model without the features/head split). One forward pass."""
    if isinstance(getattr(model, "features", None), nn.Module) and isinstance(getattr(model, "head", None), nn.Module):
        r = functional_call(model.features, _sub_params(params, "features"), (x,))
        return r, functional_call(model.head, _sub_params(params, "head"), (r,))
    return None, functional_call(model, dict(params), (x,))


#: a loss of the rows: (flat weights (k, d), their parameters by name (k, ...)) -> scalar
RowsLoss = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


class ModelRows:
    """k models of ``model``'s architecture, the rows of a ``(k, d)`` matrix (module docstring).
    ``layout`` None: k must be 1; ``options``: the CUDA-graph settings of the loops
    (``attack_cuda_graph``, ``attack_graph_min_steps``)."""

    def __init__(self, model: nn.Module, k: int, device: torch.device | str, layout: str | None = None,
                 options: EngineOptions | None = None) -> None:
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"layout must be None or one of {LAYOUTS}, got {layout!r}")
        if layout is None and k != 1:
            raise ValueError(f"without a stacked layout the rows are one model, got k = {k}")
        self.model, self.k, self.layout = model, k, layout
        self.device = torch.device(device)
        self.spec = ParamSpec(model)
        self.options = options or EngineOptions()

    @staticmethod
    def layout_for(model: nn.Module, options: EngineOptions | None, device: torch.device | str) -> str | None:
        """The stacked layout to craft several models with: the one ``options`` train with (resolved for
        ``model`` on ``device``) where ``options.stacked_attacks`` and the stacked engine computes
        ``model``; else None (one model at a time)."""
        if options is None:
            return None
        opts = options.resolve(model, torch.device(device))
        return opts.layout if opts.stacked_attacks and stacked.supports(model) else None

    # -- computing the rows
    def forward(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(plr or None, logits (k, B, classes))`` of row i on its own inputs ``x[i]``; ``params[name]``
        is ``(k, *shape)``. The PLR only for one model (``layout`` None)."""
        if self.layout is None:
            plr, logits = model_forward(self.model, {n: p[0] for n, p in params.items()}, x[0])
            return (None if plr is None else plr.unsqueeze(0)), logits.unsqueeze(0)
        return None, stacked.stacked_logits(self.model, dict(params), x, layout=self.layout)

    def grad(self, w: torch.Tensor, loss_fn: RowsLoss) -> torch.Tensor:
        """The gradient ``(k, d)`` of ``loss_fn(flat, params)`` at the weights ``w (k, d)``, taken as
        constants: one leaf per parameter (views of ``w``; a gradient with respect to ``w`` itself would
        reach it through one full-size zero-filled tensor per parameter), ``flat`` rebuilt from them."""
        views = self.spec.unflatten(w.detach())
        leaves = [views[n].requires_grad_() for n in self.spec.names]
        flat = torch.cat([t.reshape(self.k, -1) for t in leaves], 1)
        grads = torch.autograd.grad(loss_fn(flat, dict(zip(self.spec.names, leaves))), leaves)
        return torch.cat([g.reshape(self.k, -1) for g in grads], 1)

    @torch.no_grad()
    def params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameters of the rows ``w (k, d)`` by name (views)."""
        return self.spec.unflatten(w)

    # -- Adam on the rows
    def adam(self, w: torch.Tensor, g: torch.Tensor, state: Sequence[torch.Tensor], active: torch.Tensor,
             lr: float) -> None:
        """One Adam step of the rows where ``active`` is 1 (``state``: first and second moments, per-row
        step counts; :func:`robustfl.engine.adam.adam_rows`)."""
        adam_rows(w, g, state[0], state[1], state[2], active, lr)

    def adam_all(self, w: torch.Tensor, g: torch.Tensor, state: Sequence[torch.Tensor], lr: float) -> None:
        """One Adam step of every row, all with the same step count ``state[2]`` (a one-element tensor;
        :func:`robustfl.engine.adam.adam_step_counted`: on the CPU torch.optim.Adam's arithmetic)."""
        adam_step_counted([w], [g], [state[0]], [state[1]], state[2], lr)

    @staticmethod
    def adam_state(w: torch.Tensor, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zero moments and step counts for ``w`` (per row, or one count for all)."""
        steps = torch.zeros(len(w) if per_row else (), device=w.device)
        return torch.zeros_like(w), torch.zeros_like(w), steps

    # -- randomness and CUDA graphs
    @contextlib.contextmanager
    def training(self, generators: Sequence[torch.Generator]) -> Iterator[None]:
        """The template in training mode, dropout drawing from a stream seeded by the first row's
        generator; every generator gives up one seed (so their later draws are those of a single model's
        loop); the global RNG and the template's mode are left as they were."""
        seeds = [int(torch.randint(0, 2**62, (1,), generator=g)) for g in generators]
        was = self.model.training
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seeds[0])
            self.model.train(True)
            try:
                yield
            finally:
                self.model.train(was)

    def use_graph(self, iterations: int) -> bool:
        """Whether a loop of ``iterations`` captures its iteration as a CUDA graph: on CUDA, with
        ``options.attack_cuda_graph``, from ``options.attack_graph_min_steps`` iterations on (capture
        costs about three)."""
        return (self.options.attack_cuda_graph and self.device.type == "cuda"
                and iterations >= self.options.attack_graph_min_steps)

    @property
    def graph_after(self) -> int:
        """Iterations a loop whose end it cannot foresee runs eagerly before capturing one."""
        return self.options.attack_graph_min_steps

    @staticmethod
    def capture(fn: Callable[[], object], restore: Sequence[torch.Tensor]) -> torch.cuda.CUDAGraph:
        """``fn`` captured as a CUDA graph (:func:`robustfl.engine.graphs.capture`); the tensors
        ``restore`` (the loop's state, which the warm-up calls step) are put back as they were."""
        saved = [t.clone() for t in restore]
        graph, _ = capture(fn)
        for t, v in zip(restore, saved):
            t.copy_(v)
        return graph
