"""The server's screening of what it receives (documented policy, README "Guarantees"): an update of the
wrong shape or dtype is an error; a client update holding NaN/Inf, or (for FLARE) whose model gives
non-finite PLRs, is excluded from the round with a logged warning; an aggregate that would make the global
model non-finite is an error, the model left as it was."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("robustfl")


def check_crafted(crafted: object, attack: str, shape: tuple[int, int]) -> torch.Tensor:
    """The attackers' updates as the attack returned them, if a floating-point tensor of ``shape``."""
    if not isinstance(crafted, torch.Tensor) or not crafted.is_floating_point():
        got = getattr(crafted, "dtype", type(crafted).__name__)
        raise ValueError(f"attack {attack!r} returned {got}, expected a floating-point tensor")
    if tuple(crafted.shape) != shape:
        raise ValueError(f"attack {attack!r} returned shape {tuple(crafted.shape)}, expected {shape}")
    return crafted


def screen_updates(updates: torch.Tensor, d: int) -> torch.Tensor:
    """The boolean mask of the clients kept: a wrong shape or dtype is an error; an update holding
    NaN/Inf is excluded with a logged warning."""
    if updates.dim() != 2 or updates.shape[1] != d:
        raise ValueError(f"client updates have shape {tuple(updates.shape)}, expected (n, {d})")
    if not updates.is_floating_point():
        raise ValueError(f"client updates have dtype {updates.dtype}, expected a floating dtype")
    keep = torch.isfinite(updates).all(dim=1)
    if not bool(keep.all()):
        bad = (~keep).nonzero().flatten().tolist()
        log.warning("excluding client(s) %s: update holds NaN or Inf", bad)
    return keep


def screen_plrs(keep: torch.Tensor, plrs: torch.Tensor) -> torch.Tensor:
    """``keep`` without the clients whose models give non-finite PLRs ``plrs (n, m, o)`` (logged)."""
    finite = torch.isfinite(plrs).flatten(1).all(1)
    if not bool(finite[keep].all()):
        log.warning("excluding client(s) %s: their models give non-finite PLRs", (keep & ~finite).nonzero().flatten().tolist())
        keep = keep & finite
    return keep


def apply_aggregate(theta: torch.Tensor, update: torch.Tensor, rnd: int, defense: str) -> torch.Tensor:
    """``theta + update`` (Eq. 6); a non-finite aggregate, or one that makes the model non-finite, raises
    FloatingPointError (the global model is then not updated)."""
    if not bool(torch.isfinite(update).all()):
        raise FloatingPointError(f"round {rnd}: defense {defense!r} produced a non-finite aggregate; "
                                 "the global model was not updated")
    new_theta = theta + update.to(theta.dtype)
    if not bool(torch.isfinite(new_theta).all()):  # finite aggregate, but theta + aggregate overflows
        raise FloatingPointError(f"round {rnd}: the aggregate of defense {defense!r} (norm "
                                 f"{float(update.double().norm()):.3g}) makes the global model non-finite; "
                                 "the global model was not updated")
    return new_theta
