"""Untargeted Byzantine and data-poisoning attacks of the standard suite: ALIE, IPM, sign flipping, the
Gaussian attack and label flipping. White-box where they use the round's benign updates (Section 3.2);
every attacker sends an *update* (a row of the returned ``(n_attackers, d)``).

* ``alie`` -- Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses for Distributed
  Learning", NeurIPS 2019 (the attack's algorithm): ``mu - z sigma`` (coordinate-wise mean and standard
  deviation of the benign updates), ``s = floor(n/2 + 1) - f``, ``z = Phi^{-1}((n - s) / n)``.
* ``ipm`` -- Xie, Koyejo, Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
  Manipulation", UAI 2020: ``-epsilon * mean(benign)``.
* ``sign_flip`` -- the Byzantine baseline "send the opposite of the honest mean", ``-mean(benign)``
  (ByzFL's ``SignFlipping``; Allen-Zhu et al., ICLR 2021): IPM with epsilon = 1.
* ``gaussian`` -- the Gaussian Byzantine worker of Blanchard et al., "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent", NeurIPS 2017 (experiments), and of Fang et al., USENIX Security
  2020 (compared attacks; ByzFL's ``Gaussian``): every coordinate drawn from ``N(mu, sigma^2)``.
* ``label_flip`` -- data poisoning: each attacker trains honestly on its own shard with every label
  ``l`` replaced by ``C - 1 - l`` (Fang et al., USENIX Security 2020, compared attacks; ByzFL's ``LabelFlipping``;
  label flipping as studied by Tolpegin et al., ESORICS 2020), through the engine
  (:func:`robustfl.engine.train_clients`) with the run's engine options, precision and hyper-parameters.

Choices the papers leave open: docs/decisions/attacks-suite.md.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor, nn

from robustfl.aggregation.aggregators import check_updates
from robustfl.attacks import AttackContext, register_attack
from robustfl.attacks.base import check_n_mal
from robustfl.engine import EngineOptions, train_clients

__all__ = [
    "PARAM_PARSERS",
    "alie",
    "alie_z",
    "flip_labels",
    "gaussian",
    "ipm",
    "label_flip_updates",
    "parse_params",
]

#: default of IPM's epsilon: Xie et al.'s small-epsilon regime (their experiments use 0.1 and 100)
IPM_EPSILON = 0.1


# ----------------------------------------------------------------------------------------------- ALIE
def alie_z(n: int, f: int) -> float:
    """ALIE's ``z`` for ``n`` workers of which ``f`` are Byzantine (Baruch et al., NeurIPS 2019): the
    attackers need ``s = floor(n/2 + 1) - f`` benign "supporters" and take the largest z with
    ``Phi(z) < (n - s) / n``, i.e. ``z = Phi^{-1}((n - s) / n)`` (Phi the standard normal CDF).
    Needs ``1 <= s <= n - 1`` (so that the quantile is finite)."""
    for key, v in (("n", n), ("f", f)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"alie: {key} must be an int >= 0, got {v!r}")
    s = (n // 2 + 1) - f
    if not 1 <= s <= n - 1:
        raise ValueError(f"alie: z needs 1 <= s = floor(n/2 + 1) - f <= n - 1, got s = {s} (n = {n}, f = {f})")
    return NormalDist().inv_cdf((n - s) / n)


def alie(benign_updates: Tensor, n_mal: int, z: float) -> Tensor:
    """A Little Is Enough (Baruch et al., NeurIPS 2019): every attacker sends
    ``mu_j - z * sigma_j`` per coordinate j, with ``mu`` the mean and ``sigma`` the sample standard
    deviation (``1/(n_ben - 1)``) of the benign updates, computed in float64. Needs two benign updates."""
    n_ben, d = check_updates(benign_updates, "benign_updates")
    n_mal = check_n_mal(n_mal)
    if n_ben < 2:
        raise ValueError(f"alie: the benign standard deviation needs at least 2 benign updates, got {n_ben}")
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z):
        raise ValueError(f"alie: z must be a finite number, got {z!r}")
    x = benign_updates.to(torch.float64)
    row = x.mean(dim=0) - z * x.std(dim=0, correction=1)
    return row.to(benign_updates.dtype).expand(n_mal, -1).contiguous()


# ------------------------------------------------------------------------------------- IPM, sign flip
def ipm(benign_updates: Tensor, n_mal: int, epsilon: float) -> Tensor:
    """Inner product manipulation (Xie et al., UAI 2020): every attacker sends
    ``-epsilon * (1/n_ben) sum_i delta_i`` (mean in float64), so that the aggregate's inner product with
    the true gradient turns negative. ``epsilon = 1`` is sign flipping (ByzFL's ``SignFlipping``)."""
    n_ben, d = check_updates(benign_updates, "benign_updates")
    n_mal = check_n_mal(n_mal)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (math.isfinite(epsilon)
                                                                                   and epsilon > 0):
        raise ValueError(f"ipm: epsilon must be a finite number > 0, got {epsilon!r}")
    row = -float(epsilon) * benign_updates.to(torch.float64).mean(dim=0)
    return row.to(benign_updates.dtype).expand(n_mal, -1).contiguous()


# ------------------------------------------------------------------------------------------- Gaussian
def gaussian(n_mal: int, d: int, *, mu: float = 0.0, sigma: float = 1.0, same_values: bool = False,
             generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Tensor:
    """The Gaussian attack (Blanchard et al., NeurIPS 2017; ByzFL's ``Gaussian``): every coordinate
    ``~ N(mu, sigma^2)``, i.i.d. across coordinates and attackers (``same_values``: one draw, sent by every
    attacker, as ByzFL's ``ByzantineClient`` does). Drawn as ``randn * sigma + mu`` in ``dtype`` on the
    generator's device (the CPU without one; then the global stream), then moved to ``device``."""
    n_mal = check_n_mal(n_mal)
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"gaussian: d must be an int >= 1, got {d!r}")
    for key, v in (("mu", mu), ("sigma", sigma)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"gaussian: {key} must be a finite number, got {v!r}")
    if sigma < 0:
        raise ValueError(f"gaussian: sigma must be >= 0, got {sigma!r}")
    gdev = generator.device if generator is not None else torch.device("cpu")
    rows = min(1, n_mal) if same_values else n_mal
    out = torch.randn((rows, d), generator=generator, device=gdev, dtype=dtype) * sigma + mu
    out = out.to(device if device is not None else gdev)
    return out.expand(n_mal, -1).contiguous() if same_values else out


# --------------------------------------------------------------------------------------- label flipping
def flip_labels(y: Tensor, num_classes: int) -> Tensor:
    """``l -> C - 1 - l`` for integer labels in ``[0, C)`` (Fang et al. 2020; ByzFL's ``LabelFlipping``)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"label_flip: num_classes must be an int >= 2, got {num_classes!r}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"label_flip: labels must be integers, got dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"label_flip: labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return (num_classes - 1) - y


def label_flip_updates(model: nn.Module, theta: Tensor, owns: Sequence[tuple[Tensor, Tensor]], num_classes: int,
                       *, epochs: int, batch_size: int, lr: float, options: EngineOptions,
                       generator: torch.Generator | None, precision: str = "fp32") -> Tensor:
    """Honest local training (:func:`robustfl.engine.train_clients`: ``epochs`` of Adam mini-batch steps, the
    run's engine) of ``len(owns)`` attackers from ``theta``, attacker i on its own shard ``owns[i] = (x, y)``
    with flipped labels (:func:`flip_labels`); returns the updates ``(k, d)``. The mini-batches come from
    ``generator`` (:func:`robustfl.engine.batch_plan`)."""
    if not owns:
        return theta.new_zeros(0, theta.numel())
    x = torch.cat([xi for xi, _ in owns])
    y = torch.cat([flip_labels(yi, num_classes) for _, yi in owns]).to(x.device)
    shards, pos = [], 0
    for _, yi in owns:
        shards.append(torch.arange(pos, pos + len(yi), device=x.device))
        pos += len(yi)
    return train_clients(model, theta, x, y, shards, epochs=epochs, batch_size=batch_size, lr=lr, options=options,
                         precision=precision, generator=generator)


# ------------------------------------------------------------------------------------------ parameters
def _real(name: str, o: dict[str, Any], key: str, *, lo: float | None = None, lo_open: bool = False) -> None:
    v = o[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"attack {name!r}: {key} must be a finite number, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"attack {name!r}: {key} must be {'>' if lo_open else '>='} {lo:g}, got {v!r}")
    o[key] = float(v)


def _with_defaults(name: str, params: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    params = dict(params or {})
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"attack {name!r}: unknown params {sorted(unknown)}; allowed: {sorted(defaults)}")
    return {**defaults, **params}


def _parse_alie(params: dict[str, Any] | None) -> dict[str, Any]:
    o = _with_defaults("alie", params, {"z": None})
    if o["z"] is not None:
        _real("alie", o, "z")
    return o


def _parse_ipm(params: dict[str, Any] | None) -> dict[str, Any]:
    o = _with_defaults("ipm", params, {"epsilon": IPM_EPSILON})
    _real("ipm", o, "epsilon", lo=0.0, lo_open=True)
    return o


def _parse_none(name: str) -> Callable[[dict[str, Any] | None], dict[str, Any]]:
    return lambda params: _with_defaults(name, params, {})


def _parse_gaussian(params: dict[str, Any] | None) -> dict[str, Any]:
    o = _with_defaults("gaussian", params, {"mu": 0.0, "sigma": 1.0, "same_values": False, "space": "update"})
    _real("gaussian", o, "mu")
    _real("gaussian", o, "sigma", lo=0.0)
    if not isinstance(o["same_values"], bool):
        raise ValueError(f"attack 'gaussian': same_values must be true or false, got {o['same_values']!r}")
    if o["space"] not in ("update", "model"):
        raise ValueError(f"attack 'gaussian': space must be one of ['model', 'update'], got {o['space']!r}")
    return o


#: attack -> its params parser (defaults filled in, every key and value checked; ValueError naming the key)
PARAM_PARSERS: dict[str, Callable[[dict[str, Any] | None], dict[str, Any]]] = {
    "alie": _parse_alie, "ipm": _parse_ipm, "sign_flip": _parse_none("sign_flip"), "gaussian": _parse_gaussian,
    "label_flip": _parse_none("label_flip"),
}


def parse_params(attack: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """The ``attack_params`` of one of this module's attacks with its defaults filled in; ``ValueError``
    (one line, naming the attack and the key) for an unknown key or a bad value."""
    if attack not in PARAM_PARSERS:
        raise ValueError(f"parse_params: {attack!r} is not one of {sorted(PARAM_PARSERS)}")
    return PARAM_PARSERS[attack](params)


# ------------------------------------------------------------------------------------ registered attacks
@register_attack("alie", targeted=False)
def alie_attack(ctx: AttackContext) -> Tensor:
    """A Little Is Enough (Baruch et al., NeurIPS 2019): every attacker sends ``mu - z sigma`` of the benign
    updates, ``z = Phi^{-1}((n - s)/n)``, ``s = floor(n/2 + 1) - f`` (n clients, f attackers); option ``z``."""
    o = parse_params("alie", ctx.params)
    z = o["z"] if o["z"] is not None else alie_z(ctx.n_clients, ctx.n_attackers)
    return alie(ctx.benign_updates, ctx.n_attackers, z)


@register_attack("ipm", targeted=False)
def ipm_attack(ctx: AttackContext) -> Tensor:
    """Inner product manipulation (Xie et al., UAI 2020): every attacker sends ``-epsilon * mean(benign)``;
    option ``epsilon`` (default 0.1; the paper's regimes 0.1 and 100)."""
    return ipm(ctx.benign_updates, ctx.n_attackers, parse_params("ipm", ctx.params)["epsilon"])


@register_attack("sign_flip", targeted=False)
def sign_flip_attack(ctx: AttackContext) -> Tensor:
    """Sign flipping (ByzFL's SignFlipping; Allen-Zhu et al., ICLR 2021): every attacker sends
    ``-mean(benign)``, IPM with epsilon = 1. No options."""
    parse_params("sign_flip", ctx.params)
    return ipm(ctx.benign_updates, ctx.n_attackers, 1.0)


@register_attack("gaussian", targeted=False)
def gaussian_attack(ctx: AttackContext) -> Tensor:
    """Gaussian attack (Blanchard et al., NeurIPS 2017; Fang et al., USENIX Security 2020): coordinates
    ``~ N(mu, sigma^2)`` from ``ctx.generator``; options ``mu`` (0), ``sigma`` (1), ``same_values`` (false: each
    attacker draws its own), ``space`` ("update": the update is drawn; "model": the local model, Fang et al.)."""
    o = parse_params("gaussian", ctx.params)
    theta = ctx.global_flat
    out = gaussian(ctx.n_attackers, theta.numel(), mu=o["mu"], sigma=o["sigma"], same_values=o["same_values"],
                   generator=ctx.generator, dtype=ctx.benign_updates.dtype, device=theta.device)
    if o["space"] == "model":
        out = out - theta.to(out.dtype).unsqueeze(0)
    return out


@register_attack("label_flip", targeted=False)
def label_flip_attack(ctx: AttackContext) -> Tensor:
    """Label flipping (Fang et al., USENIX Security 2020; ByzFL's LabelFlipping): each attacker trains
    honestly on its own shard with labels ``l -> C - 1 - l`` (the run's engine, local epochs, batch size,
    lr and precision; mini-batches from ``ctx.generator``). No options."""
    parse_params("label_flip", ctx.params)
    if len(ctx.attacker_data) != ctx.n_attackers:
        raise ValueError(f"label_flip: attacker_data has {len(ctx.attacker_data)} shards for "
                         f"{ctx.n_attackers} attackers")
    g = ctx.generator
    if g is None:  # deterministic without one (a fresh stream per round)
        g = torch.Generator().manual_seed(1_000_003 * (ctx.round + 1))
    # the attackers' arrays are built anew every round: CUDA graphs of this call are not kept for the next
    # one (graph_cache 0), so they do not push the benign clients' kept graphs out of the cache
    return label_flip_updates(ctx.model, ctx.global_flat, ctx.attacker_data, ctx.num_classes,
                              epochs=ctx.local_epochs, batch_size=ctx.batch_size, lr=ctx.lr,
                              options=ctx.engine.replace(graph_cache=0), generator=g, precision=ctx.precision)
