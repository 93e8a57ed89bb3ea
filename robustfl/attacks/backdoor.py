"""Targeted model poisoning of Bhagoji et al. (ICML 2019), as FLARE uses it (Section 7.1.1, Eq. 7):

    argmin_{delta_mal}  L(D_mal) + lambda L(D_train) + rho ||delta_mal - mean benign delta||        (7)

Two registered attacks, after the authors' run scripts (docs/decisions/attacks-backdoor.md):

* ``krum_backdoor`` (Attack-Krum-Backdoor): **alternating minimisation with a distance (stealth) term**
  (the authors' ``converge_train_alternate_dist_self``): benign mini-batch steps on the attacker's own
  shard with the rho-term, each followed by one malicious step on the backdoor set whose weight change is
  explicitly boosted; :func:`alternating_minimisation`.
* ``median_backdoor`` (Attack-Coomed-Backdoor): Bhagoji's **baseline targeted attack with explicit
  boosting** (the authors' ``converge``): train on the backdoor set alone until its loss has converged,
  then multiply the update by the boost factor; :func:`explicit_boosting`. No benign data, no distance
  term -- "the local training process at attackers is a little different" (FLARE Sec. 7.1.1).

Every attacker crafts its update from its own shard (``ctx.attacker_data[i]``), the backdoor set, the
global parameters and the mean of the round's benign updates (white-box, Section 3.2); nothing else.
Attackers draw their own random streams from ``ctx.generator`` up front, so attacker i's update does
not depend on another attacker's data.

Options (``ctx.params``), with defaults for ``variant="paper"`` / ``variant="code"``:

=================  ============================  =====================================================
key                paper (default)               code (authors' TF code)
=================  ============================  =====================================================
boost              "n" (= ctx.n_clients)         10 (``mal_boost``)
rho                1e-4                          1e-4
dist               "norm": rho ||w - w_ref||     "sq": rho * 0.5 ||w - w_ref||^2 (``tf.nn.l2_loss``)
stealth_ref        "benign_mean": theta+mean     "self": theta + the attacker's own benign update
                   benign delta (white-box)      (E local epochs on its shard, ``dist_self``)
benign_epochs      2 (``mal_E``)                 2
ls                 1 benign steps / alternation  1
mal_steps          1 malicious steps / altern.   1
iterations         None -> ceil(steps(benign_epochs) / ls)
order              "benign_first"                "benign_first"
lr, batch_size     ctx.lr, ctx.batch_size        same
min_steps          2 (converge: at least mal_E steps)
tol                1e-6 (converge: stop when L(D_mal) <= tol)
max_steps          1000 (converge: safety cap; the code has none)
check_every        1                             100 (the code reads the loss every 100 steps)
add_benign         False (median_backdoor: add the attacker's own benign update, Bhagoji ``add_ben``)
share              False: every attacker crafts  True: attacker 0 crafts, the others send copies
                   on its own shard              (``mal_agent_copy``)
boost_at           "step": each malicious step's change is boosted (the code); "final": the loop runs
                   unboosted and the attacker's own change ``delta - start`` is boosted once at the end
                   (Bhagoji's explicit boosting of the update)
start              "theta": the loop starts from the global model; "benign_mean": from theta + the
                   round's mean benign update (white-box)
radius             None; r > 0: the update is projected onto the ball of radius r * s around the mean
                   benign update, s = the benign spread (:func:`benign_spread`), so that it lies inside
                   the benign updates' own scatter (the hard-constraint form of Eq. 7's rho-term)
project_at         "step": the projection also runs after every step of the loop (projected gradient
                   descent); "final": once, on the returned update. Either way the returned update is
                   within r * s of the mean benign update
=================  ============================  =====================================================
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from robustfl.attacks import register_attack
from robustfl.attacks.base import AttackContext
from robustfl.engine import EngineOptions, ModelRows, masked_ce, model_forward, prepare_inputs
from robustfl.params import ParamSpec

log = logging.getLogger(__name__)

NORM_EPS = 1e-12  # inside sqrt: keeps the gradient of ||v|| finite at v = 0

# extra_loss(plr (B, o) or None, logits (B, c), y (B,), idx (B,) indices into x_own) -> scalar
ExtraLoss = Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {"boost": "n", "dist": "norm", "stealth_ref": "benign_mean", "check_every": 1, "share": False},
    "code": {"boost": 10.0, "dist": "sq", "stealth_ref": "self", "check_every": 100, "share": True},
}
COMMON: dict[str, Any] = {
    "rho": 1e-4, "benign_epochs": 2.0, "ls": 1, "mal_steps": 1, "iterations": None,
    "order": "benign_first", "lr": None, "batch_size": None,
    "min_steps": 2, "tol": 1e-6, "max_steps": 1000, "add_benign": False, "self_epochs": None,
    "boost_at": "step", "start": "theta", "radius": None, "project_at": "step",
}


# --------------------------------------------------------------------------------------------- helpers
def resolve_options(ctx: AttackContext, extra_defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``ctx.params`` over the variant's defaults; validates names and values."""
    params = dict(ctx.params)
    variant = params.pop("variant", "paper")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    opts: dict[str, Any] = {**COMMON, **VARIANTS[variant], **dict(extra_defaults or {})}
    unknown = set(params) - set(opts)
    if unknown:
        raise ValueError(f"unknown backdoor attack option(s) {sorted(unknown)}; known: {sorted(opts)}")
    opts.update(params)
    opts["variant"] = variant
    if opts["boost"] == "n":
        opts["boost"] = float(ctx.n_clients)
    opts["boost"] = float(opts["boost"])
    opts["lr"] = float(ctx.lr if opts["lr"] is None else opts["lr"])
    opts["batch_size"] = int(ctx.batch_size if opts["batch_size"] is None else opts["batch_size"])
    opts["self_epochs"] = float(ctx.local_epochs if opts["self_epochs"] is None else opts["self_epochs"])
    if opts["dist"] not in ("norm", "sq"):
        raise ValueError(f"dist must be 'norm' or 'sq', got {opts['dist']!r}")
    if opts["stealth_ref"] not in ("benign_mean", "self"):
        raise ValueError(f"stealth_ref must be 'benign_mean' or 'self', got {opts['stealth_ref']!r}")
    if opts["order"] not in ("benign_first", "mal_first"):
        raise ValueError(f"order must be 'benign_first' or 'mal_first', got {opts['order']!r}")
    if opts["rho"] < 0 or opts["boost"] < 0 or opts["ls"] < 1 or opts["mal_steps"] < 0:
        raise ValueError("need rho >= 0, boost >= 0, ls >= 1, mal_steps >= 0")
    for key, allowed in (("boost_at", ("step", "final")), ("start", ("theta", "benign_mean")),
                         ("project_at", ("step", "final"))):
        if opts[key] not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {opts[key]!r}")
    r = opts["radius"]
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0):
        raise ValueError(f"radius must be null or a number > 0 (a multiple of the benign spread), got {r!r}")
    return opts


def attacker_generators(ctx: AttackContext) -> list[torch.Generator]:
    """One CPU generator per attacker, all seeded from ``ctx.generator`` before any attacker runs."""
    g = ctx.generator
    if g is None:
        g = torch.Generator().manual_seed(1_000_003 * (ctx.round + 1))
    seeds = torch.randint(0, 2**62, (ctx.n_attackers,), generator=g, device=g.device).tolist()
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def check_context(ctx: AttackContext) -> None:
    if len(ctx.attacker_data) != ctx.n_attackers:
        raise ValueError(f"attacker_data has {len(ctx.attacker_data)} shards for {ctx.n_attackers} attackers")
    if ctx.backdoor_x is None or ctx.backdoor_y is None or len(ctx.backdoor_y) == 0:
        raise ValueError("a backdoor attack needs a non-empty backdoor set (ctx.backdoor_x, ctx.backdoor_y)")
    if ctx.benign_updates.dim() != 2 or ctx.benign_updates.shape[1] != ctx.global_flat.numel():
        raise ValueError("ctx.benign_updates must be (n_ben, d) with d = len(ctx.global_flat)")


def mean_benign_delta(ctx: AttackContext) -> torch.Tensor:
    """The mean benign update of the round (white-box knowledge, Section 3.2); 0 when there is none."""
    if ctx.benign_updates.shape[0] == 0:
        return torch.zeros_like(ctx.global_flat)
    return ctx.benign_updates.mean(0).to(ctx.global_flat)


def benign_spread(benign_updates: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(mean, s)`` of the round's benign updates ``(n_ben, d)``: their mean and their spread
    ``s = sqrt(mean_j ||delta_j - mean||^2)``, the RMS distance of a benign update to the mean.

    Krum (Blanchard et al. 2017) scores an update by its squared distances to its nearest neighbours; an
    update at distance ``r s`` from the mean is about ``(1 + r^2) s^2`` from a benign update, a benign
    one about ``2 s^2`` from another, so ``r < 1`` is what makes an update more central than the benign
    ones. Needs at least two benign updates."""
    if benign_updates.dim() != 2 or benign_updates.shape[0] < 2:
        raise ValueError("the benign spread needs at least two benign updates of the round, got "
                         f"{tuple(benign_updates.shape)}")
    x = benign_updates.double()
    mean = x.mean(0)
    s = float((x - mean).pow(2).sum(1).mean().sqrt())
    return mean.to(benign_updates.dtype), s


def project_rows_(w: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """In place, every row of ``w (k, d)`` onto the ball of radius ``radius`` (a tensor broadcasting to
    ``(k, 1)``) around ``centre`` (``(d,)`` or ``(k, d)``): ``c + (w - c) r / ||w - c||`` where
    ``||w - c|| > r``; rows inside the ball are left bit for bit. Reads nothing back to the host (it runs
    inside captured CUDA graphs)."""
    v = w - centre
    scale = radius / torch.sqrt(v.pow(2).sum(-1, keepdim=True) + NORM_EPS)
    w.copy_(torch.where(scale < 1.0, centre + v * scale, w))
    return w


@torch.no_grad()
def plr_with(model: nn.Module, flat: torch.Tensor, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """PLRs ``(N, o)`` of the template with flat parameters ``flat`` (eval mode, no dropout)."""
    spec = ParamSpec(model)
    params = spec.unflatten(flat)
    was = model.training
    model.eval()
    try:
        out = [model_forward(model, params, prepare_inputs(x[i:i + chunk]))[0] for i in range(0, len(x), chunk)]
    finally:
        model.train(was)
    if out and out[0] is None:
        raise ValueError("the model has no features/head split, so it has no PLR")
    return torch.cat(out) if out else x.new_zeros(0)


def batch_stream(n: int, batch_size: int, generator: torch.Generator,
                 device: torch.device) -> Iterator[torch.Tensor]:
    """Endless stream of mini-batch indices: per epoch a fresh permutation cut into batches (the last one
    partial), as the benign clients train (robustfl.engine.batch_plan)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for b in torch.split(perm, batch_size):
            yield b.to(device)


def distance_rows(v: torch.Tensor, form: str) -> torch.Tensor:
    """Eq. (7)'s distance of every row of ``v (k, d)``: ``||v_i||_2`` (``"norm"``) or ``0.5 ||v_i||_2^2``
    (``"sq"``, the authors' ``tf.nn.l2_loss``)."""
    sq = v.pow(2).sum(-1)
    return torch.sqrt(sq + NORM_EPS) if form == "norm" else 0.5 * sq


def batch_schedule(sizes: Sequence[int], generators: Sequence[torch.Generator], iterations: Sequence[int],
                   batch_size: int, ls: int, offsets: Sequence[int], pad: bool,
                   device: torch.device) -> tuple[list[list[tuple[torch.Tensor, torch.Tensor]]], torch.Tensor]:
    """Every iteration's ``ls`` mini-batches of the k rows, drawn up front from each row's generator in
    the order its own loop would draw them (:func:`batch_stream`): per iteration a list of ``(idx (k, b),
    mask (k, b))`` into the rows' concatenated shards (row i's from ``offsets[i]``), and ``live (T, k)``
    (row i iterates ``iterations[i]`` times). ``pad``: every batch padded to ``batch_size`` with mask 0
    (reading the row's own first sample; the same masked mean), as stacked rows and CUDA graphs need;
    else (one row only) the batches as drawn, the last of an epoch partial."""
    k, t_max = len(sizes), max(iterations)
    if not pad and k != 1:
        raise ValueError("unpadded batches are for one row")
    idx = torch.zeros(t_max, ls, k, batch_size, dtype=torch.long)
    mask = torch.zeros(t_max, ls, k, batch_size)
    live = torch.zeros(t_max, k)
    drawn: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for i, (n, g, its) in enumerate(zip(sizes, generators, iterations)):
        stream = batch_stream(n, batch_size, g, torch.device("cpu"))
        for s in range(its * ls):
            b = next(stream)
            if not pad:
                if s % ls == 0:
                    drawn.append([])
                bi = b.to(device).unsqueeze(0)
                drawn[-1].append((bi, torch.ones(bi.shape, device=device)))
                continue
            idx[s // ls, s % ls, i, : len(b)] = b + offsets[i]
            idx[s // ls, s % ls, i, len(b):] = offsets[i]
            mask[s // ls, s % ls, i, : len(b)] = 1.0
        live[:its, i] = 1.0
    live = live.to(device)
    if pad:
        idx, mask = idx.to(device), mask.to(device)
        drawn = [[(idx[t, j], mask[t, j]) for j in range(ls)] for t in range(t_max)]
    return drawn, live


def row_groups(k: int, layout: str | None) -> list[list[int]]:
    """The rows computed together: all k on a stacked layout, else one at a time."""
    return [list(range(k))] if layout is not None else [[i] for i in range(k)]


def _rows_of(v: torch.Tensor | None, theta: torch.Tensor, k: int) -> torch.Tensor | None:
    """``theta + v`` for k rows (``v`` ``(d,)`` or ``(k, d)``); None stays None."""
    return None if v is None else theta + v.detach().to(theta).expand(k, -1)


# ------------------------------------------------------------------------------------------- the cores
def alternating_minimisation(
    model: nn.Module, theta_flat: torch.Tensor, owns: Sequence[tuple[torch.Tensor, torch.Tensor]],
    x_bd: torch.Tensor, y_bd: torch.Tensor, ref_deltas: torch.Tensor | None, *,
    boost: float, rho: float, generators: Sequence[torch.Generator], layout: str | None = None,
    engine: EngineOptions | None = None, benign_epochs: float = 2.0, ls: int = 1, mal_steps: int = 1,
    iterations: int | None = None, lr: float = 1e-3, batch_size: int = 64, dist: str = "norm",
    order: str = "benign_first", extra_losses: Sequence[ExtraLoss | None] | None = None,
    starts: torch.Tensor | None = None, project: tuple[torch.Tensor, float] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bhagoji et al.'s alternating minimisation with explicit boosting for ``k = len(owns)`` attackers;
    returns their updates ``delta_i = w_i - theta`` ``(k, d)``.

    Attacker i starts from ``w = theta`` (``theta + starts[i]`` where ``starts`` is given) and each
    *iteration* does

    (a) stealth step(s): ``ls`` Adam mini-batch steps on its shard ``owns[i]`` minimising
        ``CE(w; batch) + rho * D(w - theta - ref_deltas[i]) [+ extra_losses[i]]`` with ``D = ||.||_2``
        (``dist="norm"``, Eq. 7) or ``0.5 ||.||_2^2`` (``dist="sq"``, the authors' ``tf.nn.l2_loss``);
    (b) malicious step(s): ``mal_steps`` times, one full-batch Adam step on the backdoor set from the
        current weights ``w_b`` gives ``w'``; the weights become ``w_b + boost * (w' - w_b)`` (explicit
        boosting of the malicious component only). Skipped while the backdoor loss is exactly 0, as in
        the authors' code.

    ``order="mal_first"`` runs (b) before (a). The number of iterations is ``iterations`` or, by default,
    ``ceil(S / ls)`` where ``S = round(benign_epochs * ceil(N_i / batch_size))`` mini-batch steps, i.e. the
    stealth objective sees ``benign_epochs`` epochs of the shard in total (the code's ``mal_E``); an
    attacker whose iterations have run out stays as it is. The two objectives have their own Adam states
    (two optimisers, as in the code); lr 1e-3 per Section 6.1. ``ref_deltas`` None means a zero reference
    (plain ``rho ||w - theta||``). ``project=(centres, r)``: after every step ``w - theta`` is projected onto
    the ball of radius ``r`` around ``centres[i]`` (:func:`project_rows_`; projected gradient descent on
    Eq. 7's constraint form). ``extra_losses[i](plr, logits, y, idx)`` is added to attacker i's stealth
    loss (the adaptive attack's PLR term; ``idx``: the batch's indices into its shard; one attacker at a
    time). ``ref_deltas``, ``starts``, ``project``'s centres: ``(d,)`` for every attacker or ``(k, d)``.

    Attacker i's mini-batches come from ``generators[i]``. The execution (``layout``): None, one attacker
    at a time through PyTorch's layers; a stacked layout (robustfl.engine.stacked), all at once (the
    dropout masks then come from one stream, seeded by the first attacker's generator; another mask, the
    same distribution). The loop never reads a value back to the host, so that on CUDA one iteration is
    captured as a CUDA graph and replayed (``engine``'s ``attack_cuda_graph``); a skipped malicious step is
    skipped on the device (Adam's ``active`` flag), and partial batches are then padded with a mask (the
    same mean cross-entropy). Deterministic for given generator states.
    """
    if dist not in ("norm", "sq") or order not in ("benign_first", "mal_first"):
        raise ValueError(f"bad dist {dist!r} or order {order!r}")
    k = len(owns)
    if len(generators) != k:
        raise ValueError(f"{len(generators)} generators for {k} attackers")
    device = torch.device(device) if device is not None else theta_flat.device
    theta = theta_flat.detach().to(device=device, dtype=torch.float32)
    if k == 0:
        return theta.new_zeros(0, theta.numel())
    if extra_losses is not None and layout is not None:
        raise ValueError("extra losses are computed one attacker at a time (layout None)")
    refs, w0 = _rows_of(ref_deltas, theta, k), _rows_of(starts, theta, k)
    centres = None if project is None else _rows_of(project[0], theta, k)
    out = []
    for g in row_groups(k, layout):
        rows = ModelRows(model, len(g), device, layout, engine)
        out.append(_alternate(
            rows, theta, [owns[i] for i in g], x_bd, y_bd, None if refs is None else refs[g],
            None if w0 is None else w0[g], [generators[i] for i in g],
            None if extra_losses is None else extra_losses[g[0]],
            None if project is None else (centres[g], float(project[1])), boost=boost, rho=rho,
            benign_epochs=benign_epochs, ls=ls, mal_steps=mal_steps, iterations=iterations, lr=lr,
            batch_size=batch_size, dist=dist, order=order))
    return out[0] if len(out) == 1 else torch.cat(out)


def _alternate(rows: ModelRows, theta: torch.Tensor, owns: Sequence[tuple[torch.Tensor, torch.Tensor]],
               x_bd: torch.Tensor, y_bd: torch.Tensor, ref: torch.Tensor | None, w0: torch.Tensor | None,
               generators: Sequence[torch.Generator], extra: ExtraLoss | None,
               project: tuple[torch.Tensor, float] | None, *, boost: float, rho: float, benign_epochs: float,
               ls: int, mal_steps: int, iterations: int | None, lr: float, batch_size: int, dist: str,
               order: str) -> torch.Tensor:
    """:func:`alternating_minimisation`'s loop for the rows ``rows`` (``ref``, ``w0``, ``project``'s
    centres: ``(k, d)`` absolute weights)."""
    k, device = rows.k, rows.device
    d = theta.numel()
    xs = [prepare_inputs(x.to(device)) for x, _ in owns]
    sizes = [len(y) for _, y in owns]
    if min(sizes) == 0:
        raise ValueError("the attacker's shard is empty")
    x_all = xs[0] if k == 1 else torch.cat(xs)
    y_all = owns[0][1].to(device) if k == 1 else torch.cat([y.to(device) for _, y in owns])
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]]
    shape = x_all.shape[1:]
    x_bd, y_bd = prepare_inputs(x_bd.to(device)), y_bd.to(device)
    xb_bd = x_bd.unsqueeze(0).expand(k, *x_bd.shape).contiguous()
    yb_bd, mb_bd = y_bd.expand(k, -1), torch.ones(k, len(y_bd), device=device)
    ref = theta.expand(k, d) if ref is None else ref
    steps = [max(1, round(benign_epochs * math.ceil(n / batch_size))) for n in sizes]
    n_iter = [math.ceil(s / ls) if iterations is None else int(iterations) for s in steps]
    do_mal = mal_steps > 0 and len(y_bd) > 0
    w = (theta.expand(k, d) if w0 is None else w0).clone()
    ben_state, mal_state = rows.adam_state(w), rows.adam_state(w)
    if project is not None:
        p_centre, p_radius = project[0], torch.full((k, 1), project[1], device=device)
    flag = torch.empty(k, device=device)

    def stealth(idx: torch.Tensor, mask: torch.Tensor, live: torch.Tensor) -> None:
        def loss_fn(flat: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
            yb = y_all[idx]
            plr, logits = rows.forward(params, x_all[idx.reshape(-1)].view(*idx.shape, *shape))
            loss = masked_ce(logits, yb, mask)
            if rho > 0:
                loss = loss + rho * distance_rows(flat - ref, dist)
            if extra is not None:
                loss = loss + extra(None if plr is None else plr[0], logits[0], yb[0], idx[0])
            return loss.sum()
        rows.adam(w, rows.grad(w, loss_fn), ben_state, live, lr)
        if project is not None:
            project_rows_(w, p_centre, p_radius)

    def malicious(live: torch.Tensor) -> None:
        active = live
        for _ in range(mal_steps):
            def loss_fn(flat: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
                mal = masked_ce(rows.forward(params, xb_bd)[1], yb_bd, mb_bd)
                flag.copy_((mal > 0.0).float())  # NaN or 0 -> skip, per row
                return mal.sum()
            g = rows.grad(w, loss_fn)
            active = active * flag
            start = w.clone()
            rows.adam(w, g, mal_state, active, lr)
            w.copy_(start + boost * (w - start))
            if project is not None:
                project_rows_(w, p_centre, p_radius)

    def iteration(batches: list[tuple[torch.Tensor, torch.Tensor]], live: torch.Tensor) -> None:
        if order == "mal_first" and do_mal:
            malicious(live)
        for idx, mask in batches:
            stealth(idx, mask, live)
        if order == "benign_first" and do_mal:
            malicious(live)

    use_graph = extra is None and rows.use_graph(max(n_iter))
    with rows.training(generators):
        batches, live = batch_schedule(sizes, generators, n_iter, batch_size, ls, offsets, k > 1 or use_graph, device)
        if not use_graph:
            for t in range(len(batches)):
                iteration(batches[t], live[t])
        else:  # the iteration as a CUDA graph over static inputs, loaded before each replay
            static = [(i.clone(), m.clone()) for i, m in batches[0]]
            static_live = live[0].clone()
            graph = rows.capture(lambda: iteration(static, static_live), [w, *ben_state, *mal_state])
            for t in range(len(batches)):
                for (si, sm), (i, m) in zip(static, batches[t]):
                    si.copy_(i)
                    sm.copy_(m)
                static_live.copy_(live[t])
                graph.replay()
    return w - theta


def explicit_boosting(
    model: nn.Module, theta_flat: torch.Tensor, x_bd: torch.Tensor, y_bd: torch.Tensor, *, boost: float,
    generators: Sequence[torch.Generator], layout: str | None = None, engine: EngineOptions | None = None,
    min_steps: int = 2, tol: float = 1e-6, max_steps: int = 1000, check_every: int = 1, lr: float = 1e-3,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Bhagoji et al.'s baseline targeted model poisoning with explicit boosting (``mal_strat=converge``)
    for ``k = len(generators)`` attackers: full-batch Adam steps on the backdoor set alone, from ``theta``,
    until the attacker's backdoor loss is ``<= tol`` (read every ``check_every`` steps) and at least
    ``min_steps`` steps were taken, or ``max_steps`` is reached; the update is then boosted:
    ``delta = boost * (w - theta)``. Returns ``(delta (k, d), [{"steps", "mal_loss"}] * k)`` (the loss
    before boosting).

    A step keeps the weights it started from, computes the loss and gradient there and takes the Adam step
    (on the CPU torch.optim.Adam's arithmetic); the host then reads the losses, and an attacker whose loss
    stops it gets the weights before that step. ``layout``: one attacker at a time (None) or all at once on
    a stacked layout (their dropout masks from one stream seeded by the first one's generator, the only
    thing each generator gives). On CUDA (``engine``'s ``attack_cuda_graph``) the first
    ``attack_graph_min_steps`` steps run eagerly (a backdoor set often converges within a few: capturing
    would cost more than it saves); after them the step is captured as a CUDA graph and replayed.
    """
    k = len(generators)
    device = torch.device(device) if device is not None else theta_flat.device
    theta = theta_flat.detach().to(device=device, dtype=torch.float32)
    if k == 0:
        return theta.new_zeros(0, theta.numel()), []
    x_bd, y_bd = prepare_inputs(x_bd.to(device)), y_bd.to(device)
    deltas, infos = [], []
    for g in row_groups(k, layout):
        rows = ModelRows(model, len(g), device, layout, engine)
        d, info = _boost(rows, theta, x_bd, y_bd, [generators[i] for i in g], boost=boost, min_steps=min_steps,
                         tol=tol, max_steps=max_steps, check_every=check_every, lr=lr)
        deltas.append(d)
        infos += info
    return (deltas[0] if len(deltas) == 1 else torch.cat(deltas)), infos


def _boost(rows: ModelRows, theta: torch.Tensor, x_bd: torch.Tensor, y_bd: torch.Tensor,
           generators: Sequence[torch.Generator], *, boost: float, min_steps: int, tol: float, max_steps: int,
           check_every: int, lr: float) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """:func:`explicit_boosting`'s loop for the rows ``rows``."""
    k = rows.k
    xb = x_bd.unsqueeze(0).expand(k, *x_bd.shape).contiguous()
    yb, mb = y_bd.expand(k, -1), torch.ones(k, len(y_bd), device=rows.device)
    w = theta.expand(k, -1).clone()
    state = rows.adam_state(w, per_row=False)  # the rows still running all took the same number of steps
    w_prev, done = torch.empty_like(w), torch.empty_like(w)
    loss_t = torch.zeros(k, device=rows.device)

    def step_fn() -> None:
        w_prev.copy_(w)

        def loss_fn(flat: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
            rl = masked_ce(rows.forward(params, xb)[1], yb, mb)
            loss_t.copy_(rl.detach())
            return rl.sum()
        rows.adam_all(w, rows.grad(w, loss_fn), state, lr)

    use_graph = rows.use_graph(max_steps)
    loss_val, steps = [float("inf")] * k, [float(max_steps)] * k
    live = set(range(k))
    step, graph = 0, None
    with rows.training(generators):
        while step < max_steps and live:
            if use_graph and graph is None and step >= rows.graph_after:  # not converged yet: capture now
                graph = rows.capture(step_fn, [w, *state])
            if graph is None:
                step_fn()
            else:
                graph.replay()
            if step % check_every == 0:
                vals = loss_t.tolist()
                for i in live:
                    loss_val[i] = vals[i]
            stop = sorted(i for i in live if step >= min_steps and loss_val[i] <= tol)
            if stop:  # these rows stop before this step's update (the others step on)
                at = torch.tensor(stop, device=rows.device)
                done[at] = w_prev[at]
                for i in stop:
                    steps[i] = float(step)
                live -= set(stop)
            step += 1
        if live:  # max_steps reached: the loss of the weights they stopped at (logged: not converged)
            at = torch.tensor(sorted(live), device=rows.device)
            done[at] = w[at]
            with torch.no_grad():
                vals = masked_ce(rows.forward(rows.params(w), xb)[1], yb, mb).tolist()
            for i in sorted(live):
                loss_val[i] = vals[i]
                log.debug("explicit_boosting: stopped at max_steps=%d with backdoor loss %.3g", max_steps, vals[i])
    return boost * (done - theta), [{"steps": s, "mal_loss": v} for s, v in zip(steps, loss_val)]


def benign_updates(model: nn.Module, theta_flat: torch.Tensor, owns: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   generators: Sequence[torch.Generator], *, epochs: float, lr: float, batch_size: int,
                   layout: str | None = None, engine: EngineOptions | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Honest local updates ``(k, d)`` of the attackers on their own shards (Adam, cross-entropy): the
    authors' ``benign_train``, for the self-estimated stealth reference and ``add_benign``; the alternating
    loop without its malicious steps."""
    if not owns:
        return theta_flat.new_zeros(0, theta_flat.numel())
    x0, y0 = owns[0]
    return alternating_minimisation(model, theta_flat, owns, x0[:0], y0[:0], None, boost=0.0, rho=0.0,
                                    generators=generators, layout=layout, engine=engine, benign_epochs=epochs,
                                    mal_steps=0, lr=lr, batch_size=batch_size, device=device)


# ------------------------------------------------------------------------------------ registered attacks
def crafting_layout(ctx: AttackContext, stackable: bool = True) -> str | None:
    """How the attackers craft: all at once on the stacked layout the run's engine trains with (unless
    ``ctx.engine.stacked_attacks`` is off, or the loop is not ``stackable``), else one at a time (None)."""
    return ModelRows.layout_for(ctx.model, ctx.engine, ctx.device) if stackable else None


def _crafters(ctx: AttackContext, opts: Mapping[str, Any]) -> int:
    """How many attackers craft: all, or with ``share`` attacker 0 alone (the others send copies)."""
    return min(1, ctx.n_attackers) if opts["share"] else ctx.n_attackers


def _copies(rows: torch.Tensor, n: int) -> torch.Tensor:
    return rows if len(rows) == n else rows[:1].expand(n, -1).clone()


def stealth_references(ctx: AttackContext, opts: Mapping[str, Any], generators: Sequence[torch.Generator],
                       layout: str | None) -> torch.Tensor:
    """The updates the stealth term pulls the first ``len(generators)`` attackers towards, ``(k, d)``: the
    round's mean benign update (white-box, default) or each attacker's own honest update of
    ``self_epochs`` epochs (the code's ``dist_self``)."""
    k = len(generators)
    if opts["stealth_ref"] == "self":
        return benign_updates(ctx.model, ctx.global_flat, ctx.attacker_data[:k], generators,
                              epochs=opts["self_epochs"], lr=opts["lr"], batch_size=opts["batch_size"],
                              layout=layout, engine=ctx.engine, device=ctx.device)
    return mean_benign_delta(ctx).expand(k, -1)


def crafting_geometry(ctx: AttackContext, opts: Mapping[str, Any]) -> tuple[torch.Tensor | None,
                                                                           tuple[torch.Tensor, float] | None]:
    """``(start, ball)`` of the alternating attack: the update it starts from (None: theta) and, with
    ``radius``, the ball ``(mean benign update, radius * benign spread)`` its update is kept in."""
    if opts["start"] == "theta" and opts["radius"] is None:
        return None, None
    mean, spread = benign_spread(ctx.benign_updates.to(ctx.global_flat))
    start = mean if opts["start"] == "benign_mean" else None
    return start, (None if opts["radius"] is None else (mean, float(opts["radius"]) * spread))


def finish_alternating(rows: torch.Tensor, opts: Mapping[str, Any], start: torch.Tensor | None,
                       ball: tuple[torch.Tensor, float] | None) -> torch.Tensor:
    """The crafted updates ``(k, d)`` after the loop: with ``boost_at="final"`` the attacker's own change is
    boosted, ``start + boost (delta - start)`` (Bhagoji et al.'s explicit boosting); with a ball, projected
    onto it (:func:`project_rows_`)."""
    if opts["boost_at"] == "final":
        base = 0.0 if start is None else start
        rows = base + opts["boost"] * (rows - base)
    if ball is not None:
        rows = project_rows_(rows.clone(), ball[0], torch.tensor(ball[1], device=rows.device, dtype=rows.dtype))
    return rows


def craft_alternating(ctx: AttackContext, opts: Mapping[str, Any],
                      extra_loss_for: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator],
                                               ExtraLoss | None] | None = None) -> torch.Tensor:
    """:func:`alternating_minimisation` for every attacker on its own shard; ``(n_attackers, d)``.
    ``extra_loss_for(i, x_own, y_own, ref_delta, gen)`` may supply an extra stealth loss per attacker
    (then the attackers craft one at a time)."""
    check_context(ctx)
    gens = attacker_generators(ctx)
    start, ball = crafting_geometry(ctx, opts)
    k = _crafters(ctx, opts)
    if k == 0:
        return ctx.global_flat.new_zeros(0, ctx.global_flat.numel())
    owns, gens = ctx.attacker_data[:k], gens[:k]
    layout = crafting_layout(ctx, stackable=extra_loss_for is None)
    refs = stealth_references(ctx, opts, gens, layout)
    extras = (None if extra_loss_for is None else
              [extra_loss_for(i, x, y, refs[i], g) for i, ((x, y), g) in enumerate(zip(owns, gens))])
    rows = alternating_minimisation(
        ctx.model, ctx.global_flat, owns, ctx.backdoor_x, ctx.backdoor_y, refs, generators=gens, layout=layout,
        engine=ctx.engine, device=ctx.device, rho=opts["rho"], benign_epochs=opts["benign_epochs"], ls=opts["ls"],
        mal_steps=opts["mal_steps"], iterations=opts["iterations"], lr=opts["lr"], batch_size=opts["batch_size"],
        dist=opts["dist"], order=opts["order"], extra_losses=extras, starts=start,
        boost=opts["boost"] if opts["boost_at"] == "step" else 1.0,
        project=ball if opts["project_at"] == "step" else None)
    return finish_alternating(_copies(rows, ctx.n_attackers), opts, start, ball)


@register_attack("krum_backdoor", targeted=True)
def krum_backdoor(ctx: AttackContext) -> torch.Tensor:
    """Attack-Krum-Backdoor (FLARE Sec. 7.1.1; Bhagoji et al. 2019): alternating minimisation of Eq. (7)
    with the distance (stealth) term and explicit boosting of the malicious steps."""
    return craft_alternating(ctx, resolve_options(ctx))


@register_attack("median_backdoor", targeted=True)
def median_backdoor(ctx: AttackContext) -> torch.Tensor:
    """Attack-Coomed-Backdoor (FLARE Sec. 7.1.1; Bhagoji et al. 2019): train on the backdoor set alone to
    convergence and boost the update (the authors' ``converge`` strategy); with ``add_benign=True`` the
    attacker's own honest update is added (Bhagoji's ``add_ben``)."""
    check_context(ctx)
    opts = resolve_options(ctx)
    alternating_only = {k: opts[k] for k in ("boost_at", "start", "radius", "project_at") if opts[k] != COMMON[k]}
    if alternating_only:
        raise ValueError(f"median_backdoor: option(s) {sorted(alternating_only)} belong to the alternating "
                         "attacks (krum_backdoor, adaptive_plr)")
    gens = attacker_generators(ctx)[:_crafters(ctx, opts)]
    layout = crafting_layout(ctx)
    deltas, infos = explicit_boosting(
        ctx.model, ctx.global_flat, ctx.backdoor_x, ctx.backdoor_y, boost=opts["boost"], generators=gens,
        layout=layout, engine=ctx.engine, device=ctx.device, min_steps=int(opts["min_steps"]), tol=float(opts["tol"]),
        max_steps=int(opts["max_steps"]), check_every=int(opts["check_every"]), lr=opts["lr"])
    if opts["add_benign"]:
        deltas = deltas + benign_updates(ctx.model, ctx.global_flat, ctx.attacker_data[:len(gens)], gens,
                                         epochs=opts["self_epochs"], lr=opts["lr"], batch_size=opts["batch_size"],
                                         layout=layout, engine=ctx.engine, device=ctx.device)
    for info in infos:
        log.debug("median_backdoor: %d steps, backdoor loss %.3g before boosting", info["steps"], info["mal_loss"])
    return _copies(deltas, ctx.n_attackers)
