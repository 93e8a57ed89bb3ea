"""Untargeted model-poisoning attacks of Fang et al. (USENIX Security 2020, "Local Model Poisoning Attacks
to Byzantine-Robust Federated Learning"), full-knowledge setting, as used in Section 7.2 of the FLARE paper.

Everything works in update space ``delta = w - theta`` (theta = global model). Krum, the median and the
trimmed mean commute with the translation ``w_i = theta + delta_i`` (``rule(w) = theta + rule(delta)``), so a
Krum attack crafted on updates is exactly the attack on local models. Fang's trimmed-mean attack, however,
picks its sampling intervals from the *sign* of the benign extreme ``w_max,j`` / ``w_min,j``, which is not
translation invariant; it is offered in model space (``space="model"``, Fang's definition, default) and in
update space (``space="update"``, what attack code written on updates does). The FLARE authors' code
crafts it differently again (:func:`code_trimmed_mean`, ``variant: code``): it takes ``theta - delta_i`` as the
benign "models" and sends ``theta - value``.

Direction: ``s = sign(mean of the benign updates)`` -- the direction in which each parameter would move
without attack (Fang's s_j; the FLARE authors' code uses the sign of the sum, the same thing).

Attackers always send the returned malicious *updates* ``(n_mal, d)``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from robustfl.aggregation.aggregators import check_updates, krum, pairwise_sq_dists
from robustfl.attacks import AttackContext, register_attack
from robustfl.attacks.base import check_n_mal

__all__ = [
    "direction",
    "fang_krum_lambda_upper_bound",
    "fang_krum",
    "fang_krum_search",
    "FangKrumResult",
    "fang_trimmed_mean",
    "fang_tm_intervals",
    "code_tm_intervals",
    "code_trimmed_mean",
    "layer_slices_from_model",
    "krum_untargeted",
    "trimmedmean_untargeted",
]


def direction(benign_updates: Tensor) -> Tensor:
    """Fang's s: ``sign(mean_i delta_i)`` per coordinate (0 where the mean is exactly 0)."""
    return torch.sign(benign_updates.to(torch.float64).mean(dim=0)).to(benign_updates.dtype)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
          dtype: torch.dtype) -> Tensor:
    """U(0, 1) samples drawn on the generator's device, then moved (works with a CPU generator + GPU data)."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gdev, dtype=torch.float64).to(device=device, dtype=dtype)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=gdev, dtype=torch.float64).to(device)


# ----------------------------------------------------------------------------------------------- Krum
def fang_krum_lambda_upper_bound(benign_updates: Tensor, n_mal: int) -> float:
    """Fang et al.'s upper bound on lambda for the full-knowledge Krum attack.

    ``lambda <= 1 / ((m - 2c - 1) sqrt(d)) * min_i sum_{l in Gamma_i} D(w_l, w_i)
                + 1 / sqrt(d) * max_i D(w_i, w_Re)``

    with m = total clients (benign + c attackers), c = n_mal, i and l over benign clients, Gamma_i the
    m - c - 2 benign models nearest to w_i (excluding w_i), D the (plain) Euclidean distance and
    w_Re = theta the before-attack global model, so ``D(w_i, w_Re) = ||delta_i||`` and
    ``D(w_l, w_i) = ||delta_l - delta_i||``. Needs m - 2c - 1 > 0.
    """
    n_ben, d = check_updates(benign_updates, "benign_updates")
    c = check_n_mal(n_mal)
    m = n_ben + c
    if m - 2 * c - 1 <= 0:
        raise ValueError(f"Fang's lambda bound needs m - 2c - 1 > 0 (m={m} clients, c={c} attackers)")
    n_neigh = m - c - 2  # = n_ben - 2 benign neighbours
    dist = pairwise_sq_dists(benign_updates).sqrt()
    if n_neigh > 0:
        dist.fill_diagonal_(float("inf"))
        sums = torch.sort(dist, dim=1).values[:, :n_neigh].sum(dim=1)
        min_sum = float(sums.min())
    else:
        min_sum = 0.0
    norms = benign_updates.to(torch.float64).norm(dim=1)
    return min_sum / ((m - 2 * c - 1) * math.sqrt(d)) + float(norms.max()) / math.sqrt(d)


class FangKrumResult(NamedTuple):
    """Outcome of the lambda search for one block (whole model or one layer)."""

    crafted: Tensor  # (d_block,) the crafted update -lambda * s
    lam: float  # last lambda tried (the successful one if `selected`)
    selected: bool  # whether Krum picked a crafted update at `lam`
    tries: int  # Krum evaluations


def fang_krum_search(benign: Tensor, s: Tensor, n_mal: int, f: int, lam0: float, threshold: float,
                     distance: str = "squared") -> FangKrumResult:
    """Halve lambda from ``lam0`` until Krum (server's f) over ``[crafted] * n_mal + benign`` selects a
    crafted update, trying every lambda >= ``threshold`` (lam0 is always tried). If none is selected,
    the crafted update of the last (smallest) lambda tried is returned with ``selected=False``."""
    lam = float(lam0)
    tries = 0
    while True:
        crafted = -lam * s
        stacked = torch.cat([crafted.expand(n_mal, -1), benign], dim=0)
        res = krum(stacked, f, distance=distance)
        tries += 1
        if res.info["selected"][0] < n_mal:
            return FangKrumResult(crafted, lam, True, tries)
        if lam / 2 < threshold:
            return FangKrumResult(crafted, lam, False, tries)
        lam /= 2


def fang_krum(benign_updates: Tensor, n_mal: int, f: int, *, theta: Tensor | None = None,
              lam_init: float | None = None, threshold: float | None = None, epsilon: float = 0.0,
              layer_slices: Sequence[tuple[int, int]] | None = None, generator: torch.Generator | None = None,
              variant: str = "paper", distance: str = "squared", return_details: bool = False
              ) -> Tensor | tuple[Tensor, list[FangKrumResult]]:
    """Fang et al.'s full-knowledge attack on Krum ("Attack-Krum-Untargeted", Eq. (8) of FLARE).

    Crafted local model ``w'_1 = theta - lambda * s`` i.e. update ``delta'_1 = -lambda * s``; the other
    attackers copy it. ``variant="paper"`` (Fang et al.): lambda starts at :func:`fang_krum_lambda_upper_bound`
    (or ``lam_init``) and is halved until Krum with the server's ``f`` over ``[crafted..., benign...]`` selects
    a crafted update or lambda would fall below ``threshold`` (default 1e-5); then the last crafted update is
    sent anyway. With ``epsilon > 0`` attackers 2..c are drawn uniformly from the Euclidean ball of radius
    epsilon around delta'_1 (after the search, as in Fang et al.); ``epsilon = 0`` sends identical copies.
    ``variant="code"`` (FLARE authors' code): layer by layer over ``layer_slices`` ((start, end) of each
    parameter tensor in the flat vector; default: the whole vector as one layer), lambda starts at 1.0
    (or ``lam_init``) per layer and is halved until Krum on that layer alone picks an attacker, giving up
    below ``threshold`` (default 1e-8); all attackers send the same values.
    ``theta`` is accepted for symmetry but not needed: in update space D(w_i, theta) = ||delta_i||.
    """
    n_ben, d = check_updates(benign_updates, "benign_updates")
    n_mal = check_n_mal(n_mal)
    if variant not in ("paper", "code"):
        raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0):
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if theta is not None and theta.numel() != d:
        raise ValueError(f"theta must have d={d} entries, got {theta.numel()}")
    out_empty = benign_updates.new_zeros((0, d))
    if n_mal == 0:
        return (out_empty, []) if return_details else out_empty
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"f must be an int >= 0, got {f!r}")
    if not n_ben + n_mal > 2 * f + 2:
        raise ValueError(f"Krum needs n > 2f + 2 (got n={n_ben + n_mal} clients, f={f})")
    if threshold is None:
        threshold = 1e-5 if variant == "paper" else 1e-8
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    if lam_init is not None and not (math.isfinite(lam_init) and lam_init > 0):
        raise ValueError(f"lam_init must be a finite number > 0, got {lam_init!r}")
    s = direction(benign_updates)
    details: list[FangKrumResult] = []
    if variant == "paper":
        lam0 = lam_init if lam_init is not None else fang_krum_lambda_upper_bound(benign_updates, n_mal)
        if not lam0 > 0:  # all benign updates zero: nothing to deviate from
            lam0 = threshold
        res = fang_krum_search(benign_updates, s, n_mal, f, lam0, threshold, distance)
        details.append(res)
        crafted = res.crafted
    else:
        slices = list(layer_slices) if layer_slices is not None else [(0, d)]
        _check_slices(slices, d)
        crafted = torch.empty(d, dtype=benign_updates.dtype, device=benign_updates.device)
        lam0 = lam_init if lam_init is not None else 1.0
        for a, b in slices:
            res = fang_krum_search(benign_updates[:, a:b], s[a:b], n_mal, f, lam0, threshold, distance)
            details.append(res)
            crafted[a:b] = res.crafted
    out = crafted.unsqueeze(0).repeat(n_mal, 1)
    if epsilon > 0 and n_mal > 1 and variant == "paper":
        # uniform in the d-ball: Gaussian direction, radius epsilon * U^(1/d)
        g = _randn((n_mal - 1, d), generator, benign_updates.device)
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
        r = epsilon * _rand((n_mal - 1, 1), generator, benign_updates.device, torch.float64) ** (1.0 / d)
        out[1:] = (out[1:].to(torch.float64) + g * r).to(benign_updates.dtype)
    return (out, details) if return_details else out


def _check_slices(slices: Sequence[tuple[int, int]], d: int) -> None:
    pos = 0
    for a, b in slices:
        if a != pos or b <= a:
            raise ValueError(f"layer_slices must tile [0, d) in order with non-empty slices; bad slice ({a}, {b})")
        pos = b
    if pos != d:
        raise ValueError(f"layer_slices cover {pos} coordinates, but d={d}")


def layer_slices_from_model(model: nn.Module) -> list[tuple[int, int]]:
    """(start, end) of every parameter tensor in the flat vector (concatenation of ``p.reshape(-1)``
    over ``model.parameters()`` in order)."""
    out, pos = [], 0
    for p in model.parameters():
        out.append((pos, pos + p.numel()))
        pos += p.numel()
    return out


# --------------------------------------------------------------------------------------- trimmed mean
def fang_tm_intervals(benign_updates: Tensor, *, theta: Tensor | None = None, b: float = 2.0,
                      space: str = "model") -> tuple[Tensor, Tensor]:
    """Per-coordinate sampling interval ``[lo_j, hi_j]`` of Fang et al.'s trimmed-mean attack, expressed in
    the chosen space (local-model values for ``space="model"``, update values for ``space="update"``).

    With ``w_max,j`` / ``w_min,j`` the benign maximum / minimum and ``s_j`` the benign direction:
    ``s_j = -1`` (parameter would decrease): between ``w_max,j`` and ``b * w_max,j`` if ``w_max,j > 0``,
    else between ``w_max,j / b`` and ``w_max,j`` (all values >= w_max,j);
    ``s_j = +1``: between ``w_min,j / b`` and ``w_min,j`` if ``w_min,j > 0``, else between ``b * w_min,j`` and
    ``w_min,j`` (all values <= w_min,j). Fang define s_j = 1 if the parameter increases, -1 otherwise, so
    s_j = 0 (benign mean exactly 0) is treated as -1.
    """
    n_ben, d = check_updates(benign_updates, "benign_updates")
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 1:
        raise ValueError(f"b must be a number > 1, got {b!r}")
    if space not in ("model", "update"):
        raise ValueError(f"space must be 'model' or 'update', got {space!r}")
    x = benign_updates.to(torch.float64)
    s = torch.sign(x.mean(dim=0))
    if space == "model":
        if theta is None:
            raise ValueError("space='model' needs theta (the global model) to form the local models")
        th = theta.reshape(-1).to(device=x.device, dtype=torch.float64)
        if th.numel() != d:
            raise ValueError(f"theta must have d={d} entries, got {th.numel()}")
        x = x + th
    wmax, wmin = x.max(dim=0).values, x.min(dim=0).values
    up_far = torch.where(wmax > 0, b * wmax, wmax / b)  # other end of the interval above w_max
    low_far = torch.where(wmin > 0, wmin / b, b * wmin)  # other end of the interval below w_min
    push_up = s <= 0  # s_j = -1 (or 0): sample around w_max
    lo = torch.where(push_up, torch.minimum(wmax, up_far), torch.minimum(wmin, low_far))
    hi = torch.where(push_up, torch.maximum(wmax, up_far), torch.maximum(wmin, low_far))
    return lo, hi


def fang_trimmed_mean(benign_updates: Tensor, n_mal: int, *, theta: Tensor | None = None, b: float = 2.0,
                      space: str = "model", same_values: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
    """Fang et al.'s full-knowledge attack on the trimmed mean / median ("Attack-TM-Untargeted").

    Every crafted coordinate is drawn uniformly from :func:`fang_tm_intervals`; each attacker samples
    independently (Fang et al.) unless ``same_values`` (FLARE authors' code: all attackers send the same
    values). Returns updates (model-space values minus theta for ``space="model"``).
    """
    n_ben, d = check_updates(benign_updates, "benign_updates")
    n_mal = check_n_mal(n_mal)
    lo, hi = fang_tm_intervals(benign_updates, theta=theta, b=b, space=space)
    if n_mal == 0:
        return benign_updates.new_zeros((0, d))
    rows = 1 if same_values else n_mal
    u = _rand((rows, d), generator, benign_updates.device, torch.float64)
    vals = lo + u * (hi - lo)
    if space == "model":
        vals = vals - theta.reshape(-1).to(device=vals.device, dtype=torch.float64)  # type: ignore[union-attr]
    if same_values:
        vals = vals.expand(n_mal, -1)
    return vals.to(benign_updates.dtype).contiguous()


def code_tm_intervals(benign_updates: Tensor, theta: Tensor, *, b: float = 2.0) -> tuple[Tensor, Tensor]:
    """Per-coordinate sampling interval ``[lo_j, hi_j]`` of the trimmed-mean attack as the FLARE authors' code
    crafts it (reference code ``attack_trimmedmean``; Fang et al., USENIX Security 2020, Sec. 4, full-knowledge
    attack on the trimmed mean, with other "models"). Values are in the code's space ``v = theta - delta``.

    ``s_j = sign(sum_i delta_ij)`` over the benign updates; ``v_ij = theta_j - delta_ij``;
    ``v_max,j`` / ``v_min,j`` their maximum / minimum over i. Then
    ``s_j >= 0``: between ``v_max,j`` and ``b * v_max,j`` if ``v_max,j > 0``, else between ``v_max,j`` and
    ``v_max,j / b`` (all values >= v_max,j);
    ``s_j < 0``: between ``v_min,j / b`` and ``v_min,j`` if ``v_min,j > 0``, else between ``b * v_min,j`` and
    ``v_min,j`` (all values <= v_min,j).
    The attackers send ``delta_mal,j = theta_j - value_j`` (see :func:`code_trimmed_mean`), so
    ``delta_mal,j <= min_i delta_ij`` where ``s_j >= 0`` and ``>= max_i delta_ij`` where ``s_j < 0``: against s,
    by an amount that scales with ``|theta_j|``. This is Fang's model-space interval applied to the updates
    ``-delta_i`` (whose mean sign is ``-s_j``; Fang's s_j = 0 counts as -1, the code's as >= 0: the same branch).
    """
    n_ben, d = check_updates(benign_updates, "benign_updates")
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 1:
        raise ValueError(f"b must be a number > 1, got {b!r}")
    if not isinstance(theta, Tensor):
        raise ValueError("the code variant needs theta (the global model): it crafts from theta - delta")
    x = benign_updates.to(torch.float64)
    th = theta.reshape(-1).to(device=x.device, dtype=torch.float64)
    if th.numel() != d:
        raise ValueError(f"theta must have d={d} entries, got {th.numel()}")
    s = torch.sign(x.sum(dim=0))
    v = th - x
    vmax, vmin = v.max(dim=0).values, v.min(dim=0).values
    up_far = torch.where(vmax > 0, b * vmax, vmax / b)  # other end of the interval above v_max
    low_far = torch.where(vmin > 0, vmin / b, b * vmin)  # other end of the interval below v_min
    at_max = s >= 0
    lo = torch.where(at_max, torch.minimum(vmax, up_far), torch.minimum(vmin, low_far))
    hi = torch.where(at_max, torch.maximum(vmax, up_far), torch.maximum(vmin, low_far))
    return lo, hi


def code_trimmed_mean(benign_updates: Tensor, n_mal: int, theta: Tensor, *, b: float = 2.0,
                      generator: torch.Generator | None = None) -> Tensor:
    """Attack-TM-Untargeted as the FLARE authors' code crafts it (``variant: code``).

    One value per coordinate is drawn uniformly from :func:`code_tm_intervals` (``value = lo + u (hi - lo)``,
    ``u ~ U(0, 1)``); every attacker sends the same update ``delta_mal = theta - value``. Fang et al.
    (USENIX Security 2020, Sec. 4) sample each attacker independently on local models ``theta + delta_i``
    (:func:`fang_trimmed_mean`).
    """
    n_ben, d = check_updates(benign_updates, "benign_updates")
    n_mal = check_n_mal(n_mal)
    lo, hi = code_tm_intervals(benign_updates, theta, b=b)
    if n_mal == 0:
        return benign_updates.new_zeros((0, d))
    u = _rand((1, d), generator, benign_updates.device, torch.float64)
    value = lo + u * (hi - lo)
    mal = theta.reshape(1, -1).to(device=value.device, dtype=torch.float64) - value
    return mal.expand(n_mal, -1).to(benign_updates.dtype).contiguous()


# ------------------------------------------------------------------------------------ registered attacks
_KRUM_KEYS = {"variant", "lam_init", "threshold", "epsilon", "distance"}
_TM_KEYS = {"variant", "b", "space", "same_values"}
_TM_PAPER_ONLY = {"space", "same_values"}


def _params(ctx: AttackContext, allowed: set[str], name: str) -> dict[str, Any]:
    unknown = set(ctx.params) - allowed
    if unknown:
        raise ValueError(f"attack {name!r}: unknown params {sorted(unknown)}; allowed: {sorted(allowed)}")
    return dict(ctx.params)


@register_attack("krum_untargeted", targeted=False)
def krum_untargeted(ctx: AttackContext) -> Tensor:
    """Attack-Krum-Untargeted (Fang et al., USENIX Security 2020, full knowledge; FLARE Sec. 7.2).

    ``ctx.params``: variant ("paper" | "code"), lam_init, threshold, epsilon, distance ("squared" |
    "euclidean", the server Krum's distance). Krum's f is ``ctx.f``, or ``ctx.n_attackers`` when the server
    runs with f = 0."""
    p = _params(ctx, _KRUM_KEYS, "krum_untargeted")
    variant = p.get("variant", "paper")
    f = ctx.f if ctx.f > 0 else ctx.n_attackers
    slices = layer_slices_from_model(ctx.model) if variant == "code" else None
    return fang_krum(ctx.benign_updates, ctx.n_attackers, f, theta=ctx.global_flat, lam_init=p.get("lam_init"),
                     threshold=p.get("threshold"), epsilon=float(p.get("epsilon", 0.0)), layer_slices=slices,
                     generator=ctx.generator, variant=variant, distance=p.get("distance", "squared"))


@register_attack("trimmedmean_untargeted", targeted=False)
def trimmedmean_untargeted(ctx: AttackContext) -> Tensor:
    """Attack-TM-Untargeted (Fang et al., USENIX Security 2020, full knowledge; FLARE Sec. 7.2).

    ``ctx.params``: variant ("paper": Fang et al., :func:`fang_trimmed_mean`, default | "code": the authors'
    code, :func:`code_trimmed_mean`), b (default 2); with variant "paper" also space ("model" | "update")
    and same_values."""
    p = _params(ctx, _TM_KEYS, "trimmedmean_untargeted")
    variant = p.get("variant", "paper")
    if variant not in ("paper", "code"):
        raise ValueError(f"attack 'trimmedmean_untargeted': variant must be 'paper' or 'code', got {variant!r}")
    if variant == "code":
        extra = sorted(_TM_PAPER_ONLY & set(p))
        if extra:
            raise ValueError(f"attack 'trimmedmean_untargeted': params {extra} apply to variant 'paper' only "
                             "(variant 'code' crafts from theta - delta and sends identical copies)")
        return code_trimmed_mean(ctx.benign_updates, ctx.n_attackers, ctx.global_flat, b=float(p.get("b", 2.0)),
                                 generator=ctx.generator)
    return fang_trimmed_mean(ctx.benign_updates, ctx.n_attackers, theta=ctx.global_flat, b=float(p.get("b", 2.0)),
                             space=p.get("space", "model"), same_values=bool(p.get("same_values", False)),
                             generator=ctx.generator)
