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

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from robustfl.attacks import register_attack
from robustfl.attacks.base import AttackContext
from robustfl.engine.adam import ADAM_BETAS, ADAM_EPS, adam_step
from robustfl.engine.common import masked_ce
from robustfl.engine.common import prepare_inputs as _as_input
from robustfl.engine.graphs import capture as _capture
from robustfl.engine.options import EngineOptions
from robustfl.params import ParamSpec

log = logging.getLogger(__name__)

_NORM_EPS = 1e-12  # inside sqrt: keeps the gradient of ||v|| finite at v = 0

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
    scale = radius / torch.sqrt(v.pow(2).sum(-1, keepdim=True) + _NORM_EPS)
    w.copy_(torch.where(scale < 1.0, centre + v * scale, w))
    return w


@contextlib.contextmanager
def _training_mode(model: nn.Module, generator: torch.Generator, on: bool = True) -> Iterator[None]:
    """Set the template's train/eval mode and make dropout draw from a stream seeded by ``generator``,
    leaving the global RNG and the template's mode as they were."""
    was = model.training
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.train(on)
        try:
            yield
        finally:
            model.train(was)


def _sub_params(params: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix + ".")}


def forward_with(model: nn.Module, params: Mapping[str, torch.Tensor],
                 x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(plr, logits)`` of the template run with ``params``; the PLR is ``model.features(x)`` (None for a
    model without the features/head split). One forward pass either way."""
    if isinstance(getattr(model, "features", None), nn.Module) and isinstance(getattr(model, "head", None), nn.Module):
        r = functional_call(model.features, _sub_params(params, "features"), (x,))
        return r, functional_call(model.head, _sub_params(params, "head"), (r,))
    return None, functional_call(model, dict(params), (x,))


@torch.no_grad()
def plr_with(model: nn.Module, flat: torch.Tensor, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """PLRs ``(N, o)`` of the template with flat parameters ``flat`` (eval mode, no dropout)."""
    spec = ParamSpec(model)
    params = spec.unflatten(flat)
    was = model.training
    model.eval()
    try:
        out = [forward_with(model, params, _as_input(x[i:i + chunk]))[0] for i in range(0, len(x), chunk)]
    finally:
        model.train(was)
    if out and out[0] is None:
        raise ValueError("the model has no features/head split, so it has no PLR")
    return torch.cat(out) if out else x.new_zeros(0)


#: the engine options of a loop called without any (crafting graphs on where they apply)
DEFAULT_ENGINE = EngineOptions(kind="sequential")


def _use_graph(engine: EngineOptions | None, device: torch.device, iterations: int) -> bool:
    """Capture the loop's iteration as a CUDA graph: on CUDA, ``engine.attack_cuda_graph``, and at least
    ``engine.attack_graph_min_steps`` iterations (capture costs about three)."""
    engine = engine or DEFAULT_ENGINE
    return engine.attack_cuda_graph and device.type == "cuda" and iterations >= engine.attack_graph_min_steps


def _batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless stream of mini-batch indices: per epoch a fresh permutation cut into batches (the last one
    partial), as the benign clients train (robustfl.engine.train.batch_plan)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for b in torch.split(perm, batch_size):
            yield b.to(device)


def _distance(v: torch.Tensor, form: str) -> torch.Tensor:
    sq = v.pow(2).sum()
    return torch.sqrt(sq + _NORM_EPS) if form == "norm" else 0.5 * sq


# ------------------------------------------------------------------------------------------- the cores
def benign_update(model: nn.Module, theta_flat: torch.Tensor, x_own: torch.Tensor, y_own: torch.Tensor, *,
                  epochs: float, lr: float, batch_size: int, generator: torch.Generator,
                  engine: EngineOptions | None = None) -> torch.Tensor:
    """An honest local update ``(d,)`` on the attacker's own shard (Adam, cross-entropy): the authors'
    ``benign_train``, used for the self-estimated stealth reference and for ``add_benign``."""
    return alternating_minimisation(model, theta_flat, x_own, y_own, x_own[:0], y_own[:0], None,
                                    boost=0.0, rho=0.0, benign_epochs=epochs, mal_steps=0, lr=lr,
                                    batch_size=batch_size, generator=generator, engine=engine)


def alternating_minimisation(
    model: nn.Module, theta_flat: torch.Tensor, x_own: torch.Tensor, y_own: torch.Tensor,
    x_bd: torch.Tensor, y_bd: torch.Tensor, ben_mean_delta: torch.Tensor | None, *,
    boost: float, rho: float, benign_epochs: float = 2.0, ls: int = 1, mal_steps: int = 1,
    iterations: int | None = None, lr: float = 1e-3, batch_size: int = 64,
    generator: torch.Generator | None = None, device: torch.device | str | None = None,
    dist: str = "norm", order: str = "benign_first", extra_loss: ExtraLoss | None = None,
    start: torch.Tensor | None = None, project: tuple[torch.Tensor, float] | None = None,
    engine: EngineOptions | None = None,
) -> torch.Tensor:
    """Bhagoji et al.'s alternating minimisation with explicit boosting; returns ``delta = w - theta (d,)``.

    Starting from ``w = theta`` (``theta + start`` where ``start`` is given), each *iteration* does

    (a) stealth step(s): ``ls`` Adam mini-batch steps on the attacker's shard minimising
        ``CE(w; batch) + rho * D(w - theta - ben_mean_delta) [+ extra_loss]`` with ``D = ||.||_2``
        (``dist="norm"``, Eq. 7) or ``0.5 ||.||_2^2`` (``dist="sq"``, the authors' ``tf.nn.l2_loss``);
    (b) malicious step(s): ``mal_steps`` times, one full-batch Adam step on the backdoor set from the
        current weights ``w_b`` gives ``w'``; the weights become ``w_b + boost * (w' - w_b)`` (explicit
        boosting of the malicious component only). Skipped while the backdoor loss is exactly 0, as in
        the authors' code.

    ``order="mal_first"`` runs (b) before (a). The number of iterations is ``iterations`` or, by default,
    ``ceil(S / ls)`` where ``S = round(benign_epochs * ceil(N / batch_size))`` mini-batch steps, i.e. the
    stealth objective sees ``benign_epochs`` epochs of the shard in total (the code's ``mal_E``). The two
    objectives have their own Adam states (two optimisers, as in the code); lr 1e-3 per Section 6.1.
    ``ben_mean_delta=None`` means a zero reference (plain ``rho ||w - theta||``).

    ``project=(centre, r)``: after every step (stealth or boosted malicious) ``w - theta`` is projected onto
    the ball of radius ``r`` around ``centre`` (:func:`project_rows_`; projected gradient descent on Eq. 7's
    constraint form).

    ``extra_loss(plr, logits, y, idx)`` is added to the stealth loss (the adaptive attack's PLR term);
    ``idx`` are the batch's indices into ``x_own``. Deterministic for a given ``generator`` state.
    """
    if dist not in ("norm", "sq") or order not in ("benign_first", "mal_first"):
        raise ValueError(f"bad dist {dist!r} or order {order!r}")
    device = torch.device(device) if device is not None else theta_flat.device
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    spec = ParamSpec(model)
    theta = theta_flat.detach().to(device=device, dtype=torch.float32)
    x_own, y_own = _as_input(x_own.to(device)), y_own.to(device)
    x_bd, y_bd = _as_input(x_bd.to(device)), y_bd.to(device)
    ref = theta if ben_mean_delta is None else theta + ben_mean_delta.detach().to(theta)
    n_own = len(y_own)
    if n_own == 0:
        raise ValueError("the attacker's shard is empty")
    steps = max(1, round(benign_epochs * math.ceil(n_own / batch_size)))
    n_iter = math.ceil(steps / ls) if iterations is None else int(iterations)
    do_mal = mal_steps > 0 and len(y_bd) > 0

    # The loop never reads a value back to the host, so that on CUDA one iteration can be captured as a
    # CUDA graph and replayed (the attackers' crafting was as costly as the benign training, bench/README.md):
    # Adam is robustfl.engine.train.adam_step on w viewed as one stacked client, whose ``active`` flag skips the
    # malicious step on device when the backdoor loss is 0 (the code's "only if mal loss is non-zero": no
    # update, Adam state untouched, later malicious steps of the iteration skipped too), and a partial
    # mini-batch is padded to the batch size with a mask (the same mean cross-entropy).
    w = (theta if start is None else theta + start.detach().to(theta)).clone().view(1, -1)
    ben_state = (torch.zeros_like(w), torch.zeros_like(w), torch.zeros(1, device=device))
    mal_state = (torch.zeros_like(w), torch.zeros_like(w), torch.zeros(1, device=device))
    one = torch.ones(1, device=device)
    stream = _batches(n_own, batch_size, gen, device)
    if project is not None:
        p_centre = theta + project[0].detach().to(theta)
        p_radius = torch.full((1, 1), float(project[1]), device=device)

    def loss_grad(loss_fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        # the current weights, as constants: one leaf per parameter (a gradient taken with respect to the
        # flat vector would reach it through a zero-filled full-size tensor per parameter), and the flat
        # vector for the distance term rebuilt from them
        views = spec.unflatten(w.detach().view(-1))
        leaves = [views[n].requires_grad_() for n in spec.names]
        flat = torch.cat([t.reshape(-1) for t in leaves])
        grads = torch.autograd.grad(loss_fn(flat, dict(zip(spec.names, leaves))), leaves)
        return torch.cat([g.reshape(-1) for g in grads]).view(1, -1)

    def stealth(idx: torch.Tensor, mask: torch.Tensor) -> None:
        def loss_fn(flat: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
            r, logits = forward_with(model, params, x_own[idx])
            loss = masked_ce(logits, y_own[idx], mask)
            if rho > 0:
                loss = loss + rho * _distance(flat - ref, dist)
            if extra_loss is not None:
                loss = loss + extra_loss(r, logits, y_own[idx], idx)
            return loss
        adam_step([w], [loss_grad(loss_fn)], [ben_state[0]], [ben_state[1]], ben_state[2], one, lr)
        if project is not None:
            project_rows_(w, p_centre, p_radius)

    def malicious() -> None:
        active = one
        for _ in range(mal_steps):
            flag = torch.empty(1, device=device)

            def loss_fn(flat: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
                _, logits = forward_with(model, params, x_bd)
                mal_loss = F.cross_entropy(logits.float(), y_bd)
                flag.copy_((mal_loss > 0.0).float().view(1))  # NaN or 0 -> skip
                return mal_loss
            g = loss_grad(loss_fn)
            active = active * flag
            g = torch.where(active.bool(), g, 0.0)  # a skipped step's NaN gradient must not reach Adam's state
            start = w.clone()
            adam_step([w], [g], [mal_state[0]], [mal_state[1]], mal_state[2], active, lr)
            w.copy_(start + boost * (w - start))
            if project is not None:
                project_rows_(w, p_centre, p_radius)

    def iteration(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if order == "mal_first" and do_mal:
            malicious()
        for idx, mask in batches:
            stealth(idx, mask)
        if order == "benign_first" and do_mal:
            malicious()

    def next_batches(pad: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for _ in range(ls):
            idx = next(stream)
            mask = torch.ones(len(idx), device=device)
            if pad and len(idx) < batch_size:
                idx = F.pad(idx, (0, batch_size - len(idx)))
                mask = F.pad(mask, (0, batch_size - len(mask)))
            out.append((idx, mask))
        return out

    use_graph = extra_loss is None and _use_graph(engine, device, n_iter)
    with _training_mode(model, gen):
        if not use_graph:
            for _ in range(n_iter):
                iteration(next_batches(pad=False))
        else:
            static = [(torch.zeros(batch_size, dtype=torch.long, device=device), torch.zeros(batch_size, device=device))
                      for _ in range(ls)]
            def load(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
                for (si, sm), (i0, m0) in zip(static, batches):
                    si.copy_(i0)
                    sm.copy_(m0)

            load(next_batches(pad=True))  # the first iteration's batches, for the capture and the first replay
            saved = [t.clone() for t in (w, *ben_state, *mal_state)]
            graph, _ = _capture(lambda: iteration(static))  # warm-up calls update w and the Adam states:
            for t, v in zip((w, *ben_state, *mal_state), saved):  # restore them before the first replay
                t.copy_(v)
            for it in range(n_iter):
                if it:
                    load(next_batches(pad=True))
                graph.replay()
    return w.view(-1) - theta


def explicit_boosting(
    model: nn.Module, theta_flat: torch.Tensor, x_bd: torch.Tensor, y_bd: torch.Tensor, *,
    boost: float, min_steps: int = 2, tol: float = 1e-6, max_steps: int = 1000, check_every: int = 1,
    lr: float = 1e-3, generator: torch.Generator | None = None, device: torch.device | str | None = None,
    engine: EngineOptions | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bhagoji et al.'s baseline targeted model poisoning with explicit boosting (``mal_strat=converge``):
    full-batch Adam steps on the backdoor set alone, from ``theta``, until the backdoor loss is
    ``<= tol`` (read every ``check_every`` steps) and at least ``min_steps`` steps were taken, or
    ``max_steps`` is reached; the update is then boosted: ``delta = boost * (w - theta)``.

    Returns ``(delta (d,), info)`` with ``info = {"steps", "mal_loss"}`` (the loss before boosting).

    On CUDA (``engine.attack_cuda_graph``, at least ``engine.attack_graph_min_steps`` steps allowed) a step keeps
    the weights it started from, computes the loss and gradient there and takes the Adam step
    (:func:`robustfl.engine.train.adam_step`); the host then reads the loss as the loop above does, and where
    that loss stops the loop, the step is undone. The first ``attack_graph_min_steps`` steps run
    eagerly (a backdoor set often converges within a few: capturing would cost more than it saves);
    after them the step is captured as a CUDA graph and replayed. The same
    steps up to float rounding (tests/test_attacks_backdoor.py). With dropout (fmnist's network) both
    draw their masks from the same seeded CUDA generator at other offsets: other masks, the same
    distribution."""
    device = torch.device(device) if device is not None else theta_flat.device
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    spec = ParamSpec(model)
    theta = theta_flat.detach().to(device=device, dtype=torch.float32)
    x_bd, y_bd = _as_input(x_bd.to(device)), y_bd.to(device)
    if _use_graph(engine, device, max_steps):
        return _explicit_boosting_graphed(model, spec, theta, x_bd, y_bd, boost=boost, min_steps=min_steps, tol=tol,
                                          max_steps=max_steps, check_every=check_every, lr=lr, gen=gen,
                                          graph_after=(engine or DEFAULT_ENGINE).attack_graph_min_steps)
    w = theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    loss_val, step = float("inf"), 0
    with _training_mode(model, gen):
        while step < max_steps:
            _, logits = forward_with(model, spec.unflatten(w), x_bd)
            loss = F.cross_entropy(logits.float(), y_bd)
            if step % check_every == 0:
                loss_val = loss.item()
            if step >= min_steps and loss_val <= tol:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if step >= max_steps:
            loss_val = _capped_loss(model, spec, w.detach(), x_bd, y_bd, max_steps)
    return boost * (w.detach() - theta), {"steps": float(step), "mal_loss": loss_val}


@torch.no_grad()
def _capped_loss(model: nn.Module, spec: ParamSpec, w: torch.Tensor, x_bd: torch.Tensor, y_bd: torch.Tensor,
                 max_steps: int) -> float:
    """The backdoor loss of the weights :func:`explicit_boosting` stopped at when it reached ``max_steps``
    (logged: the loop did not converge)."""
    loss = F.cross_entropy(forward_with(model, spec.unflatten(w), x_bd)[1].float(), y_bd).item()
    log.debug("explicit_boosting: stopped at max_steps=%d with backdoor loss %.3g", max_steps, loss)
    return loss


def _explicit_boosting_graphed(model: nn.Module, spec: ParamSpec, theta: torch.Tensor, x_bd: torch.Tensor,
                               y_bd: torch.Tensor, *, boost: float, min_steps: int, tol: float, max_steps: int,
                               check_every: int, lr: float, gen: torch.Generator,
                               graph_after: int) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`explicit_boosting`'s loop with each step a CUDA-graph replay (see its docstring)."""
    w = theta.clone().view(1, -1)
    state = (torch.zeros_like(w), torch.zeros_like(w), torch.zeros(1, device=w.device))
    one = torch.ones(1, device=w.device)
    w_prev = torch.empty_like(w)
    loss_t = torch.zeros(1, device=w.device)

    def step_fn() -> None:
        w_prev.copy_(w)
        views = spec.unflatten(w.detach().view(-1))  # one leaf per parameter, as in alternating_minimisation
        leaves = [views[n].requires_grad_() for n in spec.names]
        loss = F.cross_entropy(forward_with(model, dict(zip(spec.names, leaves)), x_bd)[1].float(), y_bd)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, leaves)])
        loss_t.copy_(loss.detach().view(1))
        adam_step([w], [g.view(1, -1)], [state[0]], [state[1]], state[2], one, lr)

    loss_val, step, graph = float("inf"), 0, None
    with _training_mode(model, gen):
        while step < max_steps:
            if graph is None and step >= graph_after:  # not converged yet: capture the step now
                saved = [t.clone() for t in (w, *state)]
                graph, _ = _capture(step_fn)  # the warm-up calls step w and the Adam state: restore them
                for t, v in zip((w, *state), saved):
                    t.copy_(v)
            if graph is None:  # the first steps run eagerly: a backdoor set often converges within a few
                step_fn()
            else:
                graph.replay()
            if step % check_every == 0:
                loss_val = loss_t.item()
            if step >= min_steps and loss_val <= tol:
                w.copy_(w_prev)  # the loop stops before this step's update
                break
            step += 1
        if step >= max_steps:
            loss_val = _capped_loss(model, spec, w.view(-1), x_bd, y_bd, max_steps)
    return boost * (w.view(-1) - theta), {"steps": float(step), "mal_loss": loss_val}


# ------------------------------------------------------------------------------------ registered attacks
def stealth_reference(ctx: AttackContext, opts: Mapping[str, Any], x_own: torch.Tensor, y_own: torch.Tensor,
                      gen: torch.Generator) -> torch.Tensor:
    """The update the stealth term pulls towards: the round's mean benign update (white-box, default) or
    the attacker's own honest update of ``self_epochs`` epochs (the code's ``dist_self``)."""
    if opts["stealth_ref"] == "self":
        return benign_update(ctx.model, ctx.global_flat, x_own, y_own, epochs=opts["self_epochs"],
                             lr=opts["lr"], batch_size=opts["batch_size"], generator=gen, engine=ctx.engine)
    return mean_benign_delta(ctx)


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


def _loop_settings(opts: Mapping[str, Any], ball: tuple[torch.Tensor, float] | None) -> dict[str, Any]:
    """The boost and per-iteration projection the loop itself runs with."""
    return {"boost": opts["boost"] if opts["boost_at"] == "step" else 1.0,
            "project": ball if opts["project_at"] == "step" else None}


def craft_alternating(ctx: AttackContext, opts: Mapping[str, Any],
                      extra_loss_for: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator],
                                               ExtraLoss | None] | None = None) -> torch.Tensor:
    """Run :func:`alternating_minimisation` for every attacker on its own shard; ``(n_attackers, d)``.
    ``extra_loss_for(i, x_own, y_own, ref_delta, gen)`` may supply an extra stealth loss per attacker."""
    check_context(ctx)
    gens = attacker_generators(ctx)
    start, ball = crafting_geometry(ctx, opts)
    if vectorised_layout(ctx) is not None and extra_loss_for is None:
        return finish_alternating(_craft_alternating_many(ctx, opts, gens, start, ball), opts, start, ball)
    loop = _loop_settings(opts, ball)
    rows: list[torch.Tensor] = []
    for i, ((x_own, y_own), gen) in enumerate(zip(ctx.attacker_data, gens)):
        if opts["share"] and rows:  # the code's mal_agent_copy: all attackers send attacker 0's update
            rows.append(rows[0])
            continue
        ref = stealth_reference(ctx, opts, x_own, y_own, gen)
        extra = extra_loss_for(i, x_own, y_own, ref, gen) if extra_loss_for is not None else None
        rows.append(alternating_minimisation(
            ctx.model, ctx.global_flat, x_own, y_own, ctx.backdoor_x, ctx.backdoor_y, ref,
            rho=opts["rho"], benign_epochs=opts["benign_epochs"], ls=opts["ls"],
            mal_steps=opts["mal_steps"], iterations=opts["iterations"], lr=opts["lr"],
            batch_size=opts["batch_size"], generator=gen, device=ctx.device, dist=opts["dist"],
            order=opts["order"], extra_loss=extra, start=start, engine=ctx.engine, **loop))
    if not rows:
        return ctx.global_flat.new_zeros(0, ctx.global_flat.numel())
    return finish_alternating(torch.stack(rows), opts, start, ball)


def vectorised_layout(ctx: AttackContext) -> str | None:
    """The stacked layout to craft with (:mod:`robustfl.attacks.vectorised`, all attackers at once): the
    one the run's engine trains with, unless ``ctx.engine.stacked_attacks`` is off; None: the
    single-model loops."""
    from robustfl.engine import stacked

    engine = ctx.engine.resolve(ctx.model, torch.device(ctx.device), "fp32")
    if not engine.stacked_attacks or engine.layout is None or not stacked.supports(ctx.model):
        return None
    return engine.layout


def _crafters(ctx: AttackContext, opts: Mapping[str, Any]) -> int:
    """How many attackers craft: all, or with ``share`` attacker 0 alone (the others send copies)."""
    return min(1, ctx.n_attackers) if opts["share"] else ctx.n_attackers


def _copies(rows: torch.Tensor, n: int) -> torch.Tensor:
    return rows if len(rows) == n else rows[:1].expand(n, -1).clone()


def _benign_many(ctx: AttackContext, opts: Mapping[str, Any], gens: list[torch.Generator]) -> torch.Tensor:
    """:func:`benign_update` of the first ``len(gens)`` attackers at once (the stacked engine)."""
    from robustfl.attacks.vectorised import alternating_minimisation_many

    k = len(gens)
    return alternating_minimisation_many(
        ctx.model, ctx.global_flat, ctx.attacker_data[:k], ctx.backdoor_x[:0], ctx.backdoor_y[:0], None,
        boost=0.0, rho=0.0, generators=gens, layout=vectorised_layout(ctx), benign_epochs=opts["self_epochs"],
        mal_steps=0, lr=opts["lr"], batch_size=opts["batch_size"], engine=ctx.engine)


def _craft_alternating_many(ctx: AttackContext, opts: Mapping[str, Any], gens: list[torch.Generator],
                            start: torch.Tensor | None, ball: tuple[torch.Tensor, float] | None) -> torch.Tensor:
    """:func:`craft_alternating`'s loops without an extra loss, all crafting attackers at once."""
    from robustfl.attacks.vectorised import alternating_minimisation_many

    k = _crafters(ctx, opts)
    gens = gens[:k]
    if opts["stealth_ref"] == "self":
        refs = _benign_many(ctx, opts, gens)
    else:
        refs = mean_benign_delta(ctx).expand(k, -1)
    loop = _loop_settings(opts, ball)
    if loop["project"] is not None:
        loop["project"] = (loop["project"][0].expand(k, -1), loop["project"][1])
    rows = alternating_minimisation_many(
        ctx.model, ctx.global_flat, ctx.attacker_data[:k], ctx.backdoor_x, ctx.backdoor_y, refs,
        rho=opts["rho"], generators=gens, layout=vectorised_layout(ctx),
        benign_epochs=opts["benign_epochs"], ls=opts["ls"], mal_steps=opts["mal_steps"],
        iterations=opts["iterations"], lr=opts["lr"], batch_size=opts["batch_size"], dist=opts["dist"],
        order=opts["order"], starts=None if start is None else start.expand(k, -1), engine=ctx.engine, **loop)
    return _copies(rows, ctx.n_attackers)


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
    gens = attacker_generators(ctx)
    if vectorised_layout(ctx) is not None:
        from robustfl.attacks.vectorised import explicit_boosting_many

        k = _crafters(ctx, opts)
        deltas, infos = explicit_boosting_many(
            ctx.model, ctx.global_flat, ctx.backdoor_x, ctx.backdoor_y, boost=opts["boost"], generators=gens[:k],
            layout=vectorised_layout(ctx), min_steps=int(opts["min_steps"]), tol=float(opts["tol"]),
            max_steps=int(opts["max_steps"]), check_every=int(opts["check_every"]), lr=opts["lr"], engine=ctx.engine)
        if opts["add_benign"]:
            deltas = deltas + _benign_many(ctx, opts, gens[:k])
        for info in infos:
            log.debug("median_backdoor: %d steps, backdoor loss %.3g before boosting", info["steps"], info["mal_loss"])
        return _copies(deltas, ctx.n_attackers)
    rows: list[torch.Tensor] = []
    for (x_own, y_own), gen in zip(ctx.attacker_data, gens):
        if opts["share"] and rows:
            rows.append(rows[0])
            continue
        delta, info = explicit_boosting(
            ctx.model, ctx.global_flat, ctx.backdoor_x, ctx.backdoor_y, boost=opts["boost"],
            min_steps=int(opts["min_steps"]), tol=float(opts["tol"]), max_steps=int(opts["max_steps"]),
            check_every=int(opts["check_every"]), lr=opts["lr"], generator=gen, device=ctx.device, engine=ctx.engine)
        if opts["add_benign"]:
            delta = delta + benign_update(ctx.model, ctx.global_flat, x_own, y_own, epochs=opts["self_epochs"],
                                          lr=opts["lr"], batch_size=opts["batch_size"], generator=gen,
                                          engine=ctx.engine)
        log.debug("median_backdoor: %d steps, backdoor loss %.3g before boosting", info["steps"], info["mal_loss"])
        rows.append(delta)
    return torch.stack(rows) if rows else ctx.global_flat.new_zeros(0, ctx.global_flat.numel())
