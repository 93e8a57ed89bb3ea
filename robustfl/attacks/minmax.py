"""Shejwalkar & Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses for
Federated Learning" (NDSS 2021), Section IV: the AGR-agnostic Min-Max and Min-Sum attacks and the AGR-tailored
attack, on client updates ``delta = w - theta``.

Every attacker sends the same malicious update (Sec. IV-A)

    delta_m = mu + gamma * p,        mu = mean of the round's benign updates (the paper's nabla^b),

with the perturbation direction p chosen by the option ``direction``:

* ``unit``: ``p = -mu / ||mu||`` (inverse unit vector);
* ``sign``: ``p = -sign(mu)`` (inverse sign);
* ``std`` (default, the authors' experiments): ``p = +std_i(delta_i)`` (coordinate-wise, unbiased). The paper's
  inverse standard deviation is ``-std`` of *gradients*; an update is minus the learning rate times a gradient,
  so the same malicious step written on updates is ``+std`` (unit and sign keep their form: they are relative
  to the mean). docs/decisions/attacks-minmax.md.

gamma is searched in ``[0, 2 gamma_init]`` (the interval Algorithm 1 reaches from ``gamma_init``) to within
``tau`` (Algorithm 1's convergence threshold; authors' code: gamma_init = 10, tau = 1e-5):

* ``minmax`` (Sec. IV-A, Min-Max): the largest gamma with
  ``max_i ||delta_m - delta_i||^2 <= max_{i,j} ||delta_i - delta_j||^2`` (over the benign updates);
* ``minsum`` (Sec. IV-A, Min-Sum): the largest gamma with
  ``sum_i ||delta_m - delta_i||^2 <= min_i sum_j ||delta_i - delta_j||^2``; the bound is the smallest benign
  sum as in the authors' code (``bound: max`` takes the largest);
* ``agr_tailored`` (Sec. IV-B, made generic): the gamma that maximises the paper's tailored objective
  ``||mu - AGR(benign U {delta_m} x n_mal)||`` where AGR is the cell's own registered defense, called as the
  server would call it (FLTrust's root-set update and FLARE's auxiliary set, which the attackers do not see,
  replaced by stand-ins: :func:`defense_aggregate`).

Search (Algorithm 1 evaluated in batches). Algorithm 1 tries one gamma at a time, moving by a halving step.
Here every step evaluates ``batch`` candidate gammas in one tensor operation: for Min-Max / Min-Sum, whose
success sets are intervals ``[0, gamma*]`` (the distances are convex in gamma and gamma = 0 always succeeds),
:func:`largest_feasible` keeps the sub-interval between the last successful and the first failing candidate, so
the bracket shrinks by ``batch + 1`` per step (Algorithm 1: by 2) and ends within tau of the same boundary.
For the tailored objective, which need not be monotone, :func:`max_damage` first evaluates 0 and the halving
sequence ``2 gamma_init / 2^k`` (Algorithm 1's steps, all at once) and then refines a grid of ``batch`` points
around the best gamma found until the grid spacing is below tau. Both run a number of steps fixed in advance
(no host synchronisation inside the search on CUDA).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from robustfl.aggregation.aggregators import check_updates, pairwise_sq_dists
from robustfl.aggregation.defenses import DEFENSES, NEEDS_AUX, NEEDS_ROOT, ServerContext
from robustfl.attacks import AttackContext, register_attack
from robustfl.attacks.base import check_n_mal
from robustfl.engine import model_plrs

__all__ = [
    "DIRECTIONS",
    "COORDINATEWISE",
    "perturbation",
    "largest_feasible",
    "max_damage",
    "MinMaxResult",
    "minmax_attack",
    "minsum_attack",
    "agr_tailored_attack",
    "defense_aggregate",
    "minmax",
    "minsum",
    "agr_tailored",
]

DIRECTIONS = ("unit", "sign", "std")
GAMMA_INIT = 10.0  # the authors' code (lamda = 10: Min-Max, Min-Sum, the median / trimmed-mean tailored attacks)
TAU = 1e-5  # the authors' code (threshold_diff)
BATCH = 16  # candidate gammas per step
#: defenses that aggregate every coordinate on its own: a batch of candidate update matrices is evaluated in
#: ONE call of the defense by laying the candidates side by side along the coordinates (without ``pre``)
COORDINATEWISE = frozenset({"fedavg", "median", "trimmed_mean"})
#: elements (rows x columns) of one side-by-side call (2**27 float32 = 512 MiB); larger batches are split
BATCH_ELEMS = 1 << 27
#: inputs of the attackers' own data that stand in for FLARE's auxiliary set (its default size m, Section 6.1)
AUX_STANDIN = 10

F64 = torch.float64


class MinMaxResult(NamedTuple):
    """A crafted round: the attackers' updates, the gamma chosen, the direction and (tailored) the damage."""

    updates: Tensor  # (n_mal, d), every row the same, the benign dtype
    gamma: Tensor  # 0-dim float64, on the benign device
    direction: Tensor  # (d,) float64 p
    damage: Tensor | None = None  # agr_tailored: ||mu - AGR(...)|| at gamma (0-dim float64)


# ------------------------------------------------------------------------------------------- checks
def _check_direction(direction: Any) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
    return direction


def _check_search(gamma_init: Any, tau: Any, batch: Any, min_batch: int) -> tuple[float, float, int]:
    for name, v in (("gamma_init", gamma_init), ("tau", tau)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < min_batch:
        raise ValueError(f"batch must be an int >= {min_batch}, got {batch!r}")
    return float(gamma_init), float(tau), batch


# ------------------------------------------------------------------------------------- direction and search
def perturbation(benign_updates: Tensor, direction: str) -> Tensor:
    """The perturbation direction p (float64, (d,)) on updates: ``unit`` -mu/||mu|| (0 where mu = 0),
    ``sign`` -sign(mu), ``std`` the coordinate-wise unbiased standard deviation of the benign updates
    (Sec. IV-A; the sign of ``std`` is explained in the module docstring)."""
    n, _ = check_updates(benign_updates, "benign_updates")
    _check_direction(direction)
    x = benign_updates.to(F64)
    mu = x.mean(dim=0)
    if direction == "unit":
        return -mu / torch.linalg.vector_norm(mu).clamp_min(torch.finfo(F64).tiny)
    if direction == "sign":
        return -torch.sign(mu)
    if n < 2:
        raise ValueError("direction 'std' needs at least 2 benign updates (the standard deviation of one update "
                         "is undefined)")
    return x.std(dim=0)


def largest_feasible(feasible: Callable[[Tensor], Tensor], hi: float, tau: float, batch: int,
                     device: torch.device | str = "cpu") -> Tensor:
    """The largest gamma in ``[0, hi]`` for which ``feasible`` holds, to within ``tau``, for an oracle whose
    success set is an interval ``[0, gamma*]`` (Algorithm 1's halving search, ``batch`` candidates per step).

    ``feasible`` maps candidates ``(batch,)`` float64 to a bool ``(batch,)``. Each step evaluates ``batch``
    evenly spaced interior points of the bracket ``[lo, hi]`` at once and keeps the sub-interval between the
    last success before the first failure and that failure; the bracket shrinks by ``batch + 1`` per step,
    so the number of steps, ``ceil(log(hi / tau) / log(batch + 1))``, is fixed in advance. Returns the lower
    end, the largest success found (0 when every candidate failed: gamma_succ's start in Algorithm 1), as a
    0-dim float64 tensor on ``device``.
    """
    k = batch
    steps = max(1, math.ceil(math.log(hi / tau) / math.log(k + 1))) if hi > tau else 1
    lo_t = torch.zeros(1, dtype=F64, device=device)
    hi_t = torch.full((1,), float(hi), dtype=F64, device=device)
    pos = torch.arange(1, k + 1, device=device)
    frac = pos.to(F64)
    for _ in range(steps):
        h = (hi_t - lo_t) / (k + 1)
        cand = lo_t + h * frac
        ok = feasible(cand)
        first_bad = torch.where(ok, torch.full_like(pos, k + 1), pos).min().view(1)  # 1..k+1 in `ext`
        ext = torch.cat([lo_t, cand, hi_t])
        lo_t, hi_t = ext.index_select(0, first_bad - 1), ext.index_select(0, first_bad)
    return lo_t.squeeze(0)


def max_damage(damage: Callable[[Tensor], Tensor], gamma_init: float, tau: float, batch: int,
               device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """The gamma in ``[0, 2 gamma_init]`` with the largest ``damage(gamma)`` found by a batched search, and that
    damage (0-dim float64 tensors on ``device``).

    ``damage`` maps candidates ``(m,)`` float64 to values ``(m,)``. Step 1 evaluates 0 and Algorithm 1's halving
    sequence ``2 gamma_init / 2^k`` (k = 0 .. batch-2) in one batch; the bracket becomes the best point's two
    neighbours in that sequence. Each further step evaluates ``batch`` evenly spaced points of the bracket and
    re-centres a bracket of two spacings on the best gamma so far, until the spacing is below tau (a number of
    steps fixed in advance). A NaN value counts as the lowest. The best value never decreases, so the result
    does at least as much damage as gamma = 0 and every other gamma evaluated. Among equal values the gamma
    found first is kept (in step 1 the smallest).
    """
    k = batch
    g0 = float(gamma_init)
    grid = torch.cat([torch.zeros(1, dtype=F64, device=device),
                      2.0 * g0 * torch.pow(torch.tensor(0.5, dtype=F64, device=device),
                                           torch.arange(k - 2, -1, -1, device=device).to(F64))])
    vals = damage(grid).to(F64).nan_to_num(nan=-math.inf)  # a NaN damage never wins
    j = torch.argmax(vals).view(1)  # first maximum: the smallest gamma among ties
    best_g, best_v = grid.index_select(0, j), vals.index_select(0, j)
    lo = grid.index_select(0, (j - 1).clamp_min(0))
    hi = grid.index_select(0, (j + 1).clamp_max(k - 1))
    width = 1.5 * g0  # the widest neighbour bracket: [gamma_init / 2, 2 gamma_init]
    shrink = (k - 1) / 2.0
    steps = max(0, math.ceil(math.log(width / tau) / math.log(shrink))) if width > tau else 0
    frac = torch.arange(k, device=device).to(F64)
    for _ in range(steps):
        h = (hi - lo) / (k - 1)
        cand = lo + h * frac
        vals = damage(cand).to(F64).nan_to_num(nan=-math.inf)
        j = torch.argmax(vals).view(1)
        cg, cv = cand.index_select(0, j), vals.index_select(0, j)
        better = cv > best_v
        best_g, best_v = torch.where(better, cg, best_g), torch.where(better, cv, best_v)
        lo, hi = torch.maximum(lo, best_g - h), torch.minimum(hi, best_g + h)
    return best_g.squeeze(0), best_v.squeeze(0)


# ------------------------------------------------------------------------------------------ the attacks
def _moments(x: Tensor, mu: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For ``||mu + g p - x_i||^2 = c_i + 2 g b_i + g^2 a``: ``c_i = ||mu - x_i||^2``, ``b_i = <p, mu - x_i>``,
    ``a = ||p||^2`` (float64), so a batch of K candidates costs O(K n) after this one O(n d) pass."""
    diff = mu - x
    return diff.square().sum(dim=1), diff @ p, p @ p


def _finish(benign: Tensor, n_mal: int, mu: Tensor, p: Tensor, gamma: Tensor,
            damage: Tensor | None = None) -> MinMaxResult:
    mal = (mu + gamma * p).to(benign.dtype)
    return MinMaxResult(mal.unsqueeze(0).repeat(n_mal, 1), gamma, p, damage)


def minmax_attack(benign_updates: Tensor, n_mal: int, *, direction: str = "std", gamma_init: float = GAMMA_INIT,
                  tau: float = TAU, batch: int = BATCH) -> MinMaxResult:
    """Min-Max (Sec. IV-A): ``delta_m = mu + gamma p`` with the largest gamma in ``[0, 2 gamma_init]`` (to within
    tau) such that ``max_i ||delta_m - delta_i||^2 <= max_{i,j} ||delta_i - delta_j||^2`` over the benign
    updates; every attacker sends delta_m."""
    check_n_mal(n_mal)
    p = perturbation(benign_updates, direction)
    g0, tau, batch = _check_search(gamma_init, tau, batch, 1)
    x = benign_updates.to(F64)
    mu = x.mean(dim=0)
    c, b, a = _moments(x, mu, p)
    bound = pairwise_sq_dists(benign_updates).max()

    def feasible(g: Tensor) -> Tensor:
        d2 = c.unsqueeze(0) + 2.0 * g.unsqueeze(1) * b.unsqueeze(0) + (g * g * a).unsqueeze(1)
        return d2.max(dim=1).values <= bound

    gamma = largest_feasible(feasible, 2.0 * g0, tau, batch, benign_updates.device)
    return _finish(benign_updates, n_mal, mu, p, gamma)


def minsum_attack(benign_updates: Tensor, n_mal: int, *, direction: str = "std", gamma_init: float = GAMMA_INIT,
                  tau: float = TAU, batch: int = BATCH, bound: str = "min") -> MinMaxResult:
    """Min-Sum (Sec. IV-A): ``delta_m = mu + gamma p`` with the largest gamma in ``[0, 2 gamma_init]`` (to within
    tau) such that ``sum_i ||delta_m - delta_i||^2 <= min_k sum_j ||delta_k - delta_j||^2`` (``bound: min``, the
    authors' code; ``bound: max`` uses the largest benign sum); every attacker sends delta_m."""
    check_n_mal(n_mal)
    if bound not in ("min", "max"):
        raise ValueError(f"bound must be 'min' or 'max', got {bound!r}")
    p = perturbation(benign_updates, direction)
    g0, tau, batch = _check_search(gamma_init, tau, batch, 1)
    x = benign_updates.to(F64)
    mu = x.mean(dim=0)
    c, b, a = _moments(x, mu, p)
    sums = pairwise_sq_dists(benign_updates).sum(dim=1)
    limit = sums.min() if bound == "min" else sums.max()
    n = x.shape[0]
    c_sum, b_sum = c.sum(), b.sum()

    def feasible(g: Tensor) -> Tensor:
        return c_sum + 2.0 * g * b_sum + n * g * g * a <= limit

    gamma = largest_feasible(feasible, 2.0 * g0, tau, batch, benign_updates.device)
    return _finish(benign_updates, n_mal, mu, p, gamma)


def agr_tailored_attack(benign_updates: Tensor, n_mal: int, aggregate: Callable[[Tensor], Tensor], *,
                        coordinatewise: bool = False, direction: str = "std", gamma_init: float = GAMMA_INIT,
                        tau: float = TAU, batch: int = BATCH) -> MinMaxResult:
    """The AGR-tailored attack (Sec. IV-B) against any rule: ``delta_m = mu + gamma p`` with the gamma in
    ``[0, 2 gamma_init]`` that maximises ``||mu - aggregate([benign; delta_m x n_mal])||`` (:func:`max_damage`).

    ``aggregate`` maps an ``(n_ben + n_mal, D)`` update matrix (benign rows first, the attackers last, as the
    server orders them) to the aggregate ``(D,)``. With ``coordinatewise`` (the rule treats every coordinate on
    its own: mean, median, trimmed mean) a batch of candidates is one call on the candidate matrices laid side
    by side (``D = K d``, split to at most :data:`BATCH_ELEMS` elements); otherwise the rule is called once per
    candidate, ``batch`` calls per step, because the rules take one ``(n, d)`` matrix and most (Krum's selection,
    clustering, sorting by scores) cannot be vectorised over candidates."""
    n_mal = check_n_mal(n_mal)
    p = perturbation(benign_updates, direction)
    g0, tau, batch = _check_search(gamma_init, tau, batch, 4)
    n_ben, d = benign_updates.shape
    mu = benign_updates.to(F64).mean(dim=0)
    if n_mal == 0:
        return MinMaxResult(benign_updates.new_zeros((0, d)), torch.zeros((), dtype=F64), p, None)
    dtype = benign_updates.dtype
    n = n_ben + n_mal
    per_call = max(1, BATCH_ELEMS // (n * d))

    def damage(g: Tensor) -> Tensor:
        mal = (mu + g.unsqueeze(1) * p).to(dtype)  # (K, d)
        if coordinatewise:
            parts = []
            for s in range(0, mal.shape[0], per_call):
                m = mal[s:s + per_call]
                rows = torch.cat([benign_updates.repeat(1, m.shape[0]), m.reshape(1, -1).expand(n_mal, -1)])
                parts.append(aggregate(rows).reshape(m.shape[0], d))
            agg = torch.cat(parts)
        else:
            agg = torch.stack([aggregate(torch.cat([benign_updates, m.expand(n_mal, -1)])) for m in mal])
        return torch.linalg.vector_norm(agg.to(F64) - mu, dim=1)

    gamma, value = max_damage(damage, g0, tau, batch, benign_updates.device)
    return _finish(benign_updates, n_mal, mu, p, gamma, value)


def defense_aggregate(ctx: AttackContext) -> tuple[Callable[[Tensor], Tensor], bool]:
    """The cell's registered defense as the attackers can run it: ``(aggregate, coordinatewise)`` for
    :func:`agr_tailored_attack`.

    The defense gets a :class:`ServerContext` like the server's: its ``f`` is ``defense_params["f"]``, else the
    cell's attackers (at least 1); its params are the cell's ``defense_params`` without ``f`` / ``pretrain``; a
    fresh state on every call (the attackers do not hold the server's memory across rounds); for randomised
    rules a generator re-seeded on every call from one seed drawn from ``ctx.generator``, so every candidate
    gamma meets the same random draws. Server data the attackers do not have is replaced by stand-ins:
    FLTrust's root-set update by the benign mean update; FLARE's auxiliary set by the first
    :data:`AUX_STANDIN` inputs of the first attacker's own data (the PLRs of every model on it); a candidate
    whose PLRs are not finite, which the server would exclude, gets a NaN aggregate (never the best gamma)."""
    defense, n_mal = ctx.defense, ctx.n_attackers
    fn = DEFENSES.get(defense)
    dp = dict(ctx.defense_params)
    f = dp.get("f", max(n_mal, 1))
    params = {k: v for k, v in dp.items() if k not in ("f", "pretrain")}
    gen = ctx.generator
    seed = 0 if gen is None else int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
    benign = ctx.benign_updates
    server_update_fn = None
    if defense in NEEDS_ROOT:
        mean_update = benign.to(F64).mean(dim=0).to(benign.dtype)
        server_update_fn = lambda: mean_update  # noqa: E731
    if defense in NEEDS_AUX:
        if not ctx.attacker_data or len(ctx.attacker_data[0][0]) < 2:
            raise ValueError(f"attack 'agr_tailored' against {defense!r} stands in for the server's auxiliary set "
                             "with the attackers' own inputs, but the first attacker holds fewer than 2")
        x_aux = ctx.attacker_data[0][0][:AUX_STANDIN]
        theta = ctx.global_flat.to(benign.dtype)
        n_ben = benign.shape[0]
        ben_plrs = model_plrs(ctx.model, theta + benign, x_aux)

    def aggregate(updates: Tensor) -> Tensor:
        plr_fn = None
        if defense in NEEDS_AUX:  # rows: the benign updates first (as agr_tailored_attack lays them out)
            plrs = torch.cat([ben_plrs, model_plrs(ctx.model, theta + updates[n_ben:], x_aux)])
            if not bool(torch.isfinite(plrs).all()):  # the server would drop these attackers: never the best
                return torch.full_like(updates[0], math.nan)
            plr_fn = lambda u: plrs  # noqa: E731
        sctx = ServerContext(n_clients=updates.shape[0], f=f, params=dict(params), plr_fn=plr_fn,
                             server_update_fn=server_update_fn, state={},
                             generator=torch.Generator().manual_seed(seed))
        return fn(updates, sctx).update

    return aggregate, defense in COORDINATEWISE and "pre" not in params


# ------------------------------------------------------------------------------------ registered attacks
_COMMON = {"direction", "gamma_init", "tau", "batch"}


def _opts(ctx: AttackContext, name: str, extra: dict[str, Any]) -> dict[str, Any]:
    allowed = _COMMON | set(extra)
    unknown = set(ctx.params) - allowed
    if unknown:
        raise ValueError(f"attack {name!r}: unknown params {sorted(unknown)}; allowed: {sorted(allowed)}")
    o = {"direction": "std", "gamma_init": GAMMA_INIT, "tau": TAU, "batch": BATCH, **extra}
    o.update(ctx.params)
    return o


def _named(name: str, run: Callable[[], MinMaxResult]) -> Tensor:
    try:
        return run().updates
    except ValueError as exc:
        raise ValueError(f"attack {name!r}: {exc}") from exc


@register_attack("minmax", targeted=False)
def minmax(ctx: AttackContext) -> Tensor:
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021, Sec. IV-A): the benign mean plus gamma times a direction,
    gamma as large as keeps its largest distance to a benign update within the largest benign pairwise one.

    ``ctx.params``: direction (unit | sign | std, default std), gamma_init (10), tau (1e-5), batch (16)."""
    o = _opts(ctx, "minmax", {})
    return _named("minmax", lambda: minmax_attack(ctx.benign_updates, ctx.n_attackers, direction=o["direction"],
                                                  gamma_init=o["gamma_init"], tau=o["tau"], batch=o["batch"]))


@register_attack("minsum", targeted=False)
def minsum(ctx: AttackContext) -> Tensor:
    """Min-Sum (Shejwalkar & Houmansadr, NDSS 2021, Sec. IV-A): the benign mean plus gamma times a direction,
    gamma as large as keeps its sum of squared distances to the benign updates within the smallest benign one.

    ``ctx.params``: direction (unit | sign | std, default std), gamma_init (10), tau (1e-5), batch (16),
    bound (min | max: the smallest or largest benign sum)."""
    o = _opts(ctx, "minsum", {"bound": "min"})
    return _named("minsum", lambda: minsum_attack(ctx.benign_updates, ctx.n_attackers, direction=o["direction"],
                                                  gamma_init=o["gamma_init"], tau=o["tau"], batch=o["batch"],
                                                  bound=o["bound"]))


@register_attack("agr_tailored", targeted=False)
def agr_tailored(ctx: AttackContext) -> Tensor:
    """AGR-tailored attack (Shejwalkar & Houmansadr, NDSS 2021, Sec. IV-B) against the cell's own defense: the
    benign mean plus the gamma times a direction that moves the defense's aggregate furthest from the mean.

    ``ctx.params``: direction (unit | sign | std, default std), gamma_init (10), tau (1e-5), batch (16, >= 4).
    Against FLTrust and FLARE the server's own data is replaced by stand-ins (:func:`defense_aggregate`)."""
    o = _opts(ctx, "agr_tailored", {})

    def run() -> MinMaxResult:
        aggregate, coordinatewise = defense_aggregate(ctx)
        return agr_tailored_attack(ctx.benign_updates, ctx.n_attackers, aggregate, coordinatewise=coordinatewise,
                                   direction=o["direction"], gamma_init=o["gamma_init"], tau=o["tau"],
                                   batch=o["batch"])

    return _named("agr_tailored", run)
