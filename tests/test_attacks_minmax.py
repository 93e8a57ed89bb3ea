"""Min-Max, Min-Sum and the AGR-tailored attack (Shejwalkar & Houmansadr, NDSS 2021): hand-worked answers on
1-D and 2-D updates, the closed forms of the two constraints against the batched search, the paper's stealth
property, the tailored search against a brute-force grid and against gamma = 0 / the agnostic gamma, bad
input, and each attack end to end on digits."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from robustfl.aggregation import aggregators as agg
from robustfl.attacks import ATTACKS, is_targeted
from robustfl.attacks import minmax as mm
from robustfl.attacks.base import AttackContext
from robustfl.config import RunConfig
from robustfl.data import datasets as data
from robustfl.fl import experiment

TAU = 1e-7
F64 = torch.float64

# ------------------------------------------------------------------------------------------ directions


def test_directions_by_hand() -> None:
    b = torch.tensor([[0.0, 3.0], [2.0, -1.0], [4.0, 1.0]], dtype=F64)  # mean (2, 1)
    assert torch.allclose(mm.perturbation(b, "unit"), torch.tensor([-2.0, -1.0], dtype=F64) / math.sqrt(5))
    assert torch.equal(mm.perturbation(b, "sign"), torch.tensor([-1.0, -1.0], dtype=F64))
    assert torch.allclose(mm.perturbation(b, "std"), torch.tensor([2.0, 2.0], dtype=F64))  # unbiased std
    assert torch.equal(mm.perturbation(torch.zeros(3, 2), "unit"), torch.zeros(2, dtype=F64))  # mu = 0


# ------------------------------------------------------------------------------ hand-worked known answers
ONE_D = torch.tensor([[0.0], [2.0], [4.0]], dtype=F64)  # mean 2, max pairwise sq. distance 16


@pytest.mark.parametrize("direction, gamma, value", [("unit", 2.0, 0.0), ("sign", 2.0, 0.0), ("std", 1.0, 4.0)])
def test_minmax_1d(direction: str, gamma: float, value: float) -> None:
    """unit / sign: p = -1, delta_m = 2 - g, farthest benign 4: (2 + g)^2 <= 16 -> g = 2, delta_m = 0.
    std: p = +2 (std of 0, 2, 4), delta_m = 2 + 2g, farthest benign 0: (2 + 2g)^2 <= 16 -> g = 1, delta_m = 4."""
    r = mm.minmax_attack(ONE_D, 3, direction=direction, tau=TAU)
    assert r.gamma.item() == pytest.approx(gamma, abs=TAU)
    assert r.gamma.item() <= gamma
    assert r.updates.shape == (3, 1) and torch.allclose(r.updates, torch.full((3, 1), value, dtype=F64), atol=1e-6)


@pytest.mark.parametrize("direction, gamma_max", [("unit", 2.0), ("sign", 2.0), ("std", 1.0)])
def test_minsum_1d(direction: str, gamma_max: float) -> None:
    """sum_i (delta_m - b_i)^2 = 3 t^2 + 8 with t = g p. Benign sums: 20, 8, 20. bound min: 3t^2 + 8 <= 8 ->
    g = 0 (the mean, as good as the middle update); bound max: 3t^2 + 8 <= 20 -> |t| = 2."""
    r = mm.minsum_attack(ONE_D, 2, direction=direction, tau=TAU)
    assert r.gamma.item() == pytest.approx(0.0, abs=TAU)
    assert torch.allclose(r.updates, torch.full((2, 1), 2.0, dtype=F64))
    r = mm.minsum_attack(ONE_D, 2, direction=direction, tau=TAU, bound="max")
    assert r.gamma.item() == pytest.approx(gamma_max, abs=TAU) and r.gamma.item() <= gamma_max


SQUARE = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]], dtype=F64)  # mean (1, 1), diagonal^2 = 8


@pytest.mark.parametrize("direction, gamma", [("unit", math.sqrt(2)), ("sign", 1.0), ("std", math.sqrt(3) / 2)])
def test_square_2d(direction: str, gamma: float) -> None:
    """The corners of a square: every constraint is met with equality at a corner. Min-Max: delta_m = (1, 1) + t
    with t along (-1, -1) (unit, sign) or (1, 1) (std = 2/sqrt(3) per coordinate); the farthest corner gives
    2 (1 + |t_1|)^2 <= 8 -> |t_1| = 1. Min-Sum (bound min): every benign sum is 16, so 4 ||t||^2 + 8 <= 16 ->
    ||t||^2 = 2 -> the same |t_1| = 1. Hence gamma = 1 / |p_1|."""
    for fn in (mm.minmax_attack, mm.minsum_attack):
        r = fn(SQUARE, 1, direction=direction, tau=TAU)
        assert r.gamma.item() == pytest.approx(gamma, abs=TAU)
        corner = torch.tensor([0.0, 0.0] if direction != "std" else [2.0, 2.0], dtype=F64)
        assert torch.allclose(r.updates[0], corner, atol=1e-6)


# ----------------------------------------------------------------------------- closed forms on random data
def _closed_forms(b: torch.Tensor, p: torch.Tensor) -> tuple[float, float, float]:
    """Min-Max: the smallest over i of the positive root of a g^2 + 2 b_i g + c_i = T. Min-Sum: since
    sum_i (mu - x_i) = 0, n a g^2 + sum c = min_k (n c_k + sum c) -> g = sqrt(min_k c_k / a) (max_k for bound max)."""
    mu = b.mean(0)
    diff = mu - b
    c, bb, a = (diff ** 2).sum(1), diff @ p, p @ p
    t = torch.cdist(b, b).pow(2).max()
    g_mm = ((-bb + torch.sqrt(bb ** 2 - a * (c - t))) / a).min().item()
    return g_mm, math.sqrt(c.min().item() / a.item()), math.sqrt(c.max().item() / a.item())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("direction", mm.DIRECTIONS)
def test_search_matches_the_closed_form_and_keeps_the_papers_bound(seed: int, direction: str) -> None:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(9, 40, generator=g, dtype=F64) * 0.3 + torch.randn(40, generator=g, dtype=F64)
    p = mm.perturbation(b, direction)
    g_mm, g_min, g_max = _closed_forms(b, p)
    pair = torch.cdist(b, b).pow(2)
    for batch in (1, 5, 16):
        r = mm.minmax_attack(b, 2, direction=direction, tau=TAU, batch=batch)
        assert g_mm - TAU <= r.gamma.item() <= g_mm + 1e-12
        # the paper's property: its largest distance to a benign update is within the benign maximum
        d_mal = torch.cdist(r.updates[:1], b).pow(2)
        assert d_mal.max() <= pair.max() * (1 + 1e-12)
        # and it is tight: gamma + 2 tau breaks it
        worse = r.updates[0] + 2 * TAU * p
        assert torch.cdist(worse[None], b).pow(2).max() > pair.max()
        s = mm.minsum_attack(b, 2, direction=direction, tau=TAU, batch=batch)
        assert g_min - TAU <= s.gamma.item() <= g_min + 1e-12
        assert torch.cdist(s.updates[:1], b).pow(2).sum() <= pair.sum(1).min() * (1 + 1e-12)
        s = mm.minsum_attack(b, 2, direction=direction, tau=TAU, batch=batch, bound="max")
        assert g_max - TAU <= s.gamma.item() <= g_max + 1e-12


def test_gamma_stops_at_twice_gamma_init() -> None:
    """Algorithm 1 from gamma_init reaches at most 2 gamma_init; so does the batched search."""
    r = mm.minmax_attack(SQUARE, 1, direction="unit", gamma_init=0.25, tau=TAU)
    assert r.gamma.item() == pytest.approx(0.5, abs=TAU)


def test_the_search_evaluates_candidates_in_batches() -> None:
    """One oracle call per step with ``batch`` candidates; ceil(log(hi/tau)/log(batch+1)) steps."""
    calls: list[tuple[int, ...]] = []

    def oracle(g: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(g.shape))
        return g <= 0.3

    gamma = mm.largest_feasible(oracle, 20.0, 1e-5, 16)
    assert calls == [(16,)] * math.ceil(math.log(20.0 / 1e-5) / math.log(17))
    assert 0.3 - 1e-5 <= gamma.item() <= 0.3
    seen: list[int] = []
    g, v = mm.max_damage(lambda x: (seen.append(x.numel()), -(x - 0.7).abs())[1], 10.0, 1e-5, 8)
    assert set(seen) == {8} and g.item() == pytest.approx(0.7, abs=1e-5) and v.item() <= 0
    # a NaN damage (a rule breaking down for a huge update) never wins
    g, v = mm.max_damage(lambda x: torch.where(x > 1.5, torch.nan, x), 10.0, 1e-5, 8)
    assert 1.5 - 1e-5 <= g.item() <= 1.5 and v.item() == g.item()


def test_all_attackers_send_the_same_update_in_the_benign_dtype() -> None:
    b = torch.randn(6, 11)
    for r in (mm.minmax_attack(b, 3), mm.minsum_attack(b, 3),
              mm.agr_tailored_attack(b, 3, lambda x: agg.median(x).update, coordinatewise=True)):
        assert r.updates.dtype == torch.float32 and r.updates.shape == (3, 11)
        assert torch.equal(r.updates, r.updates[:1].expand(3, -1))
    assert mm.minmax_attack(b, 0).updates.shape == (0, 11)


# -------------------------------------------------------------------------------------------- tailored
def test_tailored_median_by_hand() -> None:
    """Benign 0, 2, 4 and two attackers at 2 - g (unit direction): the median of the five values is 2 - g for
    g <= 2 and 0 beyond, so the damage |2 - median| is at most 2, first reached at g = 2."""
    r = mm.agr_tailored_attack(ONE_D, 2, lambda x: agg.median(x).update, coordinatewise=True, direction="unit",
                               tau=TAU)
    assert r.damage.item() == pytest.approx(2.0)
    assert 2.0 - 1e-6 <= r.gamma.item() <= 2.5
    assert agg.median(torch.cat([ONE_D, r.updates])).update.item() == pytest.approx(0.0)


def _rules(n_mal: int) -> dict[str, tuple[object, bool]]:
    return {"krum": (lambda x: agg.krum(x, n_mal).update, False),
            "median": (lambda x: agg.median(x).update, True),
            "trimmed_mean": (lambda x: agg.trimmed_mean(x, n_mal).update, True)}


def _damage(b: torch.Tensor, mal: torch.Tensor, rule) -> float:
    return (rule(torch.cat([b, mal])).to(F64) - b.to(F64).mean(0)).norm().item()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("direction", mm.DIRECTIONS)
def test_tailored_beats_gamma_zero_the_agnostic_gamma_and_a_grid(seed: int, direction: str) -> None:
    """Against Krum, the median and the trimmed mean: the tailored update moves the rule's aggregate at least as
    far from the benign mean as gamma = 0, as the Min-Max and Min-Sum updates, and as the best of a grid of
    201 gammas over [0, 2 gamma_init] (up to the search's tolerance)."""
    gen = torch.Generator().manual_seed(seed)
    n_mal = 3
    b = torch.randn(8, 30, generator=gen, dtype=F64) * 0.5 + 0.2
    p = mm.perturbation(b, direction)
    mu = b.mean(0)
    grid = torch.linspace(0, 2 * mm.GAMMA_INIT, 201, dtype=F64)
    for name, (rule, coordinatewise) in _rules(n_mal).items():
        r = mm.agr_tailored_attack(b, n_mal, rule, coordinatewise=coordinatewise, direction=direction, tau=1e-6)
        got = _damage(b, r.updates, rule)
        assert got == pytest.approx(r.damage.item(), rel=1e-9, abs=1e-12)
        for other in (mu.expand(n_mal, -1), mm.minmax_attack(b, n_mal, direction=direction).updates,
                      mm.minsum_attack(b, n_mal, direction=direction).updates):
            assert got >= _damage(b, other, rule) - 1e-12, name
        brute = max(_damage(b, (mu + g * p).expand(n_mal, -1), rule) for g in grid.tolist())
        assert got >= brute - 2e-6 * p.norm().item() - 1e-9, (name, got, brute)


def test_tailored_bulyan_is_a_local_search() -> None:
    """Bulyan's damage is a saw-tooth in gamma (its Krum stage swaps members): the search, like Algorithm 1,
    finds a local maximum. Still more than gamma = 0's damage, and here at least 90% of a 201-point grid's best."""
    b = torch.randn(8, 30, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.5 + 0.2
    rule = lambda x: agg.bulyan(x, 1).update  # noqa: E731
    p, mu = mm.perturbation(b, "std"), b.mean(0)
    r = mm.agr_tailored_attack(b, 3, rule, tau=1e-6)
    got = _damage(b, r.updates, rule)
    brute = max(_damage(b, (mu + g * p).expand(3, -1), rule) for g in torch.linspace(0, 20, 201).tolist())
    assert got > _damage(b, mu.expand(3, -1), rule) and got >= 0.9 * brute


def test_side_by_side_batches_equal_one_call_per_candidate() -> None:
    b = torch.randn(7, 25, generator=torch.Generator().manual_seed(3))
    rule = lambda x: agg.trimmed_mean(x, 2).update  # noqa: E731
    one = mm.agr_tailored_attack(b, 2, rule, coordinatewise=False)
    many = mm.agr_tailored_attack(b, 2, rule, coordinatewise=True)
    assert torch.equal(one.gamma, many.gamma) and torch.equal(one.updates, many.updates)


def test_tailored_runs_the_registered_defense_as_the_server() -> None:
    b = torch.randn(7, 20, generator=torch.Generator().manual_seed(4))
    ctx = AttackContext(model=torch.nn.Linear(1, 1), global_flat=torch.zeros(20), benign_updates=b, n_attackers=3,
                        n_clients=10, round=1, defense="krum", f=3, defense_params={},
                        generator=torch.Generator().manual_seed(0))
    out = ATTACKS.get("agr_tailored")(ctx)
    ref = mm.agr_tailored_attack(b, 3, lambda x: agg.krum(x, 3).update)
    assert torch.equal(out, ref.updates)
    # the server's f from defense_params, and a randomised rule drawing the same numbers for every candidate
    ctx.defense, ctx.defense_params = "dnc", {"f": 2, "b": 5}
    a1 = ATTACKS.get("agr_tailored")(ctx)
    ctx.generator = torch.Generator().manual_seed(0)
    assert torch.equal(a1, ATTACKS.get("agr_tailored")(ctx))



def test_tailored_stands_in_for_the_servers_data() -> None:
    """FLTrust: the benign mean stands in for the root-set update; FLARE: the PLRs of every model on the first
    attacker's first 10 inputs stand in for those on the auxiliary set."""
    from robustfl.aggregation.defenses import DEFENSES, ServerContext
    from robustfl.engine import model_plrs
    from robustfl.models import build_model

    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1)
    theta = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    gen = torch.Generator().manual_seed(6)
    b = 1e-2 * torch.randn(6, theta.numel(), generator=gen)
    x = torch.rand(30, 1, 8, 8, generator=gen)
    ctx = AttackContext(model=model, global_flat=theta, benign_updates=b, n_attackers=2, n_clients=8, round=1,
                        attacker_data=[(x, torch.zeros(30, dtype=torch.int64))], defense="fltrust",
                        params={"batch": 6, "tau": 0.1}, generator=torch.Generator().manual_seed(0))
    fl = ATTACKS.get("agr_tailored")(ctx)
    rule = lambda u: DEFENSES.get("fltrust")(u, ServerContext(8, 2, server_update_fn=lambda: b.mean(0))).update  # noqa
    assert torch.equal(fl, mm.agr_tailored_attack(b, 2, rule, batch=6, tau=0.1).updates)
    ctx.defense = "flare"
    got = ATTACKS.get("agr_tailored")(ctx)
    plrs = lambda u: model_plrs(model, theta + u, x[:10])  # noqa: E731
    rule = lambda u: DEFENSES.get("flare")(u, ServerContext(8, 2, plr_fn=plrs)).update  # noqa: E731
    ref = mm.agr_tailored_attack(b, 2, rule, batch=6, tau=0.1)
    assert torch.allclose(got, ref.updates) and torch.isfinite(got).all()
    ctx.attacker_data = []
    with pytest.raises(ValueError, match="stands in for the server's auxiliary set"):
        ATTACKS.get("agr_tailored")(ctx)


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, match", [
    ({"direction": "up"}, "direction must be one of"),
    ({"gamma_init": 0.0}, "gamma_init must be a finite number > 0"),
    ({"gamma_init": float("inf")}, "gamma_init must be a finite number > 0"),
    ({"tau": float("nan")}, "tau must be a finite number > 0"),
    ({"batch": 0}, "batch must be an int >= 1"),
    ({"batch": 2.0}, "batch must be an int >= 1"),
])
def test_bad_options(kw: dict, match: str) -> None:
    b = torch.randn(5, 4)
    for fn in (mm.minmax_attack, mm.minsum_attack):
        with pytest.raises(ValueError, match=match):
            fn(b, 2, **kw)


def test_bad_input() -> None:
    b = torch.randn(5, 4)
    bad = b.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite .* \[2\]"):
        mm.minmax_attack(bad, 2)
    with pytest.raises(ValueError, match="2-D"):
        mm.minsum_attack(b[0], 2)
    with pytest.raises(ValueError, match="'std' needs at least 2 benign"):
        mm.minmax_attack(b[:1], 2)
    with pytest.raises(ValueError, match="n_mal must be an int >= 0"):
        mm.minmax_attack(b, -1)
    with pytest.raises(ValueError, match="bound must be 'min' or 'max'"):
        mm.minsum_attack(b, 2, bound="mean")
    with pytest.raises(ValueError, match="batch must be an int >= 4"):
        mm.agr_tailored_attack(b, 2, lambda x: x.mean(0), batch=3)
    ctx = AttackContext(model=torch.nn.Linear(1, 1), global_flat=torch.zeros(4), benign_updates=b, n_attackers=2,
                        n_clients=7, round=1, params={"gamma": 1.0})
    for name in ("minmax", "minsum", "agr_tailored"):
        with pytest.raises(ValueError, match=f"attack '{name}': unknown params \\['gamma'\\]"):
            ATTACKS.get(name)(ctx)
    ctx.params = {"direction": "down"}
    with pytest.raises(ValueError, match="attack 'minmax': direction must be one of"):
        ATTACKS.get("minmax")(ctx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    b = torch.randn(9, 300, generator=torch.Generator().manual_seed(5))
    for fn in (mm.minmax_attack, mm.minsum_attack):
        cpu, gpu = fn(b, 3), fn(b.cuda(), 3)
        assert gpu.updates.is_cuda and gpu.gamma.is_cuda
        assert gpu.gamma.item() == pytest.approx(cpu.gamma.item(), abs=1e-5)
    for rule, cw in ((lambda x: agg.median(x).update, True), (lambda x: agg.krum(x, 3).update, False)):
        cpu, gpu = mm.agr_tailored_attack(b, 3, rule, coordinatewise=cw), \
            mm.agr_tailored_attack(b.cuda(), 3, rule, coordinatewise=cw)
        assert gpu.damage.item() == pytest.approx(cpu.damage.item(), rel=1e-4)


# -------------------------------------------------------------------------------------------- end to end
def test_registered_untargeted() -> None:
    for name in ("minmax", "minsum", "agr_tailored"):
        assert name in ATTACKS and not is_targeted(name)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return data.prepare("digits", {}, tmp_path_factory.mktemp("d") / "digits")


@pytest.mark.parametrize("attack, defense, params", [
    ("minmax", "median", {}), ("minsum", "krum", {"direction": "unit"}), ("minmax", "fedavg", {"direction": "sign"}),
    ("agr_tailored", "krum", {"batch": 6, "tau": 1e-3}), ("agr_tailored", "median", {}),
    ("agr_tailored", "trimmed_mean", {"batch": 8, "direction": "sign"}),
    ("agr_tailored", "flare", {"batch": 6, "tau": 0.1}),
])
def test_end_to_end_on_digits(digits: Path, tmp_path: Path, attack: str, defense: str, params: dict) -> None:
    cfg = RunConfig(dataset="digits", rounds=2, local_epochs=1, batch_size=32, engine={"kind": "sequential"},
                    attack=attack, attack_params=params, n_attackers=3, defense=defense, device="cpu")
    part = tmp_path / "p.npz"
    experiment.build_partition(digits, cfg, part)
    final = experiment.run_cell(cfg, digits, part, tmp_path / "run")
    assert math.isfinite(final["test_acc"]) and math.isfinite(final["test_loss"])
    rounds = pd.read_csv(tmp_path / "run" / "rounds.csv")
    assert len(rounds) == 2 and rounds["test_acc"].map(math.isfinite).all()
    clients = pd.read_csv(tmp_path / "run" / "clients.csv")
    mal = clients[clients["malicious"] == 1]
    assert len(mal) == 2 * 3 and mal.groupby("round")["update_norm"].nunique().eq(1).all()  # identical copies
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["attack"] == attack
