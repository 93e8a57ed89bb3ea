"""Evaluation metrics of Section 6.2 (clean accuracy, attack success rate and target confidence), the
detection flag of Section 7.4, and per-round attack diagnostics (where the attackers' updates lie)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from robustfl.aggregation import aggregators as agg
from robustfl.engine import prepare_inputs


@torch.no_grad()
def backdoor_metrics(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """ASR = fraction of targeted inputs classified as their target label; confidence = the model's
    mean softmax probability q_t of the target label on them (Section 6.2, Figures 7-9)."""
    if len(target) == 0:
        return float("nan"), float("nan")
    was = model.training
    model.eval()
    logits = model(prepare_inputs(x)).float()
    model.train(was)
    prob = logits.softmax(1)
    asr = (logits.argmax(1) == target).float().mean().item()
    conf = prob.gather(1, target.view(-1, 1)).mean().item()
    return asr, conf


def detected(weights: torch.Tensor) -> torch.Tensor:
    """Section 7.4: a client counts as detected when its aggregation weight is below the mean weight.

    Compared in float64 with a relative tolerance of 1e-5 of the largest weight, so that equal weights (FedAvg's
    1/n, whose float32 mean rounds above 1/n for n = 10) detect nobody.
    """
    w = weights.to(torch.float64)
    tol = 1e-5 * w.abs().max() if w.numel() else 0.0
    return w < w.mean() - tol


def attack_diagnostics(updates: torch.Tensor, benign_idx: Sequence[int], f: int) -> dict[str, torch.Tensor]:
    """Where each client's update lies relative to the benign ones: per-client ``dist_ratio`` and ``krum_rank``.

    ``dist_ratio_i = ||delta_i - mu_B|| / s`` with mu_B = mean_{j in B} delta_j over the benign updates B and
    s = sqrt(mean_{j in B} ||delta_j - mu_B||^2), their RMS distance to their mean (a typical benign update
    has dist_ratio near 1). Computed from the pairwise squared distances D_ij (:func:`aggregators.pairwise_sq_dists`):
    mean_{j in B} D_ij = ||delta_i - mu_B||^2 + s^2 and s^2 = mean_{j, k in B} D_jk / 2.

    ``krum_rank_i`` = position (1 = first) of update i in the order Krum (Blanchard et al. 2017) sorts the
    updates by score, sum of the squared distances to the n - f - 2 nearest others, ties broken as
    :func:`aggregators.krum` breaks them: rank 1 is the update Krum with this f would select.

    Only the finite updates count (the server excludes the others); a non-finite update gets NaN in both.
    ``dist_ratio`` is NaN for all with fewer than 2 finite benign updates or s = 0; ``krum_rank`` is NaN for
    all where Krum is undefined (n_finite <= 2f + 2). Returns float64 ``(n,)`` tensors on the updates' device.
    """
    if not isinstance(updates, torch.Tensor) or updates.dim() != 2 or not updates.is_floating_point():
        raise ValueError(f"attack_diagnostics: updates must be a floating (n, d) tensor, got "
                         f"{getattr(updates, 'dtype', type(updates).__name__)} {tuple(getattr(updates, 'shape', ()))}")
    n = updates.shape[0]
    benign = sorted({int(i) for i in benign_idx})
    if any(not 0 <= i < n for i in benign):
        raise ValueError(f"attack_diagnostics: benign indices {benign} out of range for n = {n} updates")
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"attack_diagnostics: f must be an int >= 0, got {f!r}")
    out = {k: torch.full((n,), math.nan, dtype=torch.float64, device=updates.device)
           for k in ("dist_ratio", "krum_rank")}
    finite = torch.isfinite(updates).all(dim=1)
    idx = finite.nonzero().flatten()
    if len(idx) == 0:
        return out
    u = updates if len(idx) == n else updates[idx]
    is_benign = torch.zeros(n, dtype=torch.bool, device=updates.device)
    is_benign[benign] = True
    b = is_benign[idx]  # the finite benign updates, as a mask over u's rows
    d2 = agg.pairwise_sq_dists(u)
    if int(b.sum()) >= 2 and float(s2 := d2[b][:, b].mean() / 2) > 0:
        out["dist_ratio"][idx] = ((d2[:, b].mean(dim=1) - s2).clamp_min(0) / s2).sqrt()
    if len(idx) > 2 * f + 2:
        order = agg.krum_order(d2, f)  # every update, in Krum's selection order
        out["krum_rank"][idx[order]] = torch.arange(1, len(idx) + 1, dtype=torch.float64, device=updates.device)
    return out


def attacker_summary(diag: dict[str, torch.Tensor], selected: torch.Tensor, mal: Sequence[int]) -> dict[str, float]:
    """Round-level view of the attackers ``mal`` from :func:`attack_diagnostics` and the defense's selection
    (``selected_i`` = 1 where client i's aggregation weight is positive): ``mal_dist_ratio`` = mean of their
    dist_ratio, ``mal_krum_rank`` = their best (smallest) krum_rank, both over the attackers where defined;
    ``mal_selected`` = fraction of attackers selected. All NaN without attackers (or where none is defined)."""
    mal = list(mal)
    if not mal:
        return {"mal_dist_ratio": math.nan, "mal_krum_rank": math.nan, "mal_selected": math.nan}
    r, k = diag["dist_ratio"][mal], diag["krum_rank"][mal]
    r, k = r[~r.isnan()], k[~k.isnan()]
    return {"mal_dist_ratio": float(r.mean()) if len(r) else math.nan,
            "mal_krum_rank": float(k.min()) if len(k) else math.nan,
            "mal_selected": float(selected[mal].double().mean())}
