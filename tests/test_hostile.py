"""Hostile client updates at the server (README "Guarantees", docs/decisions/reliability.md).

Policy: an update matrix of the wrong shape or a non-float dtype is a ValueError; a client update holding
NaN/Inf is excluded by the server (robustfl.fl.screening.screen_updates) with a logged warning, and every rule raises
ValueError if it is handed one anyway; a finite update of huge norm (1e30) never makes an aggregate
non-finite, and the robust rules (Krum, median, trimmed mean, Bulyan, FLTrust) keep the aggregate at the
scale of the benign updates; FedAvg (and FLARE, whose softmax trust is never exactly 0) pass a scaled
copy of it on, finite. A non-finite aggregate or global model is an error and never becomes the global model.
"""
from __future__ import annotations

import logging
import math
import uuid

import pandas as pd
import pytest
import torch

from robustfl.data import datasets as data
from robustfl.fl import experiment
from robustfl.fl import simulate
from robustfl.attacks import ATTACKS, register_attack
from robustfl.config import RunConfig
from robustfl.aggregation.defenses import DEFENSES, ServerContext
from robustfl.fl.screening import screen_updates

N, D, M, O = 10, 256, 6, 4
# bound the norm of the aggregate. Not here, by design: centered_clipping (a 1e30 update moves the centre by
# tau / n = 10 with the default tau = 100), foolsgold (weights from cosine similarity, norms unbounded) and
# geomed (RFA's 3 smoothed Weiszfeld steps started at the mean do not reach the median from a 1e30 start)
ROBUST = {"krum", "median", "trimmed_mean", "bulyan", "fltrust", "dnc", "signguard", "flame", "norm_clipping",
          "weak_dp"}
KINDS = ["nan", "inf", "neg_inf", "huge", "wrong_length", "int_dtype"]


def benign(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.01 * torch.randn(N, D, generator=g)


def hostile(kind: str, rows: tuple[int, ...] = (3,)) -> torch.Tensor:
    u = benign()
    g = torch.Generator().manual_seed(1)
    for r in rows:
        if kind == "nan":
            u[r, 7] = float("nan")
        elif kind == "inf":
            u[r, 7] = float("inf")
        elif kind == "neg_inf":
            u[r] = float("-inf")
        elif kind == "huge":
            v = torch.randn(D, generator=g)
            u[r] = v / v.norm() * 1e30
    if kind == "wrong_length":
        u = torch.cat([u, torch.zeros(N, 1)], dim=1)
    elif kind == "int_dtype":
        u = (u * 1000).to(torch.int32)
    return u


# FLARE's PLRs: a fixed random projection of each client's update (the rule sees them through plr_fn,
# as from the server; the simulator's own PLR screen is exercised end to end below)
_P = torch.randn(D, M * O, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
_G0 = 0.01 * torch.randn(D, generator=torch.Generator().manual_seed(3))  # FLTrust's root-set update


def ctx_for(n: int, f: int = 1) -> ServerContext:
    return ServerContext(n_clients=n, f=f, params={},
                         plr_fn=lambda u: (u.to(torch.float64) @ _P).to(u.dtype).reshape(len(u), M, O),
                         server_update_fn=lambda: _G0.clone())


def server_aggregate(defense: str, updates: torch.Tensor, f: int = 1):
    """What the server does with one round's update matrix: screen, then aggregate the kept clients."""
    keep = screen_updates(updates, D)
    kept = keep.nonzero().flatten()
    res = DEFENSES.get(defense)(updates[kept], ctx_for(len(kept), f))
    return keep, res


def test_robust_rules_exist():
    """Every registered defense is fed every hostile update below; ROBUST names those whose aggregate must
    also stay at the benign scale (a new defense is checked for finiteness until it is added here)."""
    assert ROBUST <= set(DEFENSES.names())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("defense", DEFENSES.names())
def test_hostile_update_through_the_server(defense, kind, caplog):
    u = hostile(kind)
    if kind in ("wrong_length", "int_dtype"):
        with pytest.raises(ValueError, match="shape" if kind == "wrong_length" else "dtype"):
            server_aggregate(defense, u)
        return
    with caplog.at_level(logging.WARNING, logger="robustfl"):
        keep, res = server_aggregate(defense, u)
    assert torch.isfinite(res.update).all() and torch.isfinite(res.weights).all()
    assert res.update.shape == (D,)
    if kind in ("nan", "inf", "neg_inf"):
        assert keep.tolist() == [i != 3 for i in range(N)]
        assert "excluding client(s) [3]" in caplog.text
        assert res.update.norm() < 1.0  # only benign updates (norm ~0.16) were aggregated
    else:  # huge: finite, kept by the screen (it is finite), and bounded by the robust rules
        assert bool(keep.all())
        if defense in ROBUST:
            assert res.update.norm() < 1.0, float(res.update.norm())


@pytest.mark.parametrize("defense", DEFENSES.names())
def test_f_huge_updates_keep_the_aggregate_finite(defense):
    """Two 1e30-norm updates of 10 with f = 2 (Bulyan refuses f = 2 for n = 10 and runs with its largest,
    f = 1: finite, not bounded)."""
    u = hostile("huge", rows=(0, 5))
    if defense == "bulyan":
        with pytest.raises(ValueError, match="f=2 is inadmissible for n=10"):
            server_aggregate(defense, u, f=2)
    _, res = server_aggregate(defense, u, f=1 if defense == "bulyan" else 2)
    assert torch.isfinite(res.update).all() and torch.isfinite(res.weights).all()
    if defense in ROBUST - {"bulyan"}:  # Bulyan tolerates only f = 1 of n = 10
        assert res.update.norm() < 1.0


@pytest.mark.parametrize("kind", ["nan", "inf", "int_dtype"])
@pytest.mark.parametrize("defense", DEFENSES.names())
def test_rules_refuse_unscreened_input(defense, kind):
    """A rule handed a non-finite or integer update matrix directly raises ValueError, never filters silently."""
    with pytest.raises(ValueError, match="non-finite|dtype"):
        DEFENSES.get(defense)(hostile(kind), ctx_for(N))


@pytest.mark.parametrize("bad", ["vector", "3d", "empty"])
def test_screen_rejects_malformed_matrices(bad):
    u = {"vector": torch.zeros(D), "3d": torch.zeros(N, D, 1), "empty": torch.zeros(0, D)}[bad]
    if bad == "empty":
        assert screen_updates(u, D).numel() == 0
        return
    with pytest.raises(ValueError, match="shape"):
        screen_updates(u, D)


def test_rule_side_inputs_of_wrong_length():
    u = benign()
    with pytest.raises(ValueError, match="server_update"):
        DEFENSES.get("fltrust")(u, ServerContext(n_clients=N, f=1, server_update_fn=lambda: torch.zeros(D - 1)))
    with pytest.raises(ValueError, match="plrs"):
        DEFENSES.get("flare")(u, ServerContext(n_clients=N, f=1, plr_fn=lambda x: torch.zeros(N - 1, M, O)))


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Digits, a partition with 2 attackers, and temporary hostile attacks (removed afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hostile")
    d = data.prepare("digits", {}, tmp_path_factory.getbasetemp() / "digits")  # shared by the test modules
    tag = uuid.uuid4().hex[:8]
    names = {k: f"test_{k}_{tag}" for k in ("nan", "huge", "int", "short", "float64_overflow")}

    def shaped(ctx, fill):
        out = ctx.benign_updates[: ctx.n_attackers].clone()
        fill(out)
        return out

    register_attack(names["nan"], targeted=False)(
        lambda ctx: shaped(ctx, lambda u: u.__setitem__((slice(None), 0), float("nan"))))

    def huge(ctx):
        v = torch.randn(ctx.n_attackers, ctx.benign_updates.shape[1], generator=ctx.generator)
        return v / v.norm(dim=1, keepdim=True) * 1e30

    register_attack(names["huge"], targeted=False)(huge)
    register_attack(names["int"], targeted=False)(lambda ctx: torch.ones(ctx.n_attackers, ctx.benign_updates.shape[1],
                                                                           dtype=torch.int64))
    register_attack(names["short"], targeted=False)(lambda ctx: ctx.benign_updates[: ctx.n_attackers, :-1].clone())
    register_attack(names["float64_overflow"], targeted=False)(  # finite in float64, inf once cast to float32
        lambda ctx: torch.full((ctx.n_attackers, ctx.benign_updates.shape[1]), 1e300, dtype=torch.float64))
    yield {"data": d, "root": root, "names": names}
    for n in names.values():
        ATTACKS._items.pop(n, None)
    torch.set_num_threads(threads)


def run(e2e, name: str, defense: str, attack: str, **kw):
    cfg = RunConfig(dataset="digits", rounds=3, local_epochs=1, batch_size=32, checkpoint_every=1,
                    engine={"kind": "sequential"}, device="cpu", n_attackers=2, defense=defense,
                    attack=e2e["names"][attack], **kw)
    part = e2e["root"] / "part.npz"
    if not part.exists():
        experiment.build_partition(e2e["data"], cfg, part)
    out = e2e["root"] / "runs" / name
    final = experiment.run_cell(cfg, e2e["data"], part, out)
    return final, pd.read_csv(out / "rounds.csv"), pd.read_csv(out / "clients.csv")


@pytest.mark.parametrize("defense", ["krum", "fedavg"])
def test_nan_attackers_are_excluded_and_counted(e2e, caplog, defense):
    with caplog.at_level(logging.WARNING, logger="robustfl"):
        final, rounds, clients = run(e2e, f"nan_{defense}", defense, "nan")
    assert (rounds["n_excluded"] == 2).all()
    assert "excluding client(s) [8, 9]: update holds NaN or Inf" in caplog.text
    mal = clients[clients["malicious"] == 1]
    assert (mal["weight"] == 0).all()
    assert math.isfinite(final["test_acc"]) and math.isfinite(final["test_loss"]) and final["test_acc"] > 0.15


def test_huge_attackers_under_flare_are_excluded_by_their_plrs(e2e, caplog):
    with caplog.at_level(logging.WARNING, logger="robustfl"):
        final, rounds, _ = run(e2e, "huge_flare", "flare", "huge")
    assert (rounds["n_excluded"] == 2).all()
    assert "their models give non-finite PLRs" in caplog.text
    assert math.isfinite(final["test_acc"]) and math.isfinite(final["test_loss"])


def test_huge_attackers_under_krum_are_not_selected(e2e):
    final, rounds, clients = run(e2e, "huge_krum", "krum", "huge")
    assert (rounds["n_excluded"] == 0).all()  # finite updates are not screened out ...
    assert (clients[clients["malicious"] == 1]["weight"] == 0).all()  # ... and never selected
    assert math.isfinite(final["test_acc"]) and math.isfinite(final["test_loss"])


def test_huge_attackers_under_fedavg_break_the_model_visibly_not_silently(e2e, caplog):
    """FedAvg is not robust: theta + 1e30/5 stays finite, but the model's loss is NaN and the benign clients'
    training from it gives NaN updates. The server says so and excludes those; nothing non-finite is
    aggregated and the run completes (FedAvg's collapse is a result, not a crash)."""
    with caplog.at_level(logging.WARNING, logger="robustfl"):
        final, rounds, _ = run(e2e, "huge_fedavg", "fedavg", "huge")
    assert "non-finite test loss" in caplog.text
    assert rounds["n_excluded"].iloc[0] == 0 and (rounds["n_excluded"].iloc[1:] == 8).all()
    assert "excluding client(s) [0, 1, 2, 3, 4, 5, 6, 7]: update holds NaN or Inf" in caplog.text
    assert math.isfinite(final["test_acc"])


def test_float64_attack_overflowing_float32_is_excluded(e2e):
    final, rounds, _ = run(e2e, "f64", "median", "float64_overflow")
    assert (rounds["n_excluded"] == 2).all() and math.isfinite(final["test_acc"])


@pytest.mark.parametrize("attack, match", [("int", "floating-point"), ("short", "shape")])
def test_malformed_attack_output_is_a_clear_error(e2e, attack, match):
    with pytest.raises(ValueError, match=match):
        run(e2e, f"bad_{attack}", "median", attack)


def test_non_finite_aggregate_never_reaches_the_global_model(e2e, monkeypatch):
    fedavg = DEFENSES.get("fedavg")

    def broken(updates, ctx):
        res = fedavg(updates, ctx)
        return type(res)(update=torch.full_like(res.update, float("nan")), weights=res.weights, info={})

    monkeypatch.setitem(DEFENSES._items, "fedavg", broken)
    before = {}
    orig_step = simulate.Simulation.step

    def spy(self, ben, train_s):
        before["theta"] = self.theta.clone()
        try:
            return orig_step(self, ben, train_s)
        finally:
            before["after"] = self.theta.clone()

    monkeypatch.setattr(simulate.Simulation, "step", spy)
    with pytest.raises(FloatingPointError, match="non-finite aggregate"):
        run(e2e, "nan_agg", "fedavg", "nan")
    assert torch.equal(before["theta"], before["after"]) and torch.isfinite(before["after"]).all()


def test_overflowing_global_model_is_an_error(e2e, monkeypatch):
    """A finite aggregate whose sum with theta overflows float32 is refused like a non-finite one: round 1
    takes theta to ~2e38 (finite), round 2's aggregate (the 1e30 attackers are kept) would overflow it."""
    def near_max(updates, ctx):
        res = DEFENSES.get("median")(updates, ctx)
        return type(res)(update=torch.full_like(res.update, 2e38), weights=res.weights, info={})

    monkeypatch.setitem(DEFENSES._items, "fedavg", near_max)
    with pytest.raises(FloatingPointError, match="round 2: .* makes the global model non-finite"):
        run(e2e, "overflow", "fedavg", "huge")
