"""FLARE's adaptive attack (Section 7.4, Eq. 9-10): Attack-Krum-Backdoor plus a PLR-matching term,

    argmin  L(D_mal) + lambda L(D_train) + rho ||delta_mal - mean benign delta|| + eta d_plr       (9)

    d_plr = sum_{i in [c]} || PLR_mean(mal model, D_train^i) - PLR_mean(mean benign model, D_train^i) ||_2   (10)

Eq. (10) as printed sums *signed* vector differences, which is not a distance (it can be 0 for far-apart
PLRs and is not a scalar); we read it as the sum over classes of the L2 norms of the per-class mean-PLR
differences (docs/decisions/attacks-backdoor.md). ``D_train^i`` is the attacker's own training data of
class i; the "mean benign model" is ``theta + mean benign delta`` (white-box, Section 3.2).

The term is added to the stealth (benign) step of the alternating minimisation, as in the authors'
code (``weight_and_plr_constrain``: ``loss = loss1 + rho*loss2 + 0.1*plr_loss``, malicious loss unchanged),
and estimated on each mini-batch: per class present in the batch, the mean PLR of the current model on
those samples against the mean PLR of the benign reference model on the *same* samples (precomputed once).

Options: ``eta`` (default 0.1, the authors' weight; measured on digits the term's effect saturates from
eta ~ 0.03 because Adam normalises the gradient scale, see the decision record) plus every option of
:mod:`robustfl.attacks.backdoor`. How much the term can do is set mostly by ``ls`` (stealth steps per
boosted malicious step), not by eta. ``variant="code"`` also switches the PLR term to the code's form:
``0.5 || mean over the batch of (plr_j - ben_class_mean[y_j]) ||^2`` with the class means of the
attacker's *own* honestly trained model (``dist_self``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustfl.attacks import register_attack
from robustfl.attacks.backdoor import NORM_EPS, ExtraLoss, craft_alternating, plr_with, resolve_options
from robustfl.attacks.base import AttackContext

ETA_DEFAULT = 0.1


def class_means(plr: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean rows ``(c, o)`` of ``plr (N, o)`` and the class counts ``(c,)``."""
    onehot = torch.nn.functional.one_hot(y, num_classes).to(plr.dtype)  # (N, c)
    counts = onehot.sum(0)
    sums = onehot.t() @ plr
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def plr_distance(plr_a: torch.Tensor, plr_b: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Eq. (10) read as a distance: ``sum_i ||mean_{y=i} plr_a - mean_{y=i} plr_b||_2`` over the classes
    present in ``y`` (both PLR sets on the same inputs)."""
    ma, counts = class_means(plr_a, y, num_classes)
    mb, _ = class_means(plr_b, y, num_classes)
    norms = torch.sqrt((ma - mb).pow(2).sum(1) + NORM_EPS)
    return (norms * (counts > 0).to(norms.dtype)).sum()


def d_plr(model: nn.Module, flat_mal: torch.Tensor, flat_ben: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
          num_classes: int) -> float:
    """Measured d_plr (Eq. 10, norm reading) between two parameter vectors on data ``(x, y)``."""
    return plr_distance(plr_with(model, flat_mal, x), plr_with(model, flat_ben, x), y, num_classes).item()


def _paper_term(ben_plr: torch.Tensor, eta: float, num_classes: int) -> ExtraLoss:
    def term(r: torch.Tensor | None, logits: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if r is None:
            raise ValueError("adaptive_plr needs a model with a features/head split (a PLR)")
        return eta * plr_distance(r, ben_plr[idx], yb, num_classes)
    return term


def _code_term(ben_class_mean: torch.Tensor, eta: float) -> ExtraLoss:
    def term(r: torch.Tensor | None, logits: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if r is None:
            raise ValueError("adaptive_plr needs a model with a features/head split (a PLR)")
        return eta * 0.5 * (r - ben_class_mean[yb]).mean(0).pow(2).sum()
    return term


@register_attack("adaptive_plr", targeted=True)
def adaptive_plr(ctx: AttackContext) -> torch.Tensor:
    """FLARE's adaptive attack (Sec. 7.4): Attack-Krum-Backdoor whose stealth step also pulls the
    per-class mean PLRs of the malicious model towards those of the mean benign model (``eta * d_plr``)."""
    opts: dict[str, Any] = resolve_options(ctx, {"eta": ETA_DEFAULT})
    variant = opts["variant"]
    eta = float(opts["eta"])
    if eta < 0:
        raise ValueError("eta must be >= 0")
    num_classes = ctx.num_classes

    def extra_for(i: int, x_own: torch.Tensor, y_own: torch.Tensor, ref_delta: torch.Tensor,
                  gen: torch.Generator) -> ExtraLoss | None:
        if eta == 0:
            return None
        ben_flat = ctx.global_flat + ref_delta  # the benign reference model (mean benign, or own in "code")
        ben_plr = plr_with(ctx.model, ben_flat, x_own)
        y_dev = y_own.to(ben_plr.device)
        if variant == "code":
            return _code_term(class_means(ben_plr, y_dev, num_classes)[0], eta)
        return _paper_term(ben_plr, eta, num_classes)

    return craft_alternating(ctx, opts, extra_for)
