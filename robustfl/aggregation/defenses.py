"""Defense registry: config name -> ``fn(updates (n, d), ctx: ServerContext) -> AggResult``.

Each entry adapts a pure rule of :mod:`robustfl.aggregation.aggregators` (or :mod:`robustfl.aggregation.suite`)
to the server: it reads the rule's parameters from ``ctx.params`` (the cell's ``defense_params``) and, where a
rule needs more than the updates, asks the server for it (FLARE: PLRs of every local model on the auxiliary
set; FLTrust: the server's own update on its root set), takes random numbers from ``ctx.generator`` and keeps
what a rule needs across rounds in ``ctx.state``. Adding a defense is one function plus one decorator line.

Every registered defense also accepts ``pre`` in its params: one or a list of pre-aggregators
(:mod:`robustfl.aggregation.preaggregators`: ``nnm``, ``bucketing``; a name or ``{name: ..., <param>: ...}``)
applied in order before the rule, inside the registry's dispatch (:func:`with_pre`); the weights the rule
gives the mixed vectors are mapped back to the clients (``mix.T @ weights``).

**Across rounds.** ``ServerContext.state`` is one dict per run that the FL loop passes every round and keeps in
its checkpoints, with ``ServerContext.generator`` (the server's own random stream) and its state;
``ServerContext.client_ids`` names the client behind each row (the server drops non-finite clients before the
rule). Centered clipping keeps its centre there and FoolsGold its history. A caller that gives a fresh
``state`` every round gets centered clipping centred at 0 and FoolsGold without memory (``info`` says so:
``centred_at_zero``, ``history_rounds``); one without a generator gets a fixed-seed stream
(:func:`robustfl.aggregation.suite.fallback_generator`), logged once per defense (docs/decisions/defenses-suite.md).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from robustfl.aggregation import aggregators as agg
from robustfl.aggregation import preaggregators as pre_agg
from robustfl.aggregation import suite
from robustfl.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class ServerContext:
    """What the parameter server knows when it aggregates one round."""

    n_clients: int
    f: int  # the number of attackers the server assumes (rules that need it: Krum, Bulyan, trimmed mean, DnC, NNM)
    params: dict[str, Any] = field(default_factory=dict)
    plr_fn: Callable[[torch.Tensor], torch.Tensor] | None = None  # updates (n, d) -> PLRs (n, m, o)
    server_update_fn: Callable[[], torch.Tensor] | None = None  # FLTrust root-set update (d,)
    # kept by the server between rounds (the same dict every round, saved in checkpoints); defenses store
    # their history under their own name (centered clipping: the previous aggregate; FoolsGold: each
    # client's summed updates). A fresh dict every round = no history (see the module docstring).
    state: dict[str, Any] = field(default_factory=dict)
    # the defenses' random numbers (DnC, SignGuard, FLAME, weak DP, bucketing); None = a fixed-seed fallback
    generator: torch.Generator | None = None
    # the client index behind each row of the update matrix (FoolsGold's history); None = row i is client i
    client_ids: Sequence[int] | None = None


DefenseFn = Callable[[torch.Tensor, ServerContext], "agg.AggResult"]


class DefenseRegistry(Registry[DefenseFn]):
    """The defense registry: every registered function is wrapped by :func:`with_pre`, so any defense takes
    ``pre`` (pre-aggregators) in its params. ``register`` returns the unwrapped function."""

    def register(self, name: str) -> Callable[[DefenseFn], DefenseFn]:
        store = super().register(name)

        def deco(fn: DefenseFn) -> DefenseFn:
            store(with_pre(name, fn))
            return fn

        return deco


DEFENSES: DefenseRegistry = DefenseRegistry("defense")

#: Defenses that need the auxiliary set and pre-train the initial model on it (Section 5.2, point 1).
NEEDS_AUX = {"flare"}
NEEDS_ROOT = {"fltrust"}
#: Defenses that keep per-client state across rounds (they need ServerContext.client_ids and a stable state).
STATEFUL = {"centered_clipping", "foolsgold"}
#: Defenses whose inputs are per client and so cannot run on pre-aggregated (mixed) vectors.
NO_PRE = {"flare": "FLARE scores each client's own local model by its PLRs",
          "foolsgold": "FoolsGold keeps each client's history of updates"}


# ------------------------------------------------------------------------------------- pre-aggregators
def parse_pre(value: Any, defense: str) -> list[dict[str, Any]]:
    """The ``pre`` option as a list of ``{"name": ..., <param>: ...}``: ``None`` -> none; a name; a mapping
    with ``name``; or a list of names / mappings (applied in order). ``ValueError`` naming the problem."""
    where = f"defense {defense!r}: pre"
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    specs: list[dict[str, Any]] = []
    for item in items:
        spec = {"name": item} if isinstance(item, str) else item
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"{where}: each entry must be a pre-aggregator name or a mapping with 'name' "
                             f"({', '.join(sorted(pre_agg.PRE_AGGREGATORS))}), got {item!r}")
        name = spec["name"]
        if name not in pre_agg.PRE_AGGREGATORS:
            raise ValueError(f"{where}: unknown pre-aggregator {name!r}; known: "
                             f"{', '.join(sorted(pre_agg.PRE_AGGREGATORS))}")
        allowed = set(pre_agg.PRE_AGGREGATORS[name][1])
        unknown = set(spec) - allowed - {"name"}
        if unknown:
            raise ValueError(f"{where}: unknown params {sorted(unknown)} for {name!r}; allowed: {sorted(allowed)}")
        for key in allowed & set(spec):
            v = spec[key]
            lo = 0 if key == "f" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{where}: {name} {key} must be an int >= {lo}, got {v!r}")
        specs.append(dict(spec))
    if specs and defense in NO_PRE:
        raise ValueError(f"{where}: {defense} does not take pre-aggregators ({NO_PRE[defense]}; a pre-aggregator "
                         "mixes clients)")
    return specs


def apply_pre(updates: torch.Tensor, specs: list[dict[str, Any]], ctx: ServerContext
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the pre-aggregators in order; returns the mixed vectors and the total ``(m, n)`` mix."""
    agg.check_updates(updates)
    x = updates
    mix = torch.eye(updates.shape[0], dtype=torch.float64, device=updates.device)
    for spec in specs:
        if spec["name"] == "nnm":
            x, m = pre_agg.nnm(x, spec.get("f", _f(ctx)))
        else:
            x, m = pre_agg.bucketing(x, spec.get("s", 2), generator=_generator(ctx, spec["name"]))
        mix = m @ mix
    return x, mix


def with_pre(name: str, fn: DefenseFn) -> DefenseFn:
    """Wrap a defense so that ``params["pre"]`` (if any) runs first: the rule sees the mixed vectors (and a
    context with ``n_clients`` = their number, no ``client_ids``), its weights are mapped back to the clients
    as ``mix.T @ weights``; ``info`` keeps the rule's own info (about the mixed vectors) plus ``pre``
    (the specs), ``mix`` and ``inner_weights``. Without ``pre`` the defense is called unchanged."""

    def wrapped(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
        if "pre" not in ctx.params:
            return fn(updates, ctx)
        specs = parse_pre(ctx.params["pre"], name)
        inner_ctx = dataclasses.replace(ctx, params={k: v for k, v in ctx.params.items() if k != "pre"})
        if not specs:
            return fn(updates, inner_ctx)
        mixed, mix = apply_pre(updates, specs, ctx)
        inner_ctx = dataclasses.replace(inner_ctx, n_clients=mixed.shape[0], client_ids=None)
        try:
            res = fn(mixed, inner_ctx)
        except ValueError as exc:
            raise ValueError(f"defense {name!r} after pre {[s['name'] for s in specs]} (the rule sees "
                             f"{mixed.shape[0]} mixed vectors of {updates.shape[0]} clients): {exc}") from exc
        weights = mix.T @ res.weights.to(torch.float64)
        info = dict(res.info)
        info.update(pre=specs, mix=mix, inner_weights=res.weights)
        return agg.AggResult(res.update, weights, info)

    wrapped.__name__ = getattr(fn, "__name__", name)
    wrapped.__doc__ = fn.__doc__
    wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapped


def _generator(ctx: ServerContext, name: str) -> torch.Generator:
    """The server's generator, or the fixed-seed fallback (logged once per defense)."""
    if ctx.generator is not None:
        return ctx.generator
    if name not in _WARNED:
        _WARNED.add(name)
        log.warning("defense %r: no generator in ServerContext; using a fixed-seed generator (seed %d), so the "
                    "same random draws every round", name, suite.FALLBACK_SEED)
    return suite.fallback_generator()


_WARNED: set[str] = set()


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


# ------------------------------------------------------------------------------ the standard defense suite
def _opts(params: dict[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` overridden by ``params``; an unknown key is one ``ValueError`` naming it (``f``, the
    server's assumed number of attackers, and ``pre`` are accepted by every defense)."""
    allowed = set(defaults) | {"f", "pre"}
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"defense {name!r}: unknown params {sorted(unknown)}; allowed: {sorted(allowed)}")
    return {k: params.get(k, v) for k, v in defaults.items()}


def _checked(name: str, check: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run a parameter check; its ValueError (which names the parameter) is prefixed with the defense."""
    try:
        return check(*args, **kw)
    except ValueError as exc:
        raise ValueError(f"defense {name!r}: {exc}") from None


def _real(name: str, o: dict[str, Any], key: str, **kw: Any) -> None:
    o[key] = _checked(name, suite._check_real, o[key], key, **kw)


def _count(name: str, o: dict[str, Any], key: str, lo: int) -> None:
    o[key] = _checked(name, suite._check_count, o[key], key, lo)


def _choice(name: str, o: dict[str, Any], key: str, options: tuple[str, ...]) -> None:
    if o[key] not in options:
        raise ValueError(f"defense {name!r}: {key} must be one of {list(options)}, got {o[key]!r}")


def _parse_geomed(p: dict[str, Any]) -> dict[str, Any]:
    o = _opts(p, "geomed", {"nu": 1e-6, "iters": 3, "tol": 1e-6, "init": "mean"})
    _real("geomed", o, "nu", lo=0.0, lo_open=True)
    _count("geomed", o, "iters", 1)
    _real("geomed", o, "tol", lo=0.0)
    _choice("geomed", o, "init", ("mean", "zero"))
    return o


def _parse_centered_clipping(p: dict[str, Any]) -> dict[str, Any]:
    o = _opts(p, "centered_clipping", {"tau": 100.0, "iters": 1})
    _real("centered_clipping", o, "tau", lo=0.0, lo_open=True)
    _count("centered_clipping", o, "iters", 1)
    return o


def _parse_dnc(p: dict[str, Any]) -> dict[str, Any]:
    o = _opts(p, "dnc", {"b": 10000, "niters": 5, "c": 1.0})
    _count("dnc", o, "b", 1)
    _count("dnc", o, "niters", 1)
    _real("dnc", o, "c", lo=0.0)
    return o


def _parse_signguard(p: dict[str, Any]) -> dict[str, Any]:
    o = _opts(p, "signguard", {"lower": 0.1, "upper": 3.0, "frac": 0.1, "quantile": 0.5})
    _real("signguard", o, "lower", lo=0.0)
    _real("signguard", o, "upper", lo=0.0)
    if o["upper"] < o["lower"]:
        raise ValueError(f"defense 'signguard': upper must be >= lower, got lower={o['lower']:g}, upper={o['upper']:g}")
    _real("signguard", o, "frac", lo=0.0, hi=1.0, lo_open=True)
    _real("signguard", o, "quantile", lo=0.0, hi=1.0, lo_open=True)
    return o


def _parse_flame(p: dict[str, Any]) -> dict[str, Any]:
    o = _opts(p, "flame", {"lam": None, "epsilon": None, "delta": None})
    if o["epsilon"] is not None or o["delta"] is not None:
        if o["lam"] is not None:
            raise ValueError("defense 'flame': give lam or epsilon and delta, not both")
        if o["epsilon"] is None or o["delta"] is None:
            raise ValueError("defense 'flame': epsilon and delta go together (lam = sqrt(2 ln(1.25/delta)) / epsilon)")
        lam = _checked("flame", suite.flame_lambda, o["epsilon"], o["delta"])
    else:
        lam = 0.001 if o["lam"] is None else _checked("flame", suite._check_real, o["lam"], "lam", lo=0.0)
    return {"lam": lam}


def _parse_foolsgold(p: dict[str, Any]) -> dict[str, Any]:
    o = _opts(p, "foolsgold", {"kappa": 1.0, "aggregate": "mean"})
    _real("foolsgold", o, "kappa", lo=0.0, lo_open=True)
    _choice("foolsgold", o, "aggregate", ("mean", "sum"))
    return o


def _parse_norm_clipping(p: dict[str, Any]) -> dict[str, Any]:
    o = _opts(p, "norm_clipping", {"M": 3.0})
    _real("norm_clipping", o, "M", lo=0.0, lo_open=True)
    return o


def _parse_weak_dp(p: dict[str, Any]) -> dict[str, Any]:
    o = _opts(p, "weak_dp", {"M": 3.0, "sigma": 0.025})
    _real("weak_dp", o, "M", lo=0.0, lo_open=True)
    _real("weak_dp", o, "sigma", lo=0.0)
    return o


#: defense -> its params parser (defaults filled in, every value checked; ValueError naming the key)
PARAM_PARSERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "geomed": _parse_geomed, "centered_clipping": _parse_centered_clipping, "dnc": _parse_dnc,
    "signguard": _parse_signguard, "flame": _parse_flame, "foolsgold": _parse_foolsgold,
    "norm_clipping": _parse_norm_clipping, "weak_dp": _parse_weak_dp,
}


def check_defense_params(defense: str, params: dict[str, Any] | None, n_clients: int | None = None,
                         f: int | None = None) -> None:
    """Check a cell's ``defense_params`` before any training (for the config layer): ``pre`` for every
    defense; for the suite's defenses (:data:`PARAM_PARSERS`) every key and value; with ``n_clients`` and
    ``f`` also what depends on them (DnC's ``floor(c f) < n``, NNM's ``f < n``). ``ValueError`` naming the
    key; returns None when the params are fine."""
    DEFENSES.get(defense)  # unknown defense: the registry's error
    params = dict(params or {})
    specs = parse_pre(params.get("pre"), defense)
    if defense in PARAM_PARSERS:
        o = PARAM_PARSERS[defense](params)
    else:
        o = {}
    f = int(params.get("f", f)) if params.get("f", f) is not None else None
    if n_clients is not None and f is not None:
        m = n_clients
        for spec in specs:
            if spec["name"] == "nnm" and not spec.get("f", f) < m:
                raise ValueError(f"defense {defense!r}: pre nnm needs f < n (got n={m}, f={spec.get('f', f)})")
            if spec["name"] == "bucketing":
                m = -(-m // spec.get("s", 2))
        if defense == "dnc" and not int(math.floor(o["c"] * f + 1e-9)) < m:
            raise ValueError(f"defense 'dnc': c={o['c']:g} with f={f} removes floor(c*f) = "
                             f"{int(math.floor(o['c'] * f + 1e-9))} of {m} updates; needs floor(c*f) < n")


@DEFENSES.register("geomed")
def geomed(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """RFA geometric median (Pillutla et al., IEEE TSP 2022) by the smoothed Weiszfeld algorithm:
    ``nu`` (1e-6), ``iters`` (R = 3), ``tol`` (relative objective change, 1e-6), ``init`` (mean | zero)."""
    return suite.geomed(updates, **_parse_geomed(ctx.params))


@DEFENSES.register("centered_clipping")
def centered_clipping(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """Centered clipping (Karimireddy et al., ICML 2021): ``tau`` (100), ``iters`` (L = 1), centred at the
    previous round's aggregate, kept in ``ctx.state["centered_clipping"]["centre"]`` (0 before any round, and
    every round when the server passes a fresh state)."""
    o = _parse_centered_clipping(ctx.params)
    d = agg.check_updates(updates)[1]
    st = ctx.state.setdefault("centered_clipping", {})
    centre = st.get("centre")
    if centre is not None and centre.numel() != d:
        raise ValueError(f"defense 'centered_clipping': the kept centre has {centre.numel()} entries, the updates "
                         f"d={d} (state from another model?)")
    res = suite.centered_clipping(updates, o["tau"], o["iters"],
                                  None if centre is None else centre.to(updates.device))
    rounds = st.get("rounds", 0)
    st["centre"] = res.update.detach().clone()
    st["rounds"] = rounds + 1
    res.info["history_rounds"] = rounds
    return res


@DEFENSES.register("dnc")
def dnc(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021): ``b`` (10000 coordinates), ``niters`` (5),
    ``c`` (1.0) with the server's f; coordinates drawn from ``ctx.generator``."""
    o = _parse_dnc(ctx.params)
    return suite.dnc(updates, _f(ctx), o["b"], o["niters"], o["c"], generator=_generator(ctx, "dnc"))


@DEFENSES.register("signguard")
def signguard(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """SignGuard (Xu et al., ICDCS 2022): norm bounds ``lower`` (0.1) / ``upper`` (3.0) of the median norm,
    MeanShift on the sign statistics of ``frac`` (0.1) of the coordinates, drawn from ``ctx.generator``."""
    o = _parse_signguard(ctx.params)
    return suite.signguard(updates, o["lower"], o["upper"], o["frac"], generator=_generator(ctx, "signguard"),
                           quantile=o["quantile"])


@DEFENSES.register("flame")
def flame(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """FLAME (Nguyen et al., USENIX Security 2022): cosine HDBSCAN, median-norm clipping, Gaussian noise
    ``lam * S_t`` (``lam`` 0.001, or ``epsilon`` and ``delta``) drawn from ``ctx.generator``."""
    o = _parse_flame(ctx.params)
    return suite.flame(updates, o["lam"], generator=_generator(ctx, "flame"))


@DEFENSES.register("foolsgold")
def foolsgold(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """FoolsGold (Fung et al., RAID 2020): ``kappa`` (1), ``aggregate`` (mean | sum). Each client's summed
    updates are kept in ``ctx.state["foolsgold"]`` keyed by ``ctx.client_ids`` (row index when None); a fresh
    state every round leaves only the current round's updates (FoolsGold without memory)."""
    o = _parse_foolsgold(ctx.params)
    n, d = agg.check_updates(updates)
    ids = list(range(n)) if ctx.client_ids is None else [int(i) for i in ctx.client_ids]
    if len(ids) != n or len(set(ids)) != n:
        raise ValueError(f"defense 'foolsgold': client_ids must name the n={n} rows once each, got {ctx.client_ids!r}")
    st = ctx.state.setdefault("foolsgold", {"ids": [], "history": None, "rounds": 0})
    hist, known = st["history"], {cid: k for k, cid in enumerate(st["ids"])}
    if hist is not None and hist.shape[1] != d:
        raise ValueError(f"defense 'foolsgold': the kept history has d={hist.shape[1]}, the updates d={d} "
                         "(state from another model?)")
    rows = [r for r, cid in enumerate(ids) if cid in known]
    prev = None
    if rows:
        prev = torch.zeros_like(updates)
        prev[rows] = hist[[known[ids[r]] for r in rows]].to(device=updates.device, dtype=updates.dtype)
    res = suite.foolsgold(updates, prev, o["kappa"], o["aggregate"])
    new_h = res.info.pop("history")
    if rows:
        hist[[known[ids[r]] for r in rows]] = new_h[rows].to(device=hist.device, dtype=hist.dtype)
    fresh = [r for r, cid in enumerate(ids) if cid not in known]
    if fresh:
        add = new_h[fresh].detach().clone()
        st["history"] = add if hist is None else torch.cat([hist, add.to(device=hist.device, dtype=hist.dtype)])
        st["ids"] = st["ids"] + [ids[r] for r in fresh]
    res.info["history_rounds"] = st["rounds"]
    res.info["with_history"] = len(rows)
    st["rounds"] += 1
    return res


@DEFENSES.register("norm_clipping")
def norm_clipping(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """Norm clipping (Sun et al. 2019): each update clipped to norm ``M`` (3), then averaged."""
    o = _parse_norm_clipping(ctx.params)
    return suite.norm_clipping(updates, o["M"])


@DEFENSES.register("weak_dp")
def weak_dp(updates: torch.Tensor, ctx: ServerContext) -> agg.AggResult:
    """Weak differential privacy (Sun et al. 2019): norm clipping to ``M`` (3) plus Gaussian noise of std
    ``sigma`` (0.025) on the aggregate, drawn from ``ctx.generator``."""
    o = _parse_weak_dp(ctx.params)
    return suite.norm_clipping(updates, o["M"], o["sigma"], generator=_generator(ctx, "weak_dp"))
