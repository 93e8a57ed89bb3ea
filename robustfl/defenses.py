"""Defense registry: config name -> ``fn(updates (n, d), ctx: ServerContext) -> AggResult``.

Each entry adapts a pure rule of :mod:`robustfl.aggregators` to the server: it reads the rule's
parameters from ``ctx.params`` (the cell's ``defense_params``) and, where a rule needs more than the
updates, asks the server for it (FLARE: PLRs of every local model on the auxiliary set; FLTrust:
the server's own update on its root set). Adding a defense is one function plus one decorator line.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from robustfl import aggregators as agg
from robustfl.registry import Registry

log = logging.getLogger("robustfl")


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


@DEFENSES.register("trimmed_mean")
def trimmed_mean(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """Trimmed mean (Yin et al. 2018). ``k`` defaults to the assumed f (Fang et al.'s setting);
    ``k: code`` uses the authors' code value int(0.1 n)."""
    k = ctx.params.get("k", _f(ctx))
    if k == "code":
        k = int(0.1 * ctx.n_clients)
    return agg.trimmed_mean(updates, int(k))


@DEFENSES.register("bulyan")
def bulyan(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """Bulyan (El Mhamdi et al. 2018). Needs n >= 4f + 3: where the assumed f is larger (the paper's
    untargeted setting, f = 3 of n = 10) the largest admissible f is used and a warning logged (the
    authors' code fixes f = 1, which is that value for n = 10)."""
    n = updates.shape[0]
    f = _f(ctx)
    f_max = max((n - 3) // 4, 0)
    if f > f_max and "f" not in ctx.params:
        log.warning("bulyan: f = %d is inadmissible for n = %d (needs n >= 4f + 3); using f = %d", f, n, f_max)
        f = f_max
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
