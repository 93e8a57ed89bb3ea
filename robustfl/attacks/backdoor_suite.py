"""Three backdoor attacks of the federated-learning literature, on robustfl's white-box threat model
(Section 3.2: the attackers see the global model and the round's benign updates):

* ``model_replacement`` -- Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020,
  constrain-and-scale (Sec. 4). The attacker trains ``X`` from ``G^t`` on mini-batches in which ``c`` of
  ``B`` samples are backdoor inputs, minimising ``L_model = alpha L_class + (1 - alpha) L_ano`` with
  ``L_ano = ||X - anchor||_2`` (the global model, as the authors' code, or the mean benign model), and
  submits the scaled model of their Eq. (3): ``L~ = gamma (X - G^t) + G^t``, ``gamma = n / eta`` so that
  FedAvg's ``G^{t+1} = G^t + eta/n sum_i (L_i - G^t)`` (their Eq. 1) becomes ``X``; here the update
  ``gamma (X - G^t)``, optionally clipped to the norm bound ``S``.
* ``dba`` -- Xie et al., "DBA: Distributed Backdoor Attacks against Federated Learning", ICLR 2020: the
  global trojan trigger of the data stage is split into local triggers (:func:`local_triggers`), attacker
  ``i`` poisons ``c`` of every ``B`` samples of its own shard with local trigger ``i mod n_parts`` and the
  target label (Sec. 2.2: ``w_i* = argmax sum_j P[G(R(x_j, phi_i*)) = tau] + P[G(x_j) = y_j]``); ASR is
  measured, as for every targeted attack, on the data stage's inputs stamped with the full trigger.
* ``neurotoxin`` -- Zhang et al., "Neurotoxin: Durable Backdoors in Federated Learning", ICML 2022,
  Algorithm 1: the coordinates with the top-k% magnitudes of the benign update are excluded
  (:func:`neurotoxin_mask`), and after every backward pass the attacker's gradient is projected onto the
  others (``g <- g * mask``) before its optimiser step, so the update never touches them.

All three train with Adam on the rows of :class:`robustfl.engine.ModelRows` (:func:`poisoned_training`):
one attacker at a time, or all at once on the stacked layout the run's engine trains with. Choices the
papers leave open: docs/decisions/attacks-backdoor-suite.md.

Options (``attack_params``), defaults in brackets. All: ``poison_fraction`` [20/64], ``epochs``, ``lr``,
``batch_size`` [the run's]. ``model_replacement``: ``alpha`` [1.0], ``anomaly`` [global | benign_mean],
``gamma`` ["n/eta" = n / (eta k), or a number], ``eta`` [1.0], ``bound`` [null]. ``dba``: ``n_parts`` [4],
``scale`` [1.0]; needs ``backdoor: trojan``. ``neurotoxin``: ``topk`` [0.05], ``mask_from``
[benign_mean | own].
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from robustfl.attacks import register_attack
from robustfl.attacks.backdoor import (
    attacker_generators,
    batch_schedule,
    check_context,
    crafting_layout,
    distance_rows,
    mean_benign_delta,
    row_groups,
)
from robustfl.attacks.base import AttackContext
from robustfl.data.serversets import split_trigger, trigger_mask
from robustfl.engine import EngineOptions, ModelRows, masked_ce, model_forward, prepare_inputs

#: Bagdasaryan et al.'s poisoning ratio: 20 backdoor inputs in every mini-batch of 64
POISON_FRACTION = 20 / 64

#: options every attack of this module takes (None: the run's own value, ctx.lr / ctx.batch_size /
#: ctx.local_epochs)
COMMON: dict[str, Any] = {"poison_fraction": POISON_FRACTION, "epochs": None, "lr": None, "batch_size": None}
MODEL_REPLACEMENT: dict[str, Any] = {"alpha": 1.0, "anomaly": "global", "gamma": "n/eta", "eta": 1.0,
                                     "bound": None}
DBA: dict[str, Any] = {"n_parts": 4, "scale": 1.0}
NEUROTOXIN: dict[str, Any] = {"topk": 0.05, "mask_from": "benign_mean"}


# --------------------------------------------------------------------------------------------- options
def _bad(attack: str, key: str, want: str, got: Any) -> ValueError:
    return ValueError(f"{attack}: option {key!r} must be {want}, got {got!r}")


def _number(opts: Mapping[str, Any], attack: str, key: str, low: float, high: float = math.inf, *,
            low_open: bool = False) -> float:
    v = opts[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= high
    ok = ok and (v > low if low_open else v >= low)
    if not ok:
        lo = f"({low}" if low_open else f"[{low}"
        raise _bad(attack, key, f"a number in {lo}, {high}]", v)
    return float(v)


def resolve_params(ctx: AttackContext, attack: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``ctx.params`` over :data:`COMMON` and the attack's ``defaults``; unknown names and bad values of the
    common options raise one ``ValueError`` naming the attack and the option."""
    known = {**COMMON, **defaults}
    unknown = sorted(set(ctx.params) - set(known))
    if unknown:
        raise ValueError(f"{attack}: unknown option(s) {unknown}; known: {sorted(known)}")
    opts = {**known, **ctx.params}
    for key, run_value in (("lr", ctx.lr), ("epochs", ctx.local_epochs), ("batch_size", ctx.batch_size)):
        if opts[key] is None:
            opts[key] = run_value
    opts["poison_fraction"] = _number(opts, attack, "poison_fraction", 0.0, 1.0)
    opts["lr"] = _number(opts, attack, "lr", 0.0, low_open=True)
    opts["epochs"] = _number(opts, attack, "epochs", 0.0, low_open=True)
    b = opts["batch_size"]
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise _bad(attack, "batch_size", "an integer >= 1", b)
    return opts


def poisoned_per_batch(fraction: float, batch_size: int) -> int:
    """``c = round(fraction * B)`` poisoned samples in a mini-batch of ``B``; at least one where
    ``fraction > 0`` (Bagdasaryan et al.: 20 of 64)."""
    c = int(round(fraction * batch_size))
    return max(c, 1) if fraction > 0 else 0


# --------------------------------------------------------------------------------------------- the core
def poisoned_training(
    model: nn.Module, theta_flat: torch.Tensor, owns: Sequence[tuple[torch.Tensor, torch.Tensor]],
    pools: Sequence[torch.Tensor], target: int, *, generators: Sequence[torch.Generator], n_poison: int,
    epochs: float, lr: float, batch_size: int, alpha: float = 1.0, anchors: torch.Tensor | None = None,
    grad_mask: torch.Tensor | None = None, in_place: bool = False, layout: str | None = None,
    engine: EngineOptions | None = None, device: torch.device | str | None = None,
) -> torch.Tensor:
    """Local training of ``k = len(owns)`` attackers on poisoned mini-batches; their updates ``w_i - theta``
    ``(k, d)``.

    Attacker i draws its mini-batches of ``batch_size`` from its shard ``owns[i]`` as a benign client does
    (a fresh permutation per epoch from ``generators[i]``, ``round(epochs * ceil(N_i / B))`` Adam steps);
    in each batch the first ``c = n_poison`` samples are replaced by poisoned ones labelled ``target``:
    ``pools[i][j]`` for the batch's own sample j (``in_place``, DBA: ``pools[i]`` is the shard stamped with
    the attacker's trigger), else ``c`` inputs drawn uniformly with replacement from the pool (the backdoor
    set). The loss of a batch is ``alpha CE + (1 - alpha) ||w - anchors[i]||_2`` (``anchors``: absolute
    weights, ``(d,)`` or ``(k, d)``; theta where None); with ``grad_mask`` (0/1, ``(d,)`` or ``(k, d)``) the
    gradient is multiplied by it before every Adam step, so coordinates where it is 0 stay at theta exactly
    (Adam's moments stay 0 there).

    ``layout``: one attacker at a time (None) or all at once on a stacked layout (the dropout masks then
    come from one stream seeded by the first attacker's generator); on CUDA the step is captured as a CUDA
    graph (``engine``'s ``attack_cuda_graph``). Deterministic for given generator states.
    """
    k = len(owns)
    if len(pools) != k or len(generators) != k:
        raise ValueError(f"{k} shards, {len(pools)} poison pools and {len(generators)} generators: need one each")
    if not 0 <= n_poison <= batch_size:
        raise ValueError(f"n_poison must be in 0..batch_size = {batch_size}, got {n_poison}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    device = torch.device(device) if device is not None else theta_flat.device
    theta = theta_flat.detach().to(device=device, dtype=torch.float32)
    d = theta.numel()
    if k == 0:
        return theta.new_zeros(0, d)
    anc = None if alpha == 1.0 else (theta if anchors is None else anchors.detach().to(theta)).expand(k, d)
    gm = None if grad_mask is None else grad_mask.detach().to(theta).expand(k, d)
    out = []
    for g in row_groups(k, layout):
        rows = ModelRows(model, len(g), device, layout, engine)
        out.append(_train_rows(rows, theta, [owns[i] for i in g], [pools[i] for i in g], int(target),
                               [generators[i] for i in g], None if anc is None else anc[g],
                               None if gm is None else gm[g], n_poison=n_poison, epochs=epochs, lr=lr,
                               batch_size=batch_size, alpha=alpha, in_place=in_place))
    return out[0] if len(out) == 1 else torch.cat(out)


def _poison_batches(batches: list[list[tuple[torch.Tensor, torch.Tensor]]], live: torch.Tensor,
                    sizes: Sequence[int], pool_sizes: Sequence[int], offsets: Sequence[int],
                    generators: Sequence[torch.Generator], n_poison: int, in_place: bool) -> list[tuple[torch.Tensor,
                                                                                                       torch.Tensor]]:
    """The schedule's batches with their first ``n_poison`` real samples replaced by pool entries (pool i
    lies right after shard i in the concatenation); pool draws from each row's generator, in step order."""
    out = []
    alive = live.bool().cpu()
    for t, ((idx, mask),) in enumerate(batches):
        idx = idx.clone()
        for i in range(idx.shape[0]):
            if n_poison == 0 or not alive[t, i]:
                continue
            c = min(n_poison, int(mask[i].sum()))  # the real samples are a prefix of the batch
            if in_place:
                idx[i, :c] += sizes[i]
            else:
                pick = torch.randint(pool_sizes[i], (c,), generator=generators[i])
                idx[i, :c] = (offsets[i] + sizes[i] + pick).to(idx.device)
        out.append((idx, mask))
    return out


def _train_rows(rows: ModelRows, theta: torch.Tensor, owns: Sequence[tuple[torch.Tensor, torch.Tensor]],
                pools: Sequence[torch.Tensor], target: int, generators: Sequence[torch.Generator],
                anchor: torch.Tensor | None, gmask: torch.Tensor | None, *, n_poison: int, epochs: float,
                lr: float, batch_size: int, alpha: float, in_place: bool) -> torch.Tensor:
    """:func:`poisoned_training`'s loop for the rows ``rows``."""
    k, device = rows.k, rows.device
    sizes = [len(y) for _, y in owns]
    pool_sizes = [len(p) for p in pools]
    if min(sizes) == 0:
        raise ValueError("the attacker's shard is empty")
    if in_place and pool_sizes != sizes:
        raise ValueError(f"in-place poisoning needs one poisoned copy per sample: pools {pool_sizes}, shards {sizes}")
    if n_poison > 0 and min(pool_sizes) == 0:
        raise ValueError("the poison pool is empty")
    xs, ys = [], []
    for (x, y), p in zip(owns, pools):
        xs += [prepare_inputs(x.to(device)), prepare_inputs(p.to(device))]
        ys += [y.to(device), torch.full((len(p),), target, dtype=torch.long, device=device)]
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    shape = x_all.shape[1:]
    spans = [n + p for n, p in zip(sizes, pool_sizes)]
    offsets = [0, *torch.tensor(spans).cumsum(0).tolist()[:-1]]
    steps = [max(1, round(epochs * math.ceil(n / batch_size))) for n in sizes]
    w = theta.expand(k, -1).clone()
    state = rows.adam_state(w)

    def step(idx: torch.Tensor, mask: torch.Tensor, live: torch.Tensor) -> None:
        def loss_fn(flat: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = rows.forward(params, x_all[idx.reshape(-1)].view(*idx.shape, *shape))[1]
            loss = masked_ce(logits, y_all[idx], mask)
            if anchor is not None:
                loss = alpha * loss + (1.0 - alpha) * distance_rows(flat - anchor, "norm")
            return loss.sum()
        g = rows.grad(w, loss_fn)
        if gmask is not None:
            g = g * gmask
        rows.adam(w, g, state, live, lr)

    use_graph = rows.use_graph(max(steps))
    with rows.training(generators):
        batches, live = batch_schedule(sizes, generators, steps, batch_size, 1, offsets, k > 1 or use_graph, device)
        plan = _poison_batches(batches, live, sizes, pool_sizes, offsets, generators, n_poison, in_place)
        if not use_graph:
            for t, (idx, mask) in enumerate(plan):
                step(idx, mask, live[t])
        else:  # the step as a CUDA graph over static inputs, loaded before each replay
            s_idx, s_mask, s_live = plan[0][0].clone(), plan[0][1].clone(), live[0].clone()
            graph = rows.capture(lambda: step(s_idx, s_mask, s_live), [w, *state])
            for t, (idx, mask) in enumerate(plan):
                s_idx.copy_(idx)
                s_mask.copy_(mask)
                s_live.copy_(live[t])
                graph.replay()
    return w - theta


# ----------------------------------------------------------------------------------- model replacement
def replacement_gamma(n_clients: int, n_attackers: int, eta: float = 1.0) -> float:
    """Bagdasaryan et al.'s Eq. (3) scale ``gamma = n / eta`` shared by ``k`` colluding attackers:
    ``n / (eta k)``, so that their k scaled updates together replace FedAvg's aggregate
    ``eta/n sum_i delta_i`` by the mean of their models' changes."""
    if n_clients < 1 or n_attackers < 1 or not eta > 0:
        raise ValueError(f"need n_clients >= 1, n_attackers >= 1, eta > 0; got {n_clients}, {n_attackers}, {eta}")
    return n_clients / (eta * n_attackers)


def scale_and_clip(deltas: torch.Tensor, gamma: float, bound: float | None = None) -> torch.Tensor:
    """The submitted updates ``gamma * delta`` (rows of ``(k, d)``); with a norm bound ``S`` every row longer
    than ``S`` is scaled down to norm ``S`` (Bagdasaryan et al. Sec. 4: an attacker facing a norm bound scales
    up to it)."""
    out = gamma * deltas
    if bound is not None:
        norms = torch.linalg.vector_norm(out, dim=-1, keepdim=True)
        out = out * torch.clamp(bound / norms.clamp_min(torch.finfo(out.dtype).tiny), max=1.0)
    return out


@register_attack("model_replacement", targeted=True)
def model_replacement(ctx: AttackContext) -> torch.Tensor:
    """Model replacement, constrain-and-scale (Bagdasaryan et al., "How To Backdoor Federated Learning",
    AISTATS 2020): train on mini-batches with ``c`` of ``B`` backdoor inputs minimising
    ``alpha L_class + (1 - alpha) L_ano``, then scale the update by ``gamma = n / eta`` (Eq. 3; shared by
    the colluding attackers), optionally clipped to the norm bound ``S``."""
    name = "model_replacement"
    check_context(ctx)
    opts = resolve_params(ctx, name, MODEL_REPLACEMENT)
    alpha = _number(opts, name, "alpha", 0.0, 1.0)
    eta = _number(opts, name, "eta", 0.0, low_open=True)
    if opts["anomaly"] not in ("global", "benign_mean"):
        raise _bad(name, "anomaly", "'global' or 'benign_mean'", opts["anomaly"])
    gamma = (replacement_gamma(ctx.n_clients, ctx.n_attackers, eta) if opts["gamma"] == "n/eta"
             else _number(opts, name, "gamma", 0.0, low_open=True))
    bound = None if opts["bound"] is None else _number(opts, name, "bound", 0.0, low_open=True)
    anchor = ctx.global_flat + (mean_benign_delta(ctx) if opts["anomaly"] == "benign_mean" else 0.0)
    k = ctx.n_attackers
    deltas = poisoned_training(
        ctx.model, ctx.global_flat, ctx.attacker_data, [ctx.backdoor_x] * k, int(ctx.backdoor_y[0]),
        generators=attacker_generators(ctx), n_poison=poisoned_per_batch(opts["poison_fraction"], opts["batch_size"]),
        epochs=opts["epochs"], lr=opts["lr"], batch_size=opts["batch_size"], alpha=alpha, anchors=anchor,
        layout=crafting_layout(ctx), engine=ctx.engine, device=ctx.device)
    return scale_and_clip(deltas, gamma, bound)


# ------------------------------------------------------------------------------------------------- DBA
def local_triggers(h: int, w: int, n_parts: int) -> list[torch.Tensor]:
    """DBA's local triggers for ``h x w`` images: the data stage's global trojan trigger
    (:func:`robustfl.data.serversets.trigger_mask`) split into ``n_parts`` disjoint parts that cover it
    (:func:`robustfl.data.serversets.split_trigger`), as bool ``(h, w)`` tensors."""
    return [torch.from_numpy(p) for p in split_trigger(trigger_mask(h, w), n_parts)]


def stamp(x: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """A copy of the float NCHW inputs ``x`` with the pixels of ``part`` (bool ``(H, W)``) set to 1.0 in
    every channel: the data stage's trigger value (255 of uint8, :func:`robustfl.data.serversets.stamp_trigger`)."""
    out = x.clone()
    out[..., part.to(x.device)] = 1.0
    return out


def require_trojan_set(ctx: AttackContext, attack: str) -> None:
    """The attack needs the trojan backdoor set (its inputs carry the full trigger): else one error."""
    bx = prepare_inputs(ctx.backdoor_x)
    full = torch.from_numpy(trigger_mask(bx.shape[-2], bx.shape[-1])).to(bx.device)
    if not bool((bx[..., full] == 1.0).all()):
        raise ValueError(f"{attack} needs the trojan backdoor set (config backdoor: trojan): the backdoor inputs "
                         "do not carry the trigger")


@register_attack("dba", targeted=True, backdoor="trojan")
def dba(ctx: AttackContext) -> torch.Tensor:
    """Distributed backdoor attack (Xie et al., "DBA: Distributed Backdoor Attacks against Federated
    Learning", ICLR 2020): the trojan trigger split into ``n_parts`` local triggers; attacker i poisons
    ``c`` of every ``B`` samples of its own shard with part ``i mod n_parts`` and the target label; ASR on
    the full trigger."""
    name = "dba"
    check_context(ctx)
    opts = resolve_params(ctx, name, DBA)
    scale = _number(opts, name, "scale", 0.0, low_open=True)
    require_trojan_set(ctx, name)
    h, w = prepare_inputs(ctx.backdoor_x).shape[-2:]
    n_parts = opts["n_parts"]
    n_pixels = int(trigger_mask(h, w).sum())
    if isinstance(n_parts, bool) or not isinstance(n_parts, int) or not 1 <= n_parts <= n_pixels:
        raise _bad(name, "n_parts", f"an integer in 1..{n_pixels} (the trigger's pixels)", n_parts)
    parts = local_triggers(h, w, n_parts)
    owns = [(prepare_inputs(x), y) for x, y in ctx.attacker_data]
    pools = [stamp(x, parts[i % n_parts]) for i, (x, _) in enumerate(owns)]
    deltas = poisoned_training(
        ctx.model, ctx.global_flat, owns, pools, int(ctx.backdoor_y[0]), generators=attacker_generators(ctx),
        n_poison=poisoned_per_batch(opts["poison_fraction"], opts["batch_size"]), epochs=opts["epochs"],
        lr=opts["lr"], batch_size=opts["batch_size"], in_place=True, layout=crafting_layout(ctx), engine=ctx.engine,
        device=ctx.device)
    return scale * deltas


# ------------------------------------------------------------------------------------------- Neurotoxin
def neurotoxin_mask(v: torch.Tensor, topk: float) -> torch.Tensor:
    """Neurotoxin's mask (Zhang et al. 2022, Algorithm 1) for the benign direction ``v`` (``(d,)`` or rows
    ``(k, d)``): 0 on the ``round(topk * d)`` coordinates of largest ``|v|`` (ties: the lower index first),
    1 elsewhere; the attacker's gradient is projected onto the 1s."""
    if not 0.0 <= topk < 1.0:
        raise ValueError(f"topk must be in [0, 1), got {topk}")
    d = v.shape[-1]
    n_drop = int(round(topk * d))
    mask = torch.ones_like(v, dtype=torch.float32)
    if n_drop:
        order = torch.argsort(v.abs(), dim=-1, descending=True, stable=True)
        mask.scatter_(-1, order[..., :n_drop], 0.0)
    return mask


def shard_gradient(model: nn.Module, theta_flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient ``(d,)`` of the mean cross-entropy of the shard ``(x, y)`` at ``theta`` (eval mode: no
    dropout), what a benign client's first step follows: the authors' code's estimate of the benign
    direction (their ``grad_mask_cv``)."""
    theta = theta_flat.detach().float()
    x, y = prepare_inputs(x.to(theta.device)), y.to(theta.device)
    rows = ModelRows(model, 1, theta.device)
    was = model.training
    model.eval()
    try:
        def loss_fn(flat: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = model_forward(model, {n: p[0] for n, p in params.items()}, x)[1]
            return torch.nn.functional.cross_entropy(logits.float(), y)
        return rows.grad(theta.unsqueeze(0), loss_fn)[0]
    finally:
        model.train(was)


@register_attack("neurotoxin", targeted=True)
def neurotoxin(ctx: AttackContext) -> torch.Tensor:
    """Neurotoxin (Zhang et al., "Neurotoxin: Durable Backdoors in Federated Learning", ICML 2022,
    Algorithm 1): train on mini-batches with ``c`` of ``B`` backdoor inputs, projecting the gradient after
    every backward pass onto the coordinates outside the top-``topk`` magnitudes of the benign update."""
    name = "neurotoxin"
    check_context(ctx)
    opts = resolve_params(ctx, name, NEUROTOXIN)
    topk = _number(opts, name, "topk", 0.0, 1.0)
    if topk >= 1.0:
        raise _bad(name, "topk", "a number in [0, 1) (the fraction of coordinates excluded)", topk)
    if opts["mask_from"] == "benign_mean":
        mask = neurotoxin_mask(mean_benign_delta(ctx), topk)
    elif opts["mask_from"] == "own":
        mask = torch.stack([neurotoxin_mask(shard_gradient(ctx.model, ctx.global_flat, x, y), topk)
                            for x, y in ctx.attacker_data])
    else:
        raise _bad(name, "mask_from", "'benign_mean' or 'own'", opts["mask_from"])
    k = ctx.n_attackers
    return poisoned_training(
        ctx.model, ctx.global_flat, ctx.attacker_data, [ctx.backdoor_x] * k, int(ctx.backdoor_y[0]),
        generators=attacker_generators(ctx), n_poison=poisoned_per_batch(opts["poison_fraction"], opts["batch_size"]),
        epochs=opts["epochs"], lr=opts["lr"], batch_size=opts["batch_size"], grad_mask=mask,
        layout=crafting_layout(ctx), engine=ctx.engine, device=ctx.device)
