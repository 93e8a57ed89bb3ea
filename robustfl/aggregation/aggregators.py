"""Aggregation rules as pure functions on an ``(n, d)`` tensor of flattened client updates.

Every rule returns an :class:`AggResult` ``(update (d,), weights (n,), info)``:

* ``update`` -- the aggregate ``delta`` the server adds to the global model (same dtype/device as the input);
* ``weights[i]`` -- client i's effective weight (float64, same device):

  - FedAvg: ``1/n`` (or ``size_i / sum(sizes)``), sums to 1;
  - Krum: 0/1 selection; multi-Krum: ``1/m`` on the m selected, sums to 1;
  - median / trimmed mean / Bulyan: the **fraction of coordinates in which client i's value was used**
    (kept) in the coordinate-wise average, so each weight is in [0, 1] and the weights sum to the number
    of values averaged per coordinate (1 for the median with odd n, 2 with even n, ``n - 2k`` for the
    trimmed mean, ``beta`` for Bulyan). ``info["share"]`` holds the same quantity divided by that number
    (the mean coefficient of client i in the aggregate; sums to 1);
  - FLTrust: ``TS_i / sum_j TS_j`` (normalised trust; the update of client i is also rescaled);
  - FLARE: the trust score ``S_i`` of Eq. (5) (sums to 1).
* ``info`` -- extra loggable things (Krum scores, selected indices, FLARE counts and MMD matrix, ...).

All rules validate their input with :func:`check_updates` and raise ``ValueError`` naming the problem
(the simulator removes non-finite clients *before* calling a rule, so a rule never filters silently).

Numerics: pairwise distances are computed in float64 on updates centred at their coordinate-wise median,
in column chunks (:func:`pairwise_sq_dists`), so ``||a||^2 + ||b||^2 - 2<a, b>`` does not cancel
catastrophically for near-identical updates and memory stays bounded for n = 200, d ~ 3.3M.
Coordinate-wise rules sort in column chunks (a Python loop over chunks of columns, never over single
coordinates). Remaining ties are broken by the lower client index (stable sorts); Krum-type selections
first break score ties by the sum of distances to all others. The choices the papers
leave open are listed in ``docs/decisions/aggregators.md``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "AggResult",
    "FlareDetails",
    "check_updates",
    "pairwise_sq_dists",
    "fedavg",
    "krum",
    "krum_order",
    "krum_scores",
    "median",
    "trimmed_mean",
    "bulyan",
    "fltrust",
    "mmd2_unbiased",
    "pairwise_mmd2",
    "median_bandwidth",
    "flare_counts",
    "flare_details",
    "flare_trust",
    "flare",
    "round_half_up",
]

#: elements (n * columns) processed per chunk in the chunked column loops (2**26 float64 = 512 MiB)
_CHUNK_ELEMS = 1 << 26


@dataclass(frozen=True)
class AggResult:
    """Result of one aggregation: the aggregate update, per-client effective weights, loggable extras."""

    update: Tensor  # (d,)
    weights: Tensor  # (n,) float64
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- validation
def check_updates(updates: Tensor, name: str = "updates") -> tuple[int, int]:
    """Validate an ``(n, d)`` floating, finite tensor with n >= 1 and d >= 1; return ``(n, d)``.

    Raises ``ValueError`` naming the problem (wrong type / ndim / dtype, empty, or the indices of the
    clients with NaN/Inf entries).
    """
    if not isinstance(updates, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(updates).__name__}")
    if updates.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor (n, d), got ndim={updates.ndim} shape={tuple(updates.shape)}")
    if not updates.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {updates.dtype}")
    n, d = updates.shape
    if n < 1:
        raise ValueError(f"{name} must hold at least one client (n >= 1), got n={n}")
    if d < 1:
        raise ValueError(f"{name} must have at least one coordinate (d >= 1), got d={d}")
    finite = torch.isfinite(updates).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"{name} has non-finite (NaN/Inf) entries for client indices {bad}")
    return n, d


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value


def _check_plrs(plrs: Tensor, name: str = "plrs") -> tuple[int, int, int]:
    if not isinstance(plrs, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(plrs).__name__}")
    if plrs.ndim != 3:
        raise ValueError(f"{name} must be a 3-D tensor (n, m, o), got ndim={plrs.ndim} shape={tuple(plrs.shape)}")
    if not plrs.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {plrs.dtype}")
    n, m, o = plrs.shape
    if n < 1:
        raise ValueError(f"{name} must hold at least one model (n >= 1), got n={n}")
    if m < 2:
        raise ValueError(f"{name}: the unbiased MMD needs m >= 2 samples per model, got m={m}")
    if o < 1:
        raise ValueError(f"{name} must have PLR dimension o >= 1, got o={o}")
    finite = torch.isfinite(plrs).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"{name} has non-finite (NaN/Inf) entries for model indices {bad}")
    return n, m, o


def _col_chunks(n: int, d: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    for start in range(0, d, step):
        yield slice(start, min(d, start + step))


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves away from zero for x >= 0 (``round_half_up(2.5) == 3``).

    Python's ``round`` uses banker's rounding (``round(2.5) == 2``); Algorithm 1's ``round(n * 50%)``
    is read as ordinary school rounding (see docs/decisions/aggregators.md).
    """
    return int(math.floor(x + 0.5))


# ------------------------------------------------------------------------------------------ distances
def pairwise_sq_dists(x: Tensor) -> Tensor:
    """All ``(n, n)`` squared Euclidean distances between the rows of ``x`` (float64, >= 0, zero diagonal).

    Computed as ``||a||^2 + ||b||^2 - 2<a, b>`` in float64 on rows centred at their coordinate-wise
    (lower) median, accumulated over column chunks: centring removes the common offset that would
    otherwise cancel catastrophically for near-identical rows, and the median (not the mean) keeps a
    far outlier from shifting the centre away from the bulk.
    """
    n, d = x.shape
    gram = torch.zeros((n, n), dtype=torch.float64, device=x.device)
    for sl in _col_chunks(n, d):
        c = x[:, sl].to(torch.float64)
        c = c - c.median(dim=0).values
        gram += c @ c.T
    sq = torch.diagonal(gram).clone()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min_(0.0)
    d2 = 0.5 * (d2 + d2.T)  # exact symmetry (BLAS need not return a bit-symmetric Gram)
    d2.fill_diagonal_(0.0)
    return d2


def _coordinate_median(x: Tensor) -> Tensor:
    """Coordinate-wise median of an (n, c) block; for even n the mean of the two middle values."""
    n = x.shape[0]
    lower = x.median(dim=0).values  # the (n+1)//2-th smallest (torch returns the lower middle)
    if n % 2 == 1:
        return lower
    upper = -((-x).median(dim=0).values)  # the (n/2 + 1)-th smallest
    return (lower + upper) / 2


# --------------------------------------------------------------------------------------------- FedAvg
def fedavg(updates: Tensor, sizes: Sequence[float] | Tensor | None = None) -> AggResult:
    """FedAvg (McMahan et al. 2017): ``sum_i p_i delta_i`` with ``p_i = 1/n`` or ``size_i / sum(sizes)``."""
    n, _ = check_updates(updates)
    if sizes is None:
        w = torch.full((n,), 1.0 / n, dtype=torch.float64, device=updates.device)
    else:
        s = torch.as_tensor(sizes, dtype=torch.float64, device=updates.device).flatten()
        if s.numel() != n:
            raise ValueError(f"sizes must have one entry per client (n={n}), got {s.numel()}")
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError(f"sizes must be finite and >= 0, got {s.tolist()}")
        total = float(s.sum())
        if total <= 0:
            raise ValueError("sizes must have a positive sum")
        w = s / total
    update = w.to(updates.dtype) @ updates
    return AggResult(update, w, {})


# ----------------------------------------------------------------------------------------------- Krum
def _check_distance(distance: str) -> None:
    if distance not in ("squared", "euclidean"):
        raise ValueError(f"distance must be 'squared' or 'euclidean', got {distance!r}")


def _krum_scores_from_d2(d2: Tensor, n_neigh: int, distance: str) -> Tensor:
    """Sum over each row of its ``n_neigh`` smallest off-diagonal (squared or plain) distances."""
    n = d2.shape[0]
    dist = d2 if distance == "squared" else d2.sqrt()
    if n_neigh <= 0 or n < 2:
        return torch.zeros(n, dtype=torch.float64, device=d2.device)
    dist = dist.clone()
    dist.fill_diagonal_(float("inf"))  # exclude self explicitly (duplicates stay as neighbours)
    return torch.sort(dist, dim=1).values[:, :n_neigh].sum(dim=1)


def _krum_order(scores: Tensor, d2: Tensor, distance: str) -> Tensor:
    """Indices sorted by (score, sum of distances to all others, index).

    The secondary key breaks the exact ties that arise e.g. between a mutual-nearest pair when the
    score uses a single neighbour, so the selection does not depend on the client order."""
    total = (d2 if distance == "squared" else d2.sqrt()).sum(dim=1)
    o1 = torch.sort(total, stable=True).indices
    o2 = torch.sort(scores[o1], stable=True).indices
    return o1[o2]


def _check_krum_f(n: int, f: Any, rule: str = "Krum") -> int:
    f = _check_int(f, "f")
    if f < 0:
        raise ValueError(f"f must be >= 0, got f={f}")
    if not n > 2 * f + 2:
        raise ValueError(f"{rule} needs n > 2f + 2 (got n={n}, f={f}); f must be <= {max((n - 3) // 2, -1)}")
    return f


def krum_scores(updates: Tensor, f: int, distance: str = "squared") -> Tensor:
    """Krum scores (Blanchard et al. 2017): sum of the (squared) distances to the n - f - 2 nearest others."""
    n, _ = check_updates(updates)
    f = _check_krum_f(n, f)
    _check_distance(distance)
    return _krum_scores_from_d2(pairwise_sq_dists(updates), n - f - 2, distance)


def krum_order(d2: Tensor, f: int, distance: str = "squared") -> Tensor:
    """Every update in Krum's selection order (first: Krum's choice) from their pairwise squared distances
    ``d2`` (:func:`pairwise_sq_dists`): by score over the n - f - 2 nearest others, ties by the sum of the
    distances to all others, then by index -- the order :func:`krum` selects in. Requires n > 2f + 2."""
    n = d2.shape[0]
    f = _check_krum_f(n, f)
    _check_distance(distance)
    return _krum_order(_krum_scores_from_d2(d2, n - f - 2, distance), d2, distance)


def krum(updates: Tensor, f: int, m: int = 1, *, distance: str = "squared") -> AggResult:
    """Krum / multi-Krum (Blanchard et al., NeurIPS 2017).

    ``score_i = sum_{j in N_i} ||delta_i - delta_j||^2`` over the n - f - 2 nearest other updates
    (``distance="euclidean"``: plain distances, as the FLARE authors' code). m = 1 returns the update with
    the lowest score; m > 1 (multi-Krum) averages the m lowest-scoring updates. Requires n > 2f + 2.
    Ties in the score are broken by the smaller sum of distances to all others, then the lower index.
    """
    n, _ = check_updates(updates)
    f = _check_krum_f(n, f)
    m = _check_int(m, "m")
    if not 1 <= m <= n:
        raise ValueError(f"m must satisfy 1 <= m <= n (got m={m}, n={n})")
    _check_distance(distance)
    d2 = pairwise_sq_dists(updates)
    scores = _krum_scores_from_d2(d2, n - f - 2, distance)
    selected = _krum_order(scores, d2, distance)[:m]
    weights = torch.zeros(n, dtype=torch.float64, device=updates.device)
    weights[selected] = 1.0 / m
    update = updates[selected[0]].clone() if m == 1 else updates[selected].mean(dim=0)
    info = {"scores": scores, "selected": selected.tolist(), "f": f, "m": m, "distance": distance}
    return AggResult(update, weights, info)


# ------------------------------------------------------------------------------ coordinate-wise rules
def _sorted_band_mean(updates: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Per coordinate, mean of the order statistics lo..hi-1 (stable sort); plus per-client kept counts."""
    n, d = updates.shape
    out = torch.empty(d, dtype=updates.dtype, device=updates.device)
    counts = torch.zeros(n, dtype=torch.float64, device=updates.device)
    for sl in _col_chunks(n, d):
        vals, idx = torch.sort(updates[:, sl], dim=0, stable=True)
        out[sl] = vals[lo:hi].mean(dim=0)
        counts += torch.bincount(idx[lo:hi].flatten(), minlength=n).to(torch.float64)
    return out, counts


def median(updates: Tensor) -> AggResult:
    """Coordinate-wise median (Yin et al., ICML 2018).

    Odd n: the middle value. Even n: the mean of the two middle values (``torch.median`` would return the
    lower one). ``weights[i]`` = fraction of coordinates where client i supplied a middle value (ties
    broken by the lower client index via a stable sort).
    """
    n, d = check_updates(updates)
    k = (n - 1) // 2
    update, counts = _sorted_band_mean(updates, k, n - k)
    weights = counts / d
    return AggResult(update, weights, {"n_used": n - 2 * k, "share": weights / (n - 2 * k)})


def trimmed_mean(updates: Tensor, k: int) -> AggResult:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate drop the k largest and the
    k smallest values and average the remaining n - 2k. Requires 0 <= k and n > 2k.

    ``weights[i]`` = fraction of coordinates where client i's value was kept (ties at the cut broken by
    client index: among equal values the lower indices rank lower).
    """
    n, d = check_updates(updates)
    k = _check_int(k, "k")
    if k < 0:
        raise ValueError(f"k must be >= 0, got k={k}")
    if not n > 2 * k:
        raise ValueError(f"trimmed mean needs n > 2k (got n={n}, k={k}); k must be <= {(n - 1) // 2}")
    update, counts = _sorted_band_mean(updates, k, n - k)
    weights = counts / d
    return AggResult(update, weights, {"k": k, "n_used": n - 2 * k, "share": weights / (n - 2 * k)})


def bulyan(updates: Tensor, f: int, *, distance: str = "squared") -> AggResult:
    """Bulyan (El Mhamdi et al., ICML 2018). Requires n >= 4f + 3.

    Stage 1: theta = n - 2f updates are selected by recursive Krum: each iteration scores the *remaining*
    set R with Krum for the same f (neighbours ``|R| - f - 2``, at least 1 -- see the decisions doc), moves
    the lowest-scoring update to the selection and removes it from R (score ties -- a mutual-nearest pair
    when one neighbour is used -- broken by the smaller sum of distances to all of R, then the index).
    Stage 2: per coordinate, average the beta = theta - 2f selected values closest to the coordinate-wise
    median of the selection (median of an even count = mean of the two middle values; ties in closeness
    broken by selection order).
    """
    n, d = check_updates(updates)
    f = _check_int(f, "f")
    if f < 0:
        raise ValueError(f"f must be >= 0, got f={f}")
    if not n >= 4 * f + 3:
        raise ValueError(f"Bulyan needs n >= 4f + 3 (got n={n}, f={f}); f must be <= {(n - 3) // 4}")
    _check_distance(distance)
    theta = n - 2 * f
    beta = theta - 2 * f
    d2 = pairwise_sq_dists(updates)
    remaining = list(range(n))
    selected: list[int] = []
    round_scores: list[list[float]] = []
    for _ in range(theta):
        r = len(remaining)
        idx = torch.tensor(remaining, device=updates.device)
        sub = d2[idx][:, idx]
        n_neigh = min(max(r - f - 2, 1), r - 1)
        scores = _krum_scores_from_d2(sub, n_neigh, distance)
        pick = int(_krum_order(scores, sub, distance)[0])
        round_scores.append(scores.tolist())
        selected.append(remaining.pop(pick))
    sel = torch.tensor(selected, device=updates.device)
    chosen = updates[sel]  # (theta, d) in selection order
    out = torch.empty(d, dtype=updates.dtype, device=updates.device)
    counts = torch.zeros(n, dtype=torch.float64, device=updates.device)
    for sl in _col_chunks(theta, d):
        block = chosen[:, sl]
        med = _coordinate_median(block)
        closeness = (block - med).abs()
        order = torch.sort(closeness, dim=0, stable=True).indices[:beta]
        out[sl] = torch.gather(block, 0, order).mean(dim=0)
        counts += torch.bincount(sel[order.flatten()], minlength=n).to(torch.float64)
    weights = counts / d
    info = {"selected": selected, "theta": theta, "beta": beta, "krum_scores": round_scores,
            "share": weights / beta, "distance": distance}
    return AggResult(out, weights, info)


# -------------------------------------------------------------------------------------------- FLTrust
def fltrust(updates: Tensor, server_update: Tensor) -> AggResult:
    """FLTrust (Cao et al., NDSS 2021).

    ``TS_i = ReLU(cos(g_i, g_0))``; every g_i is rescaled to the norm of the server update g_0,
    ``g_i * ||g_0|| / ||g_i||``; the aggregate is ``sum_i TS_i * rescaled_i / sum_j TS_j``.
    A zero update g_i has an undefined cosine and gets TS_i = 0. If every TS_i is 0 (including g_0 = 0)
    the aggregate is the zero update (the server keeps the global model).
    """
    n, d = check_updates(updates)
    if not isinstance(server_update, Tensor) or not server_update.is_floating_point():
        raise ValueError("server_update must be a floating torch.Tensor")
    g0 = server_update.reshape(-1)
    if g0.numel() != d:
        raise ValueError(f"server_update must have d={d} entries, got {g0.numel()}")
    if not bool(torch.isfinite(g0).all()):
        raise ValueError("server_update has non-finite (NaN/Inf) entries")
    dots = torch.zeros(n, dtype=torch.float64, device=updates.device)
    sq = torch.zeros(n, dtype=torch.float64, device=updates.device)
    sq0 = torch.zeros((), dtype=torch.float64, device=updates.device)
    for sl in _col_chunks(n + 1, d):
        c = updates[:, sl].to(torch.float64)
        c0 = g0[sl].to(device=updates.device, dtype=torch.float64)
        dots += c @ c0
        sq += (c * c).sum(dim=1)
        sq0 += (c0 * c0).sum()
    norms, norm0 = sq.sqrt(), sq0.sqrt()
    denom = norms * norm0
    cos = torch.where(denom > 0, dots / torch.where(denom > 0, denom, torch.ones_like(denom)),
                      torch.zeros_like(dots))
    ts = cos.clamp_min(0.0)
    total = ts.sum()
    scale = torch.where(norms > 0, norm0 / torch.where(norms > 0, norms, torch.ones_like(norms)),
                        torch.zeros_like(norms))
    if float(total) <= 0.0:
        weights = torch.zeros(n, dtype=torch.float64, device=updates.device)
        update = torch.zeros(d, dtype=updates.dtype, device=updates.device)
    else:
        weights = ts / total
        update = (weights * scale).to(updates.dtype) @ updates
    info = {"trust_raw": ts, "cos": cos, "scale": scale, "server_norm": float(norm0), "all_zero": float(total) <= 0}
    return AggResult(update, weights, info)


# ------------------------------------------------------------------------------------------- MMD / FLARE
def _kernel_from_sq(d2: Tensor, sigma: Tensor | float) -> Tensor:
    return torch.exp(-d2 / (2.0 * torch.as_tensor(sigma, dtype=d2.dtype, device=d2.device) ** 2))


def mmd2_unbiased(x: Tensor, y: Tensor, sigma: float | Tensor) -> Tensor:
    """Unbiased MMD^2 (Gretton et al., JMLR 2012, Eq. 3; FLARE Eq. 4) with the Gaussian kernel
    ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))``.

    ``x`` (..., m, o), ``y`` (..., m', o) with broadcastable leading (batch) dims, m, m' >= 2:
    ``sum_{a != a'} k(x_a, x_a') / (m(m-1)) + sum_{b != b'} k(y_b, y_b') / (m'(m'-1))
    - 2 sum_{a, b} k(x_a, y_b) / (m m')``. Computed in float64; may be negative.
    (FLARE's Eq. (4) prints the common factor 1/(m(m-1)) in front of the cross term as well; that
    version is biased -- we use the standard unbiased estimator, as the authors' code does.)
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError("x and y must be torch.Tensors")
    if x.ndim < 2 or y.ndim < 2:
        raise ValueError(f"x and y must have shape (..., m, o), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must have the same feature dimension o, got {x.shape[-1]} and {y.shape[-1]}")
    m, mp = x.shape[-2], y.shape[-2]
    if m < 2 or mp < 2:
        raise ValueError(f"the unbiased MMD needs m >= 2 samples in each set, got m={m} and m'={mp}")
    sig = torch.as_tensor(sigma, dtype=torch.float64)
    if not bool(torch.isfinite(sig).all()) or bool((sig <= 0).any()):
        raise ValueError(f"sigma must be finite and > 0, got {sigma}")
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    sig = sig.to(x64.device)
    if sig.ndim > 0:
        sig = sig[..., None, None]

    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = ((a[..., :, None, :] - b[..., None, :, :]) ** 2).sum(-1)
        return torch.exp(-d2 / (2.0 * sig**2))

    kxx, kyy, kxy = k(x64, x64), k(y64, y64), k(x64, y64)
    sxx = kxx.sum((-1, -2)) - torch.diagonal(kxx, dim1=-2, dim2=-1).sum(-1)
    syy = kyy.sum((-1, -2)) - torch.diagonal(kyy, dim1=-2, dim2=-1).sum(-1)
    return sxx / (m * (m - 1)) + syy / (mp * (mp - 1)) - 2.0 * kxy.sum((-1, -2)) / (m * mp)


def _median_1d(v: Tensor) -> Tensor:
    c = v.numel()
    lo = torch.kthvalue(v, (c + 1) // 2).values
    if c % 2 == 1:
        return lo
    return (lo + torch.kthvalue(v, c // 2 + 1).values) / 2


def median_bandwidth(plrs: Tensor) -> float:
    """Median heuristic (Gretton et al. 2012): sigma = median of all pairwise Euclidean distances between
    the pooled n*m PLRs (distinct pairs). If that median is 0 (more than half of the pairs coincide) the
    median of the positive distances is used, and 1.0 if all points coincide."""
    n, m, o = _check_plrs(plrs)
    z = plrs.reshape(n * m, o)
    d = pairwise_sq_dists(z).sqrt()
    iu = torch.triu_indices(n * m, n * m, offset=1, device=d.device)
    vals = d[iu[0], iu[1]]
    med = float(_median_1d(vals))
    if med > 0:
        return med
    pos = vals[vals > 0]
    return float(_median_1d(pos)) if pos.numel() else 1.0


def _resolve_sigma(plrs: Tensor, bandwidth: str | float) -> float:
    o = plrs.shape[-1]
    if isinstance(bandwidth, str):
        if bandwidth == "median":
            return median_bandwidth(plrs)
        if bandwidth == "code":  # sklearn rbf default gamma = 1/o: exp(-||a-b||^2 / o) = exp(-d^2 / (2 sigma^2))
            return math.sqrt(o / 2.0)
        raise ValueError(f"bandwidth must be 'median', 'code' or a float sigma > 0, got {bandwidth!r}")
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
        raise ValueError(f"bandwidth must be 'median', 'code' or a float sigma > 0, got {bandwidth!r}")
    if not (math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth sigma must be finite and > 0, got {bandwidth}")
    return float(bandwidth)


def pairwise_mmd2(plrs: Tensor, bandwidth: str | float = "median", clip_negative: bool = False,
                  *, return_sigma: bool = False) -> Tensor | tuple[Tensor, float]:
    """All n x n unbiased MMD^2 between the PLR sets of n models (``plrs`` (n, m, o)), in batched ops.

    One Gaussian Gram matrix over the pooled n*m PLRs is computed once and reduced block-wise:
    ``MMD2_ij = W_i/(m(m-1)) + W_j/(m(m-1)) - 2 S_ij / m^2`` with ``S_ij`` the (i, j) block sum and
    ``W_i = S_ii - m`` (self-pairs removed). One bandwidth for the whole matrix so entries are comparable:
    ``"median"`` (median heuristic over the pooled PLRs, default), ``"code"`` (authors' code: sklearn's
    rbf default gamma = 1/o, i.e. ``k = exp(-||a-b||^2 / o)``) or a float sigma.
    The diagonal holds the estimator applied to (R_i, R_i), which is <= 0 (not 0) for the Gaussian kernel;
    the paper variant of FLARE excludes it. ``clip_negative`` clips negative estimates to 0 (authors' code).
    """
    n, m, o = _check_plrs(plrs)
    sigma = _resolve_sigma(plrs, bandwidth)
    z = plrs.reshape(n * m, o)
    kmat = _kernel_from_sq(pairwise_sq_dists(z), sigma)
    blocks = kmat.reshape(n, m, n, m).sum(dim=(1, 3))  # (n, n)
    trace = torch.diagonal(kmat).reshape(n, m).sum(dim=1)  # = m for the Gaussian kernel
    within = (torch.diagonal(blocks) - trace) / (m * (m - 1))
    mmd = within[:, None] + within[None, :] - 2.0 * blocks / (m * m)
    mmd = 0.5 * (mmd + mmd.T)  # exact symmetry
    if clip_negative:
        mmd = mmd.clamp_min(0.0)
    return (mmd, sigma) if return_sigma else mmd


class FlareDetails(NamedTuple):
    """Everything FLARE computes in one round (all loggable)."""

    trust: Tensor  # (n,) float64, sums to 1
    counts: Tensor  # (n,) float64, ct_i
    mmd: Tensor  # (n, n) float64 (clipped at 0 for variant "code")
    neighbours: Tensor  # (n, k) int64, neighbour indices chosen by each model
    k: int  # number of neighbours per model
    sigma: float  # kernel bandwidth used


def _check_variant(variant: str) -> None:
    if variant not in ("paper", "code"):
        raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")


def flare_counts(mmd: Tensor, variant: str = "paper", neighbour_frac: float = 0.5) -> tuple[Tensor, Tensor, int]:
    """Nearest-neighbour counts of FLARE (Section 5.2, Alg. 1 lines 8-14) from an (n, n) MMD matrix.

    ``paper``: each model picks its ``k = round_half_up(n * neighbour_frac)`` nearest *other* models
    (self excluded explicitly; k clipped to [1, n - 1]); ``ct_i`` = how often i is picked.
    ``code``: authors' code: ``k = int(neighbour_frac * n)``, neighbours = positions 1..k-1 of the stable
    argsort of each row (self assumed at position 0, not enforced -- after clipping ties with 0 can put
    another model first, and then the model may count itself), so k - 1 neighbours.
    Ties broken by the lower index (stable sort). Returns ``(counts float64, neighbours (n, k'), k')``.
    """
    _check_variant(variant)
    if not (isinstance(neighbour_frac, (int, float)) and 0 < neighbour_frac <= 1):
        raise ValueError(f"neighbour_frac must be in (0, 1], got {neighbour_frac!r}")
    if mmd.ndim != 2 or mmd.shape[0] != mmd.shape[1]:
        raise ValueError(f"mmd must be a square (n, n) matrix, got shape {tuple(mmd.shape)}")
    n = mmd.shape[0]
    dev = mmd.device
    if variant == "paper":
        if n < 2:
            return torch.zeros(n, dtype=torch.float64, device=dev), torch.zeros((n, 0), dtype=torch.long, device=dev), 0
        k = min(max(round_half_up(n * neighbour_frac), 1), n - 1)
        row = mmd.to(torch.float64).clone()
        row.fill_diagonal_(float("inf"))
        neigh = torch.sort(row, dim=1, stable=True).indices[:, :k]
    else:
        kk = int(neighbour_frac * n)
        k = max(kk - 1, 0)
        neigh = torch.sort(mmd.to(torch.float64), dim=1, stable=True).indices[:, 1:1 + k]
    counts = torch.bincount(neigh.flatten(), minlength=n).to(torch.float64)
    return counts, neigh, k


def flare_details(plrs: Tensor, tau: float = 1.0, variant: str = "paper", neighbour_frac: float = 0.5,
                  bandwidth: str | float | None = None) -> FlareDetails:
    """FLARE trust scores with everything computed on the way (Section 5.2, Alg. 1, Eq. 5).

    ``paper``: MMD matrix (unclipped), counts as in :func:`flare_counts`, ``S = softmax(ct / tau)``.
    ``code``: negative MMD^2 clipped to 0, k - 1 neighbours with ``k = int(0.5 n)``,
    ``S_i = exp(ct_i / (tau * mean(ct))) / sum_j exp(ct_j / (tau * mean(ct)))`` (uniform if all counts are 0).
    ``bandwidth=None`` means ``"median"`` for the paper variant and ``"code"`` (gamma = 1/o) for the code
    variant.
    """
    _check_variant(variant)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau (softmax temperature) must be a finite number > 0, got {tau!r}")
    if bandwidth is None:
        bandwidth = "median" if variant == "paper" else "code"
    mmd, sigma = pairwise_mmd2(plrs, bandwidth, clip_negative=(variant == "code"), return_sigma=True)
    counts, neigh, k = flare_counts(mmd, variant, neighbour_frac)
    if variant == "paper":
        logits = counts / tau
    else:
        mean_ct = float(counts.mean())
        logits = counts / (tau * mean_ct) if mean_ct > 0 else torch.zeros_like(counts)
    trust = torch.softmax(logits, dim=0)
    return FlareDetails(trust, counts, mmd, neigh, k, sigma)


def flare_trust(plrs: Tensor, tau: float = 1.0, variant: str = "paper", neighbour_frac: float = 0.5,
                bandwidth: str | float | None = None) -> Tensor:
    """FLARE trust scores S (n,) summing to 1 (Eq. 5); see :func:`flare_details` for counts and MMD."""
    return flare_details(plrs, tau, variant, neighbour_frac, bandwidth).trust


def flare(updates: Tensor, plrs: Tensor, tau: float = 1.0, **kw: Any) -> AggResult:
    """FLARE aggregation (Eq. 6): ``sum_i S_i delta_i`` with S from :func:`flare_details` (kw: variant,
    neighbour_frac, bandwidth). ``info`` holds counts, MMD matrix, neighbours, k and sigma."""
    n, _ = check_updates(updates)
    pn = _check_plrs(plrs)[0]
    if pn != n:
        raise ValueError(f"plrs must hold one PLR set per client: got {pn} sets for n={n} updates")
    det = flare_details(plrs, tau, **kw)
    update = det.trust.to(updates.dtype) @ updates
    info = {"counts": det.counts, "mmd": det.mmd, "neighbours": det.neighbours, "k": det.k, "sigma": det.sigma}
    return AggResult(update, det.trust, info)
