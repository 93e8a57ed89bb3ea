"""Bhagoji et al.'s two crafting loops (:mod:`robustfl.attacks.backdoor`) for all attackers of a round
at once, on the stacked engine (:mod:`robustfl.engine.stacked`) that trains the benign clients.

:func:`robustfl.attacks.backdoor.alternating_minimisation` and
:func:`~robustfl.attacks.backdoor.explicit_boosting` optimise one model at a time through PyTorch's
layers (cuDNN, cuBLAS). Here the k attackers' weights are the rows of one ``(k, d)`` matrix: every
step is one stacked forward and backward pass (each attacker on its own mini-batch, or all on the
backdoor set) and one Adam step over the matrix (:func:`robustfl.engine.train.adam_step`, whose per-row
``active`` flag leaves an attacker untouched once its own loop has ended). The arithmetic of each
row is the single-model loop's (Eq. 7; tests/test_attacks_backdoor.py compares the two on the CPU
with dropout off); what differs:

* each attacker's mini-batches are drawn from its own generator exactly as the single-model loop
  draws them, but the dropout masks of all attackers come from one stream, seeded by the first
  attacker's generator (a mask is random either way; its distribution is the same);
* a partial mini-batch is padded to the batch size with a zero mask (the same mean cross-entropy);
* attackers with shorter shards stop iterating when their own iterations run out (inactive rows).

On CUDA the step is captured as a CUDA graph (as the single-model loops are) and replayed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from robustfl.attacks import backdoor as bd
from robustfl.engine import stacked
from robustfl.engine.adam import adam_rows
from robustfl.engine.common import masked_ce
from robustfl.engine.common import prepare_inputs as _as_input
from robustfl.engine.graphs import capture as _capture
from robustfl.engine.options import LAYOUTS, EngineOptions
from robustfl.params import ParamSpec


def rows_distance(v: torch.Tensor, form: str) -> torch.Tensor:
    """Eq. (7)'s distance of every row of ``v (k, d)``: ``||v_i||_2`` (``"norm"``) or
    ``0.5 ||v_i||_2^2`` (``"sq"``), as :func:`robustfl.attacks.backdoor._distance` for one row."""
    sq = v.pow(2).sum(1)
    return torch.sqrt(sq + bd._NORM_EPS) if form == "norm" else 0.5 * sq


def _rows_distance_grad(v: torch.Tensor, form: str) -> torch.Tensor:
    """The gradient of :func:`rows_distance` with respect to ``v``: ``v_i / sqrt(||v_i||^2 + eps)`` (``"norm"``)
    or ``v_i`` (``"sq"``), analytic instead of through autograd (three passes over ``(k, d)``, not six)."""
    if form == "sq":
        return v
    return v * torch.rsqrt(v.pow(2).sum(1, keepdim=True) + bd._NORM_EPS)


def _flat_grad(spec: ParamSpec, w: torch.Tensor, loss_fn) -> torch.Tensor:  # noqa: ANN001
    """The gradient ``(k, d)`` of ``loss_fn(params)`` at the weights ``w (k, d)``: one leaf per parameter
    (views of ``w``), their gradients concatenated (a gradient taken with respect to ``w`` itself would
    reach it through one full-size zero-filled tensor per parameter)."""
    views = spec.unflatten(w.detach())
    leaves = [views[n].requires_grad_() for n in spec.names]
    grads = torch.autograd.grad(loss_fn(dict(zip(spec.names, leaves))), leaves)
    return torch.cat([g.reshape(len(w), -1) for g in grads], 1)


def _row_ce(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
            mask: torch.Tensor, layout: str) -> torch.Tensor:
    """Each model's mean cross-entropy over its real samples, ``(k,)``: model i (``params[.][i]``) on
    ``x[i] (B, C, H, W)`` with labels ``y[i]`` and ``mask[i]`` (as :func:`robustfl.engine.train.masked_ce`)."""
    return masked_ce(stacked.stacked_logits(model, params, x, layout=layout), y, mask)


def _seed_dropout(model: nn.Module, generators: Sequence[torch.Generator]):  # noqa: ANN202
    """:func:`robustfl.attacks.backdoor._training_mode` for k attackers: each generator gives up the
    one seed it gives in the single-model loop (so their mini-batch streams stay the same); the first
    seeds the dropout of all."""
    seeds = [int(torch.randint(0, 2**62, (1,), generator=g)) for g in generators]
    return bd._training_mode(model, torch.Generator().manual_seed(seeds[0]))


def _schedule(sizes: Sequence[int], generators: Sequence[torch.Generator], batches: Sequence[int],
              batch_size: int, ls: int, offsets: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All mini-batches of all iterations, drawn up front in the order the single-model loop draws them
    (:func:`robustfl.attacks.backdoor._batches`): ``idx (T, ls, k, B)`` into the attackers' concatenated
    shards, ``mask (T, ls, k, B)`` and ``live (T, k)`` (attacker i iterates ``batches[i] / ls`` times)."""
    k, t_max = len(sizes), max(batches) // ls
    idx = torch.zeros(t_max, ls, k, batch_size, dtype=torch.long)
    mask = torch.zeros(t_max, ls, k, batch_size)
    live = torch.zeros(t_max, k)
    for i, (n, g, nb) in enumerate(zip(sizes, generators, batches)):
        stream = bd._batches(n, batch_size, g, torch.device("cpu"))
        for s in range(nb):
            b = next(stream)
            idx[s // ls, s % ls, i, : len(b)] = b + offsets[i]
            idx[s // ls, s % ls, i, len(b):] = offsets[i]  # padding reads the attacker's own first sample
            mask[s // ls, s % ls, i, : len(b)] = 1.0
        live[: nb // ls, i] = 1.0
    return idx, mask, live


def _use_graph(device: torch.device, steps: int, cuda_graph: bool | None, engine: EngineOptions | None) -> bool:
    if cuda_graph is None:
        return bd._use_graph(engine, device, steps)
    return bool(cuda_graph)


def alternating_minimisation_many(
    model: nn.Module, theta_flat: torch.Tensor, owns: Sequence[tuple[torch.Tensor, torch.Tensor]],
    x_bd: torch.Tensor, y_bd: torch.Tensor, ref_deltas: torch.Tensor | None, *, boost: float, rho: float,
    generators: Sequence[torch.Generator], layout: str, benign_epochs: float = 2.0, ls: int = 1,
    mal_steps: int = 1, iterations: int | None = None, lr: float = 1e-3, batch_size: int = 64,
    dist: str = "norm", order: str = "benign_first", cuda_graph: bool | None = None,
    starts: torch.Tensor | None = None, project: tuple[torch.Tensor, float] | None = None,
    engine: EngineOptions | None = None,
) -> torch.Tensor:
    """:func:`robustfl.attacks.backdoor.alternating_minimisation` (Eq. 7 with explicit boosting) for
    ``k = len(owns)`` attackers at once; attacker i trains on its shard ``owns[i]``, pulled towards
    ``theta + ref_deltas[i]`` (``None``: theta), with its mini-batches drawn from ``generators[i]``,
    starting from ``theta + starts[i]`` (``None``: theta) and, with ``project=(centres, r)``, projected
    after every step onto the ball of radius ``r`` around ``theta + centres[i]``.
    Returns the updates ``(k, d)``. ``layout``: a :data:`robustfl.engine.stacked.LAYOUTS` name."""
    if dist not in ("norm", "sq") or order not in ("benign_first", "mal_first"):
        raise ValueError(f"bad dist {dist!r} or order {order!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    k = len(owns)
    if len(generators) != k:
        raise ValueError(f"{len(generators)} generators for {k} attackers")
    device = theta_flat.device
    spec = ParamSpec(model)
    theta = theta_flat.detach().to(device=device, dtype=torch.float32)
    d = theta.numel()
    if k == 0:
        return theta.new_zeros(0, d)
    xs = [_as_input(x.to(device)) for x, _ in owns]
    sizes = [len(y) for _, y in owns]
    if min(sizes) == 0:
        raise ValueError("an attacker's shard is empty")
    x_all, y_all = torch.cat(xs), torch.cat([y.to(device) for _, y in owns])
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]]
    x_bd, y_bd = _as_input(x_bd.to(device)), y_bd.to(device)
    ref = theta.expand(k, d) if ref_deltas is None else theta + ref_deltas.detach().to(theta).view(k, d)
    shape = x_all.shape[1:]
    steps = [max(1, round(benign_epochs * math.ceil(n / batch_size))) for n in sizes]
    n_iter = [math.ceil(s / ls) if iterations is None else int(iterations) for s in steps]
    do_mal = mal_steps > 0 and len(y_bd) > 0
    xb_bd = x_bd.unsqueeze(0).expand(k, *x_bd.shape).contiguous()
    yb_bd, mb_bd = y_bd.expand(k, -1), torch.ones(k, len(y_bd), device=device)

    w = (theta.expand(k, d) if starts is None else theta + starts.detach().to(theta).view(k, d)).clone()
    ben_state = (torch.zeros_like(w), torch.zeros_like(w), torch.zeros(k, device=device))
    mal_state = (torch.zeros_like(w), torch.zeros_like(w), torch.zeros(k, device=device))
    if project is not None:
        p_centre = theta + project[0].detach().to(theta).view(-1, d)
        p_radius = torch.full((k, 1), float(project[1]), device=device)
    s_idx = torch.zeros(ls, k, batch_size, dtype=torch.long, device=device)
    s_mask = torch.zeros(ls, k, batch_size, device=device)
    s_live = torch.zeros(k, device=device)
    flag = torch.empty(k, device=device)

    def stealth(j: int) -> None:
        flat_idx = s_idx[j].reshape(-1)
        xb, yb = x_all[flat_idx].view(k, batch_size, *shape), y_all[flat_idx].view(k, batch_size)
        g = _flat_grad(spec, w, lambda params: _row_ce(model, params, xb, yb, s_mask[j], layout).sum())
        if rho > 0:  # Eq. (7)'s distance term, differentiated by hand
            g.add_(_rows_distance_grad(w - ref, dist), alpha=rho)
        adam_rows(w, g, *ben_state, s_live, lr)
        if project is not None:
            bd.project_rows_(w, p_centre, p_radius)

    def malicious() -> None:
        active = s_live
        for _ in range(mal_steps):
            def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
                rows = _row_ce(model, params, xb_bd, yb_bd, mb_bd, layout)
                flag.copy_((rows > 0.0).float())  # NaN or 0 -> skip, per attacker
                return rows.sum()
            g = _flat_grad(spec, w, loss_fn)
            active = active * flag
            start = w.clone()
            adam_rows(w, g, *mal_state, active, lr)
            w.sub_(start).mul_(boost).add_(start)  # start + boost * (w - start), in place
            if project is not None:
                bd.project_rows_(w, p_centre, p_radius)

    def iteration() -> None:
        if order == "mal_first" and do_mal:
            malicious()
        for j in range(ls):
            stealth(j)
        if order == "benign_first" and do_mal:
            malicious()

    with _seed_dropout(model, generators):
        idx, mask, live = _schedule(sizes, generators, [t * ls for t in n_iter], batch_size, ls, offsets)
        idx, mask, live = idx.to(device), mask.to(device), live.to(device)

        def load(t: int) -> None:
            s_idx.copy_(idx[t])
            s_mask.copy_(mask[t])
            s_live.copy_(live[t])

        graph = None
        if _use_graph(device, len(live), cuda_graph, engine):
            load(0)
            saved = [t.clone() for t in (w, *ben_state, *mal_state)]
            graph, _ = _capture(iteration)  # the warm-up calls step w and the Adam states: restore them
            for t, v in zip((w, *ben_state, *mal_state), saved):
                t.copy_(v)
        for t in range(len(live)):
            load(t)
            if graph is not None:
                graph.replay()
            else:
                iteration()
    return w - theta


def explicit_boosting_many(
    model: nn.Module, theta_flat: torch.Tensor, x_bd: torch.Tensor, y_bd: torch.Tensor, *, boost: float,
    generators: Sequence[torch.Generator], layout: str, min_steps: int = 2, tol: float = 1e-6,
    max_steps: int = 1000, check_every: int = 1, lr: float = 1e-3, cuda_graph: bool | None = None,
    engine: EngineOptions | None = None,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """:func:`robustfl.attacks.backdoor.explicit_boosting` for ``k = len(generators)`` attackers at once:
    every attacker takes full-batch Adam steps on the backdoor set from ``theta`` until its own loss is
    ``<= tol`` (read every ``check_every`` steps, after at least ``min_steps``) or ``max_steps``; then
    its row stops (its last step undone, as the single loop does not take it). Returns
    ``(boost * (w - theta) (k, d), [{"steps", "mal_loss"}] * k)``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    k = len(generators)
    device = theta_flat.device
    spec = ParamSpec(model)
    theta = theta_flat.detach().to(device=device, dtype=torch.float32)
    d = theta.numel()
    if k == 0:
        return theta.new_zeros(0, d), []
    x_bd, y_bd = _as_input(x_bd.to(device)), y_bd.to(device)
    xb = x_bd.unsqueeze(0).expand(k, *x_bd.shape).contiguous()
    yb, mb = y_bd.expand(k, -1), torch.ones(k, len(y_bd), device=device)
    w = theta.expand(k, d).clone()
    state = (torch.zeros_like(w), torch.zeros_like(w), torch.zeros(k, device=device))
    w_prev = torch.empty_like(w)
    loss_t = torch.zeros(k, device=device)
    running = torch.ones(k, device=device)

    def step_fn() -> None:
        w_prev.copy_(w)

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            rows = _row_ce(model, params, xb, yb, mb, layout)
            loss_t.copy_(rows.detach())
            return rows.sum()
        adam_rows(w, _flat_grad(spec, w, loss_fn), *state, running, lr)

    use_graph = _use_graph(device, max_steps, cuda_graph, engine)
    loss_val, steps = [float("inf")] * k, [float(max_steps)] * k
    live = set(range(k))
    step, graph = 0, None
    with _seed_dropout(model, generators):
        while step < max_steps and live:
            if use_graph and graph is None and step >= (engine or bd.DEFAULT_ENGINE).attack_graph_min_steps:
                saved = [t.clone() for t in (w, *state)]
                graph, _ = _capture(step_fn)
                for t, v in zip((w, *state), saved):
                    t.copy_(v)
            if graph is None:
                step_fn()
            else:
                graph.replay()
            if step % check_every == 0:
                vals = loss_t.tolist()
                for i in live:
                    loss_val[i] = vals[i]
            stop = sorted(i for i in live if step >= min_steps and loss_val[i] <= tol)
            if stop:  # these rows stop before this step's update
                rows = torch.tensor(stop, device=device)
                w[rows] = w_prev[rows]
                running[rows] = 0.0
                for i in stop:
                    steps[i] = float(step)
                live -= set(stop)
            step += 1
        if live:  # max_steps reached: the loss of the weights they stopped at (logged, as the single loop)
            with torch.no_grad():
                vals = _row_ce(model, spec.unflatten(w), xb, yb, mb, layout).tolist()
            for i in live:
                loss_val[i] = vals[i]
                bd.log.debug("explicit_boosting: stopped at max_steps=%d with backdoor loss %.3g", max_steps, vals[i])
    return boost * (w - theta), [{"steps": s, "mal_loss": v} for s, v in zip(steps, loss_val)]
