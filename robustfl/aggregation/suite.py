"""The standard defense suite: more aggregation rules as pure functions on an ``(n, d)`` tensor of flattened
client updates, each returning an :class:`~robustfl.aggregation.aggregators.AggResult`.

Same contract as :mod:`robustfl.aggregation.aggregators`: the input is validated by
:func:`~robustfl.aggregation.aggregators.check_updates` (wrong type / shape / dtype or a non-finite entry
is a ``ValueError`` naming the problem -- the server excludes non-finite clients before calling a rule);
norms, distances and Gram matrices are accumulated in float64 over column chunks; the aggregate keeps the
input's dtype and device. A rule never touches the global RNG: rules that draw random numbers (DnC and
SignGuard: coordinate subsets; FLAME and weak DP: Gaussian noise) take a ``torch.Generator`` and fall back
to a fixed-seed one (:func:`fallback_generator`) when given none. Rules that need the previous rounds
(centered clipping: the previous aggregate; FoolsGold: each client's summed past updates) take that history
as an argument; keeping it between rounds is the caller's job (:mod:`robustfl.aggregation.defenses`).

``weights[i]`` is client i's **coefficient in the aggregate**: ``update = weights @ updates`` plus, where a
rule has them, a term that is nobody's update (centered clipping's centre, ``info["centre_weight"]``;
the Gaussian noise of FLAME and weak DP, ``info["noise_std"]``). Clipping rules therefore give a large
update a smaller weight than a small one; ``info`` holds the selections and clipping factors separately.

Only the small ``(n, n)`` cosine-distance matrix (FLAME) and the ``(n, 3)`` sign features (SignGuard) go to
NumPy, for scikit-learn's HDBSCAN and MeanShift. The choices the papers leave open are listed in
``docs/decisions/defenses-suite.md``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustfl.aggregation.aggregators import AggResult, _check_int, _col_chunks, _median_1d, check_updates

__all__ = [
    "fallback_generator",
    "row_norms",
    "gram",
    "cosine_similarity_matrix",
    "geomed",
    "centered_clipping",
    "dnc",
    "signguard",
    "sign_features",
    "flame",
    "flame_lambda",
    "foolsgold",
    "foolsgold_alpha",
    "norm_clipping",
]

F64 = torch.float64

#: the seed of the generator a randomised rule uses when it is given none (the same draws every call)
FALLBACK_SEED = 0


def fallback_generator() -> torch.Generator:
    """A fresh CPU generator seeded with :data:`FALLBACK_SEED`: what a randomised rule uses when the caller
    passes no generator (deterministic, never the global RNG, but the same draws on every call)."""
    return torch.Generator().manual_seed(FALLBACK_SEED)


# ------------------------------------------------------------------------------------- argument checks
def _check_real(value: Any, name: str, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number in the given range; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo:g}, got {value!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi:g}, got {value!r}")
    return v


def _check_count(value: Any, name: str, lo: int) -> int:
    v = _check_int(value, name)
    if v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return v


def _check_generator(generator: Any) -> torch.Generator:
    if generator is None:
        return fallback_generator()
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _check_vector(v: Any, d: int, name: str) -> Tensor:
    if not isinstance(v, Tensor) or not v.is_floating_point():
        raise ValueError(f"{name} must be a floating torch.Tensor, got {type(v).__name__}")
    if v.numel() != d:
        raise ValueError(f"{name} must have d={d} entries, got shape {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} has non-finite (NaN/Inf) entries")
    return v.reshape(-1)


# ---------------------------------------------------------------------------------- chunked float64 maths
def row_norms(x: Tensor) -> Tensor:
    """Euclidean norm of every row of ``x`` (float64 ``(n,)``), accumulated over column chunks in float64
    (a float32 row of norm 1e30 has a squared norm 1e60: beyond float32, fine in float64)."""
    n, d = x.shape
    sq = torch.zeros(n, dtype=F64, device=x.device)
    for sl in _col_chunks(n, d):
        c = x[:, sl].to(F64)
        sq += (c * c).sum(dim=1)
    return sq.sqrt()


def _dists_to(x: Tensor, v: Tensor) -> Tensor:
    """``||x_i - v||`` for every row (float64 ``(n,)``), differences taken directly (no cancellation)."""
    n, d = x.shape
    sq = torch.zeros(n, dtype=F64, device=x.device)
    for sl in _col_chunks(n + 1, d):
        c = x[:, sl].to(F64) - v[sl].to(F64)
        sq += (c * c).sum(dim=1)
    return sq.sqrt()


def gram(x: Tensor) -> Tensor:
    """The ``(n, n)`` Gram matrix ``x x^T`` in float64, accumulated over column chunks, exactly symmetric."""
    n, d = x.shape
    g = torch.zeros((n, n), dtype=F64, device=x.device)
    for sl in _col_chunks(n, d):
        c = x[:, sl].to(F64)
        g += c @ c.T
    return 0.5 * (g + g.T)


def cosine_similarity_matrix(x: Tensor) -> Tensor:
    """All ``(n, n)`` cosine similarities between the rows of ``x`` (float64, in [-1, 1]). A zero row has
    no direction: its similarity to every row, itself included, is 0. The diagonal of a non-zero row is 1."""
    g = gram(x)
    norms = torch.diagonal(g).clamp_min(0.0).sqrt()
    nz = norms > 0
    denom = norms[:, None] * norms[None, :]
    both = nz[:, None] & nz[None, :]
    cos = torch.where(both, g / torch.where(both, denom, torch.ones_like(denom)), torch.zeros_like(g))
    cos = cos.clamp(-1.0, 1.0)
    idx = torch.arange(len(cos), device=cos.device)
    cos[idx, idx] = nz.to(F64)
    return cos


def _median(v: Tensor) -> Tensor:
    """Median of a 1-D float64 tensor; for an even count the mean of the two middle values."""
    return _median_1d(v)


def _gaussian(d: int, std: float, generator: torch.Generator, like: Tensor) -> Tensor:
    """``std * N(0, I_d)`` drawn from ``generator`` (on the generator's device), returned on ``like``'s
    device and dtype (float32 draws for half-precision updates)."""
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    z = torch.randn(d, generator=generator, device=generator.device, dtype=dtype)
    return (std * z).to(device=like.device, dtype=like.dtype)


def _random_coordinates(d: int, k: int, generator: torch.Generator, device: torch.device) -> Tensor | None:
    """``k`` distinct coordinates of ``d`` drawn uniformly without replacement (sorted), or ``None``
    (= all of them) when ``k >= d``. Drawn on the generator's device, then moved."""
    if k >= d:
        return None
    idx = torch.randperm(d, generator=generator, device=generator.device)[:k]
    return torch.sort(idx).values.to(device)


def _clip_factors(norms: Tensor, bound: Tensor | float) -> Tensor:
    """``min(1, bound / ||x_i||)`` per client; 1 for a zero update (nothing to clip)."""
    b = torch.as_tensor(bound, dtype=F64, device=norms.device)
    pos = norms > 0
    return torch.where(pos, (b / torch.where(pos, norms, torch.ones_like(norms))).clamp(max=1.0),
                       torch.ones_like(norms))


# ----------------------------------------------------------------------------------- RFA (geometric median)
def geomed(updates: Tensor, nu: float = 1e-6, iters: int = 3, tol: float = 1e-6, init: str = "mean") -> AggResult:
    """RFA's geometric median (Pillutla, Kakade, Harchaoui, IEEE TSP 2022) by the smoothed Weiszfeld
    algorithm (their Algorithm 3): starting from ``v^0`` (``init``: the mean, as the authors' code, or
    ``zero``, as ByzFL), each iteration sets

        ``beta_i = alpha_i / max(nu, ||v^r - w_i||)``,  ``v^{r+1} = sum_i beta_i w_i / sum_j beta_j``

    with ``alpha_i = 1/n`` (equal shards), for at most ``iters`` iterations (the paper's budget R = 3);
    with ``tol > 0`` it stops early once the objective ``g(v) = sum_i alpha_i ||v - w_i||`` changes by less
    than ``tol * g`` (the authors' code's relative ``ftol``, 1e-6); ``tol = 0``: exactly ``iters`` steps.
    ``nu`` (1e-6) is the smoothing parameter. ``weights`` = the last ``beta / sum(beta)``: the aggregate
    is exactly ``weights @ updates``. ``info``: iterations run, objective values, whether it stopped early.
    """
    n, d = check_updates(updates)
    nu = _check_real(nu, "nu", lo=0.0, lo_open=True)
    iters = _check_count(iters, "iters", 1)
    tol = _check_real(tol, "tol", lo=0.0)
    if init not in ("mean", "zero"):
        raise ValueError(f"init must be 'mean' or 'zero', got {init!r}")
    dev, dt = updates.device, updates.dtype
    alpha = torch.full((n,), 1.0 / n, dtype=F64, device=dev)
    if init == "mean":
        w = alpha.clone()
        v = w.to(dt) @ updates
    else:
        w = torch.zeros(n, dtype=F64, device=dev)
        v = torch.zeros(d, dtype=dt, device=dev)
    dist = _dists_to(updates, v)
    objective = [float((alpha * dist).sum())]
    stopped = False
    steps = 0
    for _ in range(iters):
        beta = alpha / dist.clamp_min(nu)
        w = beta / beta.sum()
        v = w.to(dt) @ updates
        steps += 1
        dist = _dists_to(updates, v)
        objective.append(float((alpha * dist).sum()))
        if tol > 0 and abs(objective[-2] - objective[-1]) < tol * objective[-1]:
            stopped = True
            break
    info = {"iterations": steps, "objective": objective, "stopped_early": stopped, "nu": nu, "init": init}
    return AggResult(v, w, info)


# -------------------------------------------------------------------------------------- centered clipping
def centered_clipping(updates: Tensor, tau: float = 100.0, iters: int = 1, centre: Tensor | None = None) -> AggResult:
    """Centered clipping (Karimireddy, He, Jaggi, ICML 2021, Eq. (CC) / Algorithm 2):

        ``v_{l+1} = v_l + (1/n) sum_i (x_i - v_l) min(1, tau / ||x_i - v_l||)``,  l = 0 .. L-1,

    returning ``v_L``. ``v_0 = centre``: the paper centres at the previous round's aggregate (the caller
    keeps it, :mod:`robustfl.aggregation.defenses`); ``None`` is the zero vector, the paper's and its
    code's value before any history. Defaults ``tau = 100``, ``L = iters = 1`` (the authors' CIFAR-10
    experiments). A client equal to the centre is not clipped (its difference is 0 either way).

    The aggregate is affine in the inputs, ``v_L = a_0 v_0 + sum_i a_i x_i``; ``weights`` = ``a`` and
    ``info["centre_weight"]`` = ``a_0`` (tracked through the L steps: ``a <- (1 - S/n) a + s/n``,
    ``a_0 <- (1 - S/n) a_0`` with ``s_i`` the clipping factors of the step and ``S = sum s``).
    """
    n, d = check_updates(updates)
    tau = _check_real(tau, "tau", lo=0.0, lo_open=True)
    iters = _check_count(iters, "iters", 1)
    dev, dt = updates.device, updates.dtype
    if centre is None:
        v = torch.zeros(d, dtype=dt, device=dev)
    else:
        v = _check_vector(centre, d, "centre").to(device=dev, dtype=dt)
    a = torch.zeros(n, dtype=F64, device=dev)
    a0 = torch.ones((), dtype=F64, device=dev)
    s = torch.ones(n, dtype=F64, device=dev)
    for _ in range(iters):
        s = _clip_factors(_dists_to(updates, v), tau)
        keep = 1.0 - s.sum() / n
        v = keep.to(dt) * v + (s / n).to(dt) @ updates
        a = keep * a + s / n
        a0 = keep * a0
    info = {"centre_weight": float(a0), "scale": s, "tau": tau, "iters": iters, "centred_at_zero": centre is None}
    return AggResult(v, a, info)


# -------------------------------------------------------------------------------------------------- DnC
def dnc(updates: Tensor, f: int, b: int = 10000, niters: int = 5, c: float = 1.0,
        generator: torch.Generator | None = None) -> AggResult:
    """Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021, Algorithm 2).

    Each of ``niters`` iterations draws ``b`` coordinates uniformly without replacement (from
    ``generator``), centres the sub-sampled updates at their mean, takes the top right singular vector v of
    the centred ``(n, b)`` matrix and scores ``s_i = <x_i - mu, v>^2``; the ``n - floor(c f)`` lowest scores
    form that iteration's good set. The aggregate is the mean of the updates in every iteration's good set
    (the intersection). ``f`` = the number of attackers the server assumes (the paper's m), ``c`` the
    filtering fraction. Score ties are broken by the lower index. An empty intersection gives the zero
    update (the global model is kept). ``b >= d`` uses every coordinate.
    """
    n, d = check_updates(updates)
    f = _check_count(f, "f", 0)
    b = _check_count(b, "b", 1)
    niters = _check_count(niters, "niters", 1)
    c = _check_real(c, "c", lo=0.0)
    removed = int(math.floor(c * f + 1e-9))
    if removed >= n:
        raise ValueError(f"DnC removes floor(c*f) = {removed} updates per iteration but has only n={n} (c={c:g}, "
                         f"f={f}); needs floor(c*f) < n")
    g = _check_generator(generator)
    dev = updates.device
    keep = torch.ones(n, dtype=torch.bool, device=dev)
    scores_all = []
    for _ in range(niters):
        idx = _random_coordinates(d, b, g, dev)
        sub = (updates if idx is None else updates[:, idx]).to(F64)
        centred = sub - sub.mean(dim=0)
        v = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        scores = (centred @ v) ** 2
        good = torch.sort(scores, stable=True).indices[: n - removed]
        mask = torch.zeros(n, dtype=torch.bool, device=dev)
        mask[good] = True
        keep &= mask
        scores_all.append(scores)
    kept = keep.nonzero().flatten()
    weights = torch.zeros(n, dtype=F64, device=dev)
    if kept.numel():
        weights[kept] = 1.0 / kept.numel()
    update = weights.to(updates.dtype) @ updates
    info = {"kept": kept.tolist(), "removed_per_iter": removed, "scores": torch.stack(scores_all),
            "b": min(b, d), "niters": niters, "c": c, "f": f}
    return AggResult(update, weights, info)


# --------------------------------------------------------------------------------------------- SignGuard
def sign_features(updates: Tensor, idx: Tensor | None = None) -> Tensor:
    """SignGuard's sign statistics: per client, the fractions of positive, zero and negative entries among
    the coordinates ``idx`` (all if ``None``): float64 ``(n, 3)``, rows sum to 1."""
    n, d = updates.shape
    counts = torch.zeros((n, 3), dtype=F64, device=updates.device)
    cols = torch.arange(d, device=updates.device) if idx is None else idx
    step = max(1, (1 << 26) // max(n, 1))
    for start in range(0, len(cols), step):
        c = updates[:, cols[start:start + step]]
        counts[:, 0] += (c > 0).sum(dim=1).to(F64)
        counts[:, 1] += (c == 0).sum(dim=1).to(F64)
        counts[:, 2] += (c < 0).sum(dim=1).to(F64)
    return counts / len(cols)


def _meanshift_majority(features: np.ndarray, quantile: float) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn MeanShift on the ``(n, k)`` features: bandwidth by ``estimate_bandwidth`` (the given
    quantile, all samples, no randomness), bin seeding, points outside every kernel unlabelled (-1).
    Returns ``(labels, majority mask)``: the largest cluster (ties: the lower label). Fewer than 3 points:
    one cluster (no majority can be told apart). A zero bandwidth (at least a ``quantile`` share of the
    points coincide) makes the groups of identical feature rows the clusters (MeanShift cannot run)."""
    from sklearn.cluster import MeanShift, estimate_bandwidth

    n = len(features)
    if n < 3:
        labels = np.zeros(n, dtype=np.int64)
        return labels, labels == 0
    bw = float(estimate_bandwidth(features, quantile=max(quantile, 1.0 / n)))  # at least one neighbour
    labels = None
    if bw > 1e-12:
        with warnings.catch_warnings():  # a tiny bandwidth: sklearn seeds from the points themselves instead
            warnings.filterwarnings("ignore", message="Binning data failed", category=UserWarning)
            try:
                labels = MeanShift(bandwidth=bw, bin_seeding=True, cluster_all=False).fit(features).labels_
            except ValueError:  # "No point was within bandwidth ... of any seed" (round-off at tiny bandwidths)
                labels = None
    if labels is None:  # a `quantile` share of the points coincide: the clusters are the groups of identical points
        _, labels = np.unique(features, axis=0, return_inverse=True)
        labels = labels.reshape(-1)
    found = labels[labels >= 0]
    if found.size == 0:
        return labels, np.zeros(n, dtype=bool)
    counts = np.bincount(found)
    return labels, labels == int(np.argmax(counts))


def signguard(updates: Tensor, lower: float = 0.1, upper: float = 3.0, frac: float = 0.1,
              generator: torch.Generator | None = None, quantile: float = 0.5) -> AggResult:
    """SignGuard (Xu, Huang, Lu, Zhang, ICDCS 2022, Algorithm 1).

    1. Norm filter: with ``M`` = the median of the n update norms, ``S1 = {i : lower <= ||g_i|| / M <= upper}``
       (paper: L = 0.1, R = 3.0).
    2. Sign clustering: draw ``max(1, int(frac d))`` coordinates uniformly without replacement (``frac`` =
       0.1), compute each client's fractions of positive, zero and negative entries there
       (:func:`sign_features`), cluster those ``(n, 3)`` points with scikit-learn's MeanShift (the paper's
       choice; bandwidth: ``estimate_bandwidth`` at ``quantile`` 0.5, bin seeding, unassigned points left
       out, as the authors' code) and keep the largest cluster as ``S2``.
    3. ``S = S1 ∩ S2``; the aggregate is ``(1/|S|) sum_{i in S} g_i min(1, M / ||g_i||)`` (clipped at the
       median norm). An empty S gives the zero update; ``M = 0`` keeps only zero updates (S1 = norm 0).

    ``weights[i] = min(1, M/||g_i||) / |S|`` for i in S, 0 otherwise.
    """
    n, d = check_updates(updates)
    lower = _check_real(lower, "lower", lo=0.0)
    upper = _check_real(upper, "upper", lo=0.0)
    if upper < lower:
        raise ValueError(f"upper must be >= lower, got lower={lower:g}, upper={upper:g}")
    frac = _check_real(frac, "frac", lo=0.0, hi=1.0, lo_open=True)
    quantile = _check_real(quantile, "quantile", lo=0.0, hi=1.0, lo_open=True)
    g = _check_generator(generator)
    dev = updates.device
    norms = row_norms(updates)
    med = _median(norms)
    if float(med) > 0:
        ratio = norms / med
        s1 = (ratio >= lower) & (ratio <= upper)
    else:
        s1 = norms == 0
    idx = _random_coordinates(d, max(1, int(frac * d)), g, dev)
    feats = sign_features(updates, idx)
    labels, major = _meanshift_majority(feats.cpu().numpy(), quantile)
    s2 = torch.as_tensor(major, device=dev)
    sel = s1 & s2
    scale = _clip_factors(norms, med)
    weights = torch.zeros(n, dtype=F64, device=dev)
    k = int(sel.sum())
    if k:
        weights = torch.where(sel, scale / k, weights)
    update = weights.to(updates.dtype) @ updates
    info = {"selected": sel.nonzero().flatten().tolist(), "norm_ok": s1, "cluster_ok": s2,
            "labels": labels.tolist(), "median_norm": float(med), "scale": scale, "features": feats,
            "n_coordinates": d if idx is None else int(idx.numel())}
    return AggResult(update, weights, info)


# ------------------------------------------------------------------------------------------------- FLAME
def flame_lambda(epsilon: float, delta: float) -> float:
    """FLAME's noise factor from an (epsilon, delta) budget by the Gaussian mechanism (Dwork & Roth 2014,
    Thm A.1, as FLAME Sec. 4.4 uses it): ``lambda = sqrt(2 ln(1.25 / delta)) / epsilon``."""
    epsilon = _check_real(epsilon, "epsilon", lo=0.0, lo_open=True)
    delta = _check_real(delta, "delta", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    return math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def flame(updates: Tensor, lam: float = 0.001, generator: torch.Generator | None = None) -> AggResult:
    """FLAME (Nguyen et al., USENIX Security 2022, Algorithm 1).

    1. Dynamic clustering (lines 6-7): HDBSCAN (scikit-learn) on the ``(n, n)`` cosine distances
       ``1 - cos(Δ_i, Δ_j)`` (``metric="precomputed"``), ``min_cluster_size = floor(n/2) + 1``,
       ``min_samples = 1``, ``allow_single_cluster = True``; the clients of the (necessarily unique)
       majority cluster are admitted, the rest are outliers. Distances between the *updates* (the paper
       writes the local models W_i; with a common global model the two differ by that shared offset --
       see the decisions doc).
    2. Adaptive clipping (lines 8-11): ``S_t`` = the median of all n update norms ``e_i = ||W_i - G||``;
       each admitted update is scaled by ``min(1, S_t / e_i)``; the aggregate is their mean (line 12).
    3. Adaptive noise (lines 13-14): ``N(0, sigma^2 I)`` with ``sigma = lam * S_t`` is added (``lam`` =
       0.001, the paper's image-classification value; :func:`flame_lambda` from epsilon/delta), drawn from
       ``generator``; ``lam = 0`` adds none.

    No admitted client (every point labelled noise) gives the zero update plus the noise.
    ``weights[i] = min(1, S_t/e_i) / L`` for the L admitted clients; ``info["noise_std"] = sigma``.
    """
    n, d = check_updates(updates)
    lam = _check_real(lam, "lam", lo=0.0)
    g = _check_generator(generator)
    dev = updates.device
    norms = row_norms(updates)
    med = _median(norms)
    if n == 1:
        labels = np.zeros(1, dtype=np.int64)
    else:
        from sklearn.cluster import HDBSCAN

        dist = (1.0 - cosine_similarity_matrix(updates)).clamp(0.0, 2.0)
        dist.fill_diagonal_(0.0)
        labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                         allow_single_cluster=True, copy=True).fit(dist.cpu().numpy()).labels_
    found = labels[labels >= 0]
    admitted_np = labels == int(np.argmax(np.bincount(found))) if found.size else np.zeros(n, dtype=bool)
    admitted = torch.as_tensor(admitted_np, device=dev)
    scale = _clip_factors(norms, med)
    weights = torch.zeros(n, dtype=F64, device=dev)
    L = int(admitted.sum())
    if L:
        weights = torch.where(admitted, scale / L, weights)
    update = weights.to(updates.dtype) @ updates
    sigma = lam * float(med)
    if sigma > 0:
        update = update + _gaussian(d, sigma, g, update)
    info = {"admitted": admitted.nonzero().flatten().tolist(), "labels": labels.tolist(),
            "median_norm": float(med), "scale": scale, "noise_std": sigma, "lam": lam}
    return AggResult(update, weights, info)


# --------------------------------------------------------------------------------------------- FoolsGold
def foolsgold_alpha(history: Tensor, kappa: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """FoolsGold's per-client learning-rate weights alpha (Fung, Yoon, Beschastnikh, RAID 2020, Algorithm 1
    lines 7-23) from the ``(n, d)`` history rows ``H_i`` (each client's summed updates):

    ``cs_ij`` = cosine similarity of H_i and H_j (j != i; the diagonal set to 0, as the authors' code, so
    ``v_i = max_j cs_ij`` is at least 0); pardoning: ``cs_ij *= v_i / v_j`` where ``v_i < v_j``;
    ``alpha_i = 1 - max_j cs_ij`` clipped to [0, 1]; ``alpha /= max(alpha)``;
    ``alpha_i = kappa (ln(alpha_i / (1 - alpha_i)) + 0.5)`` clipped to [0, 1] (alpha_i = 1 gives +inf ->
    1, alpha_i = 0 gives -inf -> 0). All alpha 0 before the logit (every client has an exact twin
    direction) stays all 0. Returns ``(alpha float64 (n,), {"cs": pardoned cs, "v": v})``.
    """
    kappa = _check_real(kappa, "kappa", lo=0.0, lo_open=True)
    n = history.shape[0]
    cs = cosine_similarity_matrix(history)
    cs.fill_diagonal_(0.0)
    v = cs.max(dim=1).values if n > 1 else torch.zeros(n, dtype=F64, device=history.device)
    less = v[:, None] < v[None, :]
    ratio = v[:, None] / torch.where(less, v[None, :], torch.ones_like(cs))
    cs = torch.where(less, cs * ratio, cs)
    alpha = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
    top = float(alpha.max())
    if top <= 0:
        return torch.zeros(n, dtype=F64, device=history.device), {"cs": cs, "v": v}
    alpha = alpha / top
    with torch.no_grad():
        logit = kappa * (torch.log(alpha / (1.0 - alpha)) + 0.5)
    alpha = torch.nan_to_num(logit, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    return alpha, {"cs": cs, "v": v}


def foolsgold(updates: Tensor, history: Tensor | None = None, kappa: float = 1.0,
              aggregate: str = "mean") -> AggResult:
    """FoolsGold (Fung, Yoon, Beschastnikh, RAID 2020, Algorithm 1): clients whose *histories* point the
    same way (sybils) are down-weighted.

    ``history`` ``(n, d)``: each client's summed updates of the previous rounds (row i = client i; ``None``
    = no history, the first round); the similarity uses ``H = history + updates`` (line 4). Weights alpha
    from :func:`foolsgold_alpha` (confidence ``kappa`` = 1). Aggregate: ``aggregate="mean"`` (default)
    ``sum_i alpha_i Δ_i / sum_j alpha_j`` -- the FedAvg analogue for model deltas; ``"sum"``
    ``sum_i alpha_i Δ_i`` -- Algorithm 1's line for its FedSGD gradients (see the decisions doc). All alpha
    0 gives the zero update. The optional feature-importance weighting of the output layer (Sec. 5.2) is not
    implemented. ``info["history"]`` is ``H`` (for the caller to keep), ``info["alpha"]`` the raw alpha.
    """
    n, d = check_updates(updates)
    if aggregate not in ("mean", "sum"):
        raise ValueError(f"aggregate must be 'mean' or 'sum', got {aggregate!r}")
    if history is None:
        hist = updates
    else:
        if not isinstance(history, Tensor) or not history.is_floating_point() or tuple(history.shape) != (n, d):
            got = f"{getattr(history, 'dtype', type(history).__name__)} {tuple(getattr(history, 'shape', ()))}"
            raise ValueError(f"history must be a floating (n, d) = {(n, d)} tensor, got {got}")
        if not bool(torch.isfinite(history).all()):
            raise ValueError("history has non-finite (NaN/Inf) entries")
        hist = history.to(device=updates.device, dtype=updates.dtype) + updates
    alpha, extra = foolsgold_alpha(hist, kappa)
    total = float(alpha.sum())
    if aggregate == "sum":
        weights = alpha
    else:
        weights = alpha / total if total > 0 else torch.zeros_like(alpha)
    update = weights.to(updates.dtype) @ updates
    info = {"alpha": alpha, "cs": extra["cs"], "v": extra["v"], "history": hist, "aggregate": aggregate,
            "kappa": kappa}
    return AggResult(update, weights, info)


# ------------------------------------------------------------------------------- norm clipping / weak DP
def norm_clipping(updates: Tensor, M: float = 3.0, sigma: float = 0.0,
                  generator: torch.Generator | None = None) -> AggResult:
    """Norm clipping and weak differential privacy (Sun, Kairouz, Suresh, McMahan, "Can you really backdoor
    federated learning?", 2019, Sec. 4): every update is clipped to norm at most ``M``,
    ``Δ_i min(1, M / ||Δ_i||)``, the clipped updates are averaged, and (weak DP, ``sigma > 0``) Gaussian
    noise ``N(0, sigma^2 I)`` is added to the aggregate, drawn from ``generator``. Defaults: ``M = 3`` (the
    paper's norm bound), ``sigma = 0`` (no noise; the registered ``weak_dp`` uses the paper's 0.025).
    ``weights[i] = min(1, M/||Δ_i||) / n``; ``info["noise_std"] = sigma``.
    """
    n, d = check_updates(updates)
    M = _check_real(M, "M", lo=0.0, lo_open=True)
    sigma = _check_real(sigma, "sigma", lo=0.0)
    g = _check_generator(generator) if sigma > 0 else None
    norms = row_norms(updates)
    scale = _clip_factors(norms, M)
    weights = scale / n
    update = weights.to(updates.dtype) @ updates
    if sigma > 0:
        update = update + _gaussian(d, sigma, g, update)
    info = {"scale": scale, "norms": norms, "M": M, "noise_std": sigma, "n_clipped": int((norms > M).sum())}
    return AggResult(update, weights, info)
