"""Defense registry: config name -> ``fn(updates (n, d), ctx: ServerContext) -> AggResult``.

Each entry adapts a pure rule of :mod:`robustfl.aggregation.aggregators` to the server: it reads the rule's
parameters from ``ctx.params`` (the cell's ``defense_params``) and, where a rule needs more than the
updates, asks the server for it (FLARE: PLRs of every local model on the auxiliary set; FLTrust:
the server's own update on its root set). Adding a defense is one function plus one decorator line.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from robustfl.aggregation import aggregators as agg
from robustfl.registry import Registry


@dataclass
class ServerContext:
    """What the parameter server knows when it aggregates one round."""

    n_clients: int
    f: int  # the number of attackers the server assumes (rules that need it: Krum, Bulyan, trimmed mean)
    params: dict[str, Any] = field(default_factory=dict)
    plr_fn: Callable[[torch.Tensor], torch.Tensor] | None = None  # updates (n, d) -> PLRs (n, m, o)
    server_update_fn: Callable[[], torch.Tensor] | None = None  # FLTrust root-set update (d,)


DefenseFn = Callable[[torch.Tensor, ServerContext], "agg.AggResult"]
DEFENSES: Registry[DefenseFn] = Registry("defense")

#: Defenses that need the auxiliary set and pre-train the initial model on it (Section 5.2, point 1).
NEEDS_AUX = {"flare"}
NEEDS_ROOT = {"fltrust"}


def _f(ctx: ServerContext) -> int:
    return int(ctx.params.get("f", ctx.f))


@DEFENSES.register("fedavg")
def fedavg(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """FedAvg (McMahan et al. 2017): plain mean of the updates (equal shards)."""
    return agg.fedavg(updates)


@DEFENSES.register("krum")
def krum(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """Krum (Blanchard et al. 2017); ``m > 1`` gives multi-Krum."""
    return agg.krum(updates, _f(ctx), m=int(ctx.params.get("m", 1)),
                    distance=ctx.params.get("distance", "squared"))


@DEFENSES.register("median")
def median(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """Coordinate-wise median, 'Coomed' (Yin et al. 2018)."""
    return agg.median(updates)


def _check_keys(ctx: ServerContext, allowed: set[str], name: str) -> None:
    unknown = set(ctx.params) - allowed
    if unknown:
        raise ValueError(f"defense {name!r}: unknown params {sorted(unknown)}; allowed: {sorted(allowed)}")


def trim_k(trim: Any, n: int, f: int) -> int:
    """Values dropped at each end by the trimmed mean, from the cell's ``trim`` option.

    ``"f"``: k = f, the number of attackers the server assumes (Fang et al. 2020's evaluation; Yin et al.
    2018's guarantee needs k >= f). ``"code"``: k = int(0.1 n), the FLARE authors' code (beta = 0.1, one per
    side for n = 10). An int >= 0: that k. A float in (0, 0.5): the fraction beta of Yin et al. 2018,
    k = int(beta n). Needs n > 2k.
    """
    if isinstance(trim, bool):
        raise ValueError(f"trimmed_mean: trim must be 'f', 'code', an int k >= 0 or a fraction in (0, 0.5), "
                         f"got {trim!r}")
    if trim == "f":
        k = f
    elif trim == "code":
        k = int(0.1 * n)
    elif isinstance(trim, int):
        k = trim
    elif isinstance(trim, float) and 0 < trim < 0.5:
        k = int(trim * n)
    else:
        raise ValueError(f"trimmed_mean: trim must be 'f', 'code', an int k >= 0 or a fraction in (0, 0.5), "
                         f"got {trim!r}")
    if k < 0 or not n > 2 * k:
        raise ValueError(f"trimmed_mean: trim={trim!r} drops k={k} values per side, but n={n} clients need "
                         f"0 <= k and n > 2k (k <= {(n - 1) // 2})")
    return k


@DEFENSES.register("trimmed_mean")
def trimmed_mean(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """Trimmed mean (Yin et al. 2018): per coordinate drop the k largest and k smallest values, average the
    rest. ``trim`` (synonym ``k``) chooses k (:func:`trim_k`): ``f`` (default, the assumed f), ``code``
    (int(0.1 n), the authors' code), an int k or a fraction beta."""
    _check_keys(ctx, {"trim", "k", "f"}, "trimmed_mean")
    if "trim" in ctx.params and "k" in ctx.params:
        raise ValueError("defense 'trimmed_mean': give trim or its synonym k, not both")
    trim = ctx.params.get("trim", ctx.params.get("k", "f"))
    return agg.trimmed_mean(updates, trim_k(trim, updates.shape[0], _f(ctx)))


@DEFENSES.register("bulyan")
def bulyan(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """Bulyan (El Mhamdi et al. 2018) on the whole flattened update with the assumed f: the cell's attackers
    (at least 1) unless the cell sets ``defense_params: {f: ...}`` (the authors' code uses f = 1). Needs
    n >= 4f + 3; otherwise a ValueError names f and n (3 attackers of 10 clients need ``f: 1``)."""
    _check_keys(ctx, {"f"}, "bulyan")
    n = updates.shape[0]
    f = _f(ctx)
    if not n >= 4 * f + 3:
        raise ValueError(f"defense 'bulyan': f={f} is inadmissible for n={n} clients (Bulyan needs n >= 4f + 3, "
                         f"so f <= {(n - 3) // 4}); set defense_params {{f: ...}} (the authors' code uses f = 1)")
    return agg.bulyan(updates, f)


@DEFENSES.register("fltrust")
def fltrust(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """FLTrust (Cao et al., NDSS 2021) with the server's root-set update."""
    if ctx.server_update_fn is None:
        raise ValueError("fltrust needs the server's root-set update (no server_update_fn)")
    return agg.fltrust(updates, ctx.server_update_fn())


@DEFENSES.register("flare")
def flare(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """FLARE (Section 5, Algorithm 1, Eqs. 4-6): trust from MMD nearest-neighbour counts of the PLRs.
    ``variant: code`` selects the authors' code behaviour (see docs/decisions.md)."""
    if ctx.plr_fn is None:
        raise ValueError("flare needs the local models' PLRs on the auxiliary set (no plr_fn)")
    p = dict(ctx.params)
    return agg.flare(updates, ctx.plr_fn(updates), tau=float(p.pop("tau", 1.0)), **p)
