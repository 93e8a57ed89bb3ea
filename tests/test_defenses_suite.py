"""The defense suite through the registry (robustfl.aggregation.defenses): config names, the papers'
defaults, one clear error per bad ``defense_params`` key, pre-aggregators in front of any rule (``pre``),
state across rounds (``ServerContext.state``, ``client_ids``) and randomness from ``ServerContext.generator``."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from robustfl.aggregation import aggregators as A
from robustfl.aggregation import preaggregators as P
from robustfl.aggregation import suite as S
from robustfl.aggregation.defenses import (
    DEFENSES, NO_PRE, PARAM_PARSERS, STATEFUL, ServerContext, check_defense_params, parse_pre,
)

F64 = torch.float64
SUITE = ["geomed", "centered_clipping", "dnc", "signguard", "flame", "foolsgold", "norm_clipping", "weak_dp"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def ctx(n: int, f: int = 1, /, *, state=None, generator=None, client_ids=None, **params) -> ServerContext:
    return ServerContext(n_clients=n, f=f, params=dict(params), state={} if state is None else state,
                         generator=generator, client_ids=client_ids)


def rows(n: int, d: int = 40, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, d, generator=gen(seed), dtype=dtype)


def test_suite_is_registered_with_the_papers_defaults():
    assert set(SUITE) <= set(DEFENSES.names())
    assert STATEFUL == {"centered_clipping", "foolsgold"} and set(NO_PRE) == {"flare", "foolsgold"}
    assert PARAM_PARSERS["geomed"]({}) == {"nu": 1e-6, "iters": 3, "tol": 1e-6, "init": "mean"}
    assert PARAM_PARSERS["centered_clipping"]({}) == {"tau": 100.0, "iters": 1}
    assert PARAM_PARSERS["dnc"]({}) == {"b": 10000, "niters": 5, "c": 1.0}
    assert PARAM_PARSERS["signguard"]({}) == {"lower": 0.1, "upper": 3.0, "frac": 0.1, "quantile": 0.5}
    assert PARAM_PARSERS["flame"]({}) == {"lam": 0.001}
    assert PARAM_PARSERS["flame"]({"epsilon": 3705, "delta": 0.01}) == {"lam": S.flame_lambda(3705, 0.01)}
    assert PARAM_PARSERS["foolsgold"]({}) == {"kappa": 1.0, "aggregate": "mean"}
    assert PARAM_PARSERS["norm_clipping"]({}) == {"M": 3.0}
    assert PARAM_PARSERS["weak_dp"]({}) == {"M": 3.0, "sigma": 0.025}


@pytest.mark.parametrize("name", SUITE)
def test_registry_entry_is_the_pure_rule_with_the_cells_params(name):
    x = rows(10, seed=1)
    g = 7
    calls = {
        "geomed": (dict(nu=0.01, iters=4, tol=0.0), lambda: S.geomed(x, 0.01, 4, 0.0)),
        "centered_clipping": (dict(tau=0.5, iters=2), lambda: S.centered_clipping(x, 0.5, 2)),
        "dnc": (dict(b=10, niters=2, c=2.0), lambda: S.dnc(x, 1, 10, 2, 2.0, generator=gen(g))),
        "signguard": (dict(lower=0.2, upper=2.0, frac=0.5), lambda: S.signguard(x, 0.2, 2.0, 0.5, generator=gen(g))),
        "flame": (dict(lam=0.01), lambda: S.flame(x, 0.01, generator=gen(g))),
        "foolsgold": (dict(kappa=2.0, aggregate="sum"), lambda: S.foolsgold(x, None, 2.0, "sum")),
        "norm_clipping": (dict(M=1.5), lambda: S.norm_clipping(x, 1.5)),
        "weak_dp": (dict(M=1.5, sigma=0.1), lambda: S.norm_clipping(x, 1.5, 0.1, generator=gen(g))),
    }
    params, direct = calls[name]
    res = DEFENSES.get(name)(x, ctx(10, 1, generator=gen(g), **params))
    ref = direct()
    assert torch.equal(res.update, ref.update) and torch.equal(res.weights, ref.weights)


# ------------------------------------------------------------------------------------------ bad params
@pytest.mark.parametrize("name,params,msg", [
    ("geomed", {"T": 3},
     r"defense 'geomed': unknown params \['T'\]; allowed: \['f', 'init', 'iters', 'nu', 'pre', 'tol'\]"),
    ("geomed", {"nu": 0}, r"defense 'geomed': nu must be > 0, got 0"),
    ("geomed", {"iters": 2.5}, r"defense 'geomed': iters must be an int, got 2.5"),
    ("geomed", {"init": "median"}, r"defense 'geomed': init must be one of \['mean', 'zero'\]"),
    ("centered_clipping", {"tau": -1.0}, r"defense 'centered_clipping': tau must be > 0"),
    ("centered_clipping", {"tau": "big"}, r"defense 'centered_clipping': tau must be a finite number, got 'big'"),
    ("centered_clipping", {"L": 2}, r"defense 'centered_clipping': unknown params \['L'\]"),
    ("dnc", {"b": 0}, r"defense 'dnc': b must be an int >= 1, got 0"),
    ("dnc", {"niters": True}, r"defense 'dnc': niters must be an int, got True"),
    ("dnc", {"c": -0.5}, r"defense 'dnc': c must be >= 0"),
    ("signguard", {"lower": 1.0, "upper": 0.5}, r"defense 'signguard': upper must be >= lower"),
    ("signguard", {"frac": 0}, r"defense 'signguard': frac must be > 0"),
    ("signguard", {"clustering": "dbscan"}, r"defense 'signguard': unknown params \['clustering'\]"),
    ("flame", {"lam": -1}, r"defense 'flame': lam must be >= 0"),
    ("flame", {"lam": 0.1, "epsilon": 10.0, "delta": 0.1}, r"defense 'flame': give lam or epsilon and delta, not both"),
    ("flame", {"epsilon": 10.0}, r"defense 'flame': epsilon and delta go together"),
    ("flame", {"epsilon": 10.0, "delta": 2.0}, r"defense 'flame': delta must be < 1"),
    ("foolsgold", {"kappa": 0}, r"defense 'foolsgold': kappa must be > 0"),
    ("foolsgold", {"aggregate": "median"}, r"defense 'foolsgold': aggregate must be one of \['mean', 'sum'\]"),
    ("norm_clipping", {"sigma": 0.1},
     r"defense 'norm_clipping': unknown params \['sigma'\]; allowed: \['M', 'f', 'pre'\]"),
    ("norm_clipping", {"M": float("nan")}, r"defense 'norm_clipping': M must be a finite number"),
    ("weak_dp", {"sigma": -0.1}, r"defense 'weak_dp': sigma must be >= 0"),
])
def test_bad_params_are_one_clear_error_naming_the_key(name, params, msg):
    with pytest.raises(ValueError, match=msg):
        DEFENSES.get(name)(rows(8), ctx(8, 1, **params))
    with pytest.raises(ValueError, match=msg):  # and before any training, for the config layer
        check_defense_params(name, params, n_clients=8, f=1)


@pytest.mark.parametrize("pre,msg", [
    ("median", r"defense 'krum': pre: unknown pre-aggregator 'median'; known: bucketing, nnm"),
    ([{"s": 2}], r"defense 'krum': pre: each entry must be a pre-aggregator name or a mapping with 'name'"),
    ({"name": "bucketing", "size": 2},
     r"defense 'krum': pre: unknown params \['size'\] for 'bucketing'; allowed: \['s'\]"),
    ({"name": "bucketing", "s": 0}, r"defense 'krum': pre: bucketing s must be an int >= 1, got 0"),
    ({"name": "nnm", "f": -1}, r"defense 'krum': pre: nnm f must be an int >= 0, got -1"),
    (3, r"defense 'krum': pre: each entry must be"),
])
def test_bad_pre_is_one_clear_error(pre, msg):
    with pytest.raises(ValueError, match=msg):
        DEFENSES.get("krum")(rows(10), ctx(10, 1, pre=pre))
    with pytest.raises(ValueError, match=msg):
        check_defense_params("krum", {"pre": pre})


@pytest.mark.parametrize("name", sorted(NO_PRE))
def test_defenses_on_individual_clients_refuse_pre(name):
    with pytest.raises(ValueError, match=rf"defense '{name}': pre: {name} does not take pre-aggregators"):
        DEFENSES.get(name)(rows(6), ctx(6, 1, pre="bucketing"))


def test_check_defense_params_needs_n_for_n_dependent_limits():
    check_defense_params("dnc", {"c": 2.0}, n_clients=10, f=3)  # removes 6 of 10: fine
    with pytest.raises(ValueError, match=r"defense 'dnc': c=3 with f=4 removes floor\(c\*f\) = 12 of 10 updates"):
        check_defense_params("dnc", {"c": 3.0}, n_clients=10, f=4)
    with pytest.raises(ValueError, match=r"of 5 updates"):  # 10 clients in buckets of 2: the rule sees 5
        check_defense_params("dnc", {"pre": {"name": "bucketing", "s": 2}}, n_clients=10, f=5)
    with pytest.raises(ValueError, match=r"pre nnm needs f < n \(got n=4, f=4\)"):
        check_defense_params("median", {"pre": "nnm"}, n_clients=4, f=4)
    with pytest.raises(ValueError, match="unknown defense 'nope'"):
        check_defense_params("nope", {})
    assert check_defense_params("flare", {"variant": "code"}) is None  # not a suite defense: only pre is checked
    assert parse_pre(None, "median") == [] and parse_pre(["nnm", {"name": "bucketing", "s": 3}], "median") == [
        {"name": "nnm"}, {"name": "bucketing", "s": 3}]


# ---------------------------------------------------------------------------------------- pre-aggregators
def test_pre_nnm_then_fedavg_by_hand():
    """NNM (f = 1) of 1-D points 0, 1, 3, 10 -> 4/3, 4/3, 4/3, 14/3 (tests/test_suite_rules.py); their mean 13/6.
    Client weights mix.T @ (1/4, ...): 0 is in 3 neighbourhoods -> 3/12, 1 and 3 in all 4 -> 4/12, 10 in 1 -> 1/12."""
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0]], dtype=F64)
    r = DEFENSES.get("fedavg")(x, ctx(4, 1, pre="nnm"))
    assert r.update.item() == pytest.approx(13 / 6)
    assert torch.allclose(r.weights, torch.tensor([3 / 12, 4 / 12, 4 / 12, 1 / 12], dtype=F64))
    assert torch.allclose(r.weights @ x, r.update)
    assert r.info["pre"] == [{"name": "nnm"}]
    assert torch.allclose(r.info["inner_weights"], torch.full((4,), 0.25, dtype=F64))
    # f for NNM: the server's, or the pre spec's own
    r3 = DEFENSES.get("fedavg")(x, ctx(4, 1, pre={"name": "nnm", "f": 3}))
    assert torch.allclose(r3.update, x.mean(0))  # each point alone: NNM with n - f = 1 is the identity


def test_pre_bucketing_maps_the_selection_back_to_the_bucket_members():
    x = rows(10, seed=2)
    g = gen(11)
    r = DEFENSES.get("krum")(x, ctx(10, 0, generator=g, pre={"name": "bucketing", "s": 2}))
    _, mix = P.bucketing(x, 2, generator=gen(11))
    chosen = r.info["selected"][0]
    members = mix[chosen].nonzero().flatten().tolist()
    assert len(members) == 2 and torch.allclose(r.update, x[members].mean(0))
    assert r.weights.tolist() == [0.5 if i in members else 0.0 for i in range(10)]


def test_pre_chain_and_any_rule():
    """A list is applied in order (NNM, then bucketing of the mixed vectors); the total mix maps the weights back,
    so for rules whose aggregate is weights @ input, update = weights @ updates exactly."""
    x = rows(12, seed=3, dtype=F64)
    x[0] += 20.0
    pre = ["nnm", {"name": "bucketing", "s": 2}]
    for name in ["fedavg", "krum", "geomed", "centered_clipping", "dnc", "signguard", "norm_clipping", "fltrust"]:
        c = ctx(12, 1, generator=gen(5), pre=pre)
        c.server_update_fn = lambda: torch.ones(40, dtype=F64)
        r = DEFENSES.get(name)(x, c)
        assert r.info["mix"].shape == (6, 12) and r.info["inner_weights"].shape == (6,), name
        if name == "fltrust":  # FLTrust's weights are the trust shares of the rescaled vectors (aggregators.py)
            continue
        extra = r.info.get("centre_weight", 0.0) * 0.0
        assert torch.allclose(r.weights @ x + extra, r.update, atol=1e-9), name
        assert r.weights[0] < 0.2, name
    # coordinate-wise rules run too (their weights: the mix of the per-vector fractions)
    r = DEFENSES.get("median")(x, ctx(12, 1, generator=gen(5), pre=pre))
    assert torch.allclose(r.weights.sum(), r.info["inner_weights"].sum())


def test_pre_makes_a_rule_inadmissible_with_a_clear_error():
    # 10 clients in buckets of 2 leave Krum 5 vectors: with f = 2 it needs more than 2f + 2 = 6
    with pytest.raises(ValueError, match=r"defense 'krum' after pre \['bucketing'\] \(the rule sees 5 mixed vectors "
                                         r"of 10 clients\): Krum needs n > 2f \+ 2"):
        DEFENSES.get("krum")(rows(10), ctx(10, 2, pre="bucketing"))


def test_pre_absent_or_empty_leaves_every_defense_unchanged():
    x = rows(9, seed=4)
    for name in ["fedavg", "krum", "median", "trimmed_mean", "geomed", "norm_clipping"]:
        plain = DEFENSES.get(name)(x, ctx(9, 1))
        empty = DEFENSES.get(name)(x, ctx(9, 1, pre=[]))
        assert torch.equal(plain.update, empty.update) and torch.equal(plain.weights, empty.weights)


# ---------------------------------------------------------------------------------------- across rounds
def test_centered_clipping_centres_at_the_previous_aggregate():
    state: dict = {}
    cc = DEFENSES.get("centered_clipping")
    prev = None
    for rnd in range(3):
        x = rows(8, seed=rnd) + rnd
        r = cc(x, ctx(8, state=state, tau=0.7, iters=2))
        ref = S.centered_clipping(x, 0.7, 2, centre=prev)
        assert torch.equal(r.update, ref.update) and r.info["history_rounds"] == rnd
        assert r.info["centred_at_zero"] == (rnd == 0)
        prev = r.update
    assert torch.equal(state["centered_clipping"]["centre"], prev) and state["centered_clipping"]["rounds"] == 3
    # without the wiring (a fresh state each round) it is centred at 0 every round: documented degradation
    x = rows(8, seed=2) + 2
    assert torch.equal(cc(x, ctx(8, tau=0.7, iters=2)).update, S.centered_clipping(x, 0.7, 2).update)
    with pytest.raises(ValueError, match=r"kept centre has 40 entries, the updates d=30"):
        cc(rows(8, d=30), ctx(8, state=state))


def test_foolsgold_history_is_kept_per_client_id():
    """Round 1: six clients. Round 2: client 2 was excluded by the server (rows shift), client 9 is new.
    The history row of each client follows its id, not its row."""
    state: dict = {}
    fg = DEFENSES.get("foolsgold")
    x1 = rows(6, seed=1, dtype=F64)
    r1 = fg(x1, ctx(6, state=state, client_ids=[0, 1, 2, 3, 4, 5]))
    assert r1.info["history_rounds"] == 0 and r1.info["with_history"] == 0
    assert torch.equal(r1.update, S.foolsgold(x1).update)
    ids2 = [0, 1, 3, 4, 5, 9]
    x2 = rows(6, seed=2, dtype=F64)
    r2 = fg(x2, ctx(6, state=state, client_ids=ids2))
    hist = torch.stack([x1[0], x1[1], x1[3], x1[4], x1[5], torch.zeros(40, dtype=F64)])
    assert torch.equal(r2.update, S.foolsgold(x2, hist).update)
    assert r2.info["history_rounds"] == 1 and r2.info["with_history"] == 5
    st = state["foolsgold"]
    assert st["ids"] == [0, 1, 2, 3, 4, 5, 9]
    assert torch.allclose(st["history"][2], x1[2]) and torch.allclose(st["history"][3], x1[3] + x2[2])
    assert torch.allclose(st["history"][6], x2[5])
    with pytest.raises(ValueError, match=r"client_ids must name the n=6 rows once each"):
        fg(x2, ctx(6, state=state, client_ids=[0, 0, 1, 2, 3, 4]))


def test_foolsgold_catches_sybils_only_through_their_history():
    """Two sybils alternate between two directions in step (every round their updates are orthogonal to
    each other's previous ones but their running sums coincide); honest clients are independent. With the
    history the sybils' weights drop to 0; with a fresh state every round (no memory) they do not."""
    state: dict = {}
    fg = DEFENSES.get("foolsgold")
    a, b = torch.zeros(40, dtype=F64), torch.zeros(40, dtype=F64)
    a[0], b[1] = 1.0, 1.0
    for rnd in range(4):
        x = rows(8, seed=10 + rnd, dtype=F64)
        x[6] = a if rnd % 2 == 0 else b
        x[7] = b if rnd % 2 == 0 else a
        with_memory = fg(x, ctx(8, state=state))
        no_memory = fg(x, ctx(8))
    assert with_memory.weights[6:].tolist() == [0.0, 0.0] and bool((with_memory.weights[:6] > 0).all())
    assert bool((no_memory.weights[6:] > 0).all())


def test_stateful_defenses_share_the_state_dict_under_their_own_names():
    state: dict = {}
    x = rows(8)
    DEFENSES.get("centered_clipping")(x, ctx(8, state=state))
    DEFENSES.get("foolsgold")(x, ctx(8, state=state))
    DEFENSES.get("centered_clipping")(x, ctx(8, state=state, pre="bucketing", generator=gen(0)))  # pre: same state
    assert set(state) == {"centered_clipping", "foolsgold"} and state["centered_clipping"]["rounds"] == 2


# ------------------------------------------------------------------------------------------- randomness
@pytest.mark.parametrize("name", ["dnc", "signguard", "flame", "weak_dp"])
def test_random_draws_come_from_the_context_generator(name, caplog):
    x = rows(10, d=300, seed=5)
    f = DEFENSES.get(name)
    params = {"dnc": {"b": 20}, "signguard": {}, "flame": {"lam": 0.05}, "weak_dp": {}}[name]
    before = torch.get_rng_state()
    a = f(x, ctx(10, generator=gen(1), **params))
    b = f(x, ctx(10, generator=gen(1), **params))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.update, b.update)
    if name != "signguard":  # SignGuard's selection is often the same for other coordinates
        c = f(x, ctx(10, generator=gen(2), **params))
        assert not torch.equal(a.update, c.update)
    # one generator across rounds: the next round draws new numbers
    g = gen(1)
    first, second = f(x, ctx(10, generator=g, **params)), f(x, ctx(10, generator=g, **params))
    if name in ("flame", "weak_dp"):
        assert not torch.equal(first.update, second.update)
    # no generator: the fixed-seed fallback, with one warning per defense
    with caplog.at_level(logging.WARNING, logger="robustfl"):
        d1 = f(x, ctx(10, **params))
        d2 = f(x, ctx(10, **params))
    assert torch.equal(d1.update, d2.update)
    assert torch.equal(d1.update, f(x, ctx(10, generator=S.fallback_generator(), **params)).update)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gen_device", DEVICES)
def test_every_suite_defense_and_pre_runs_on_the_updates_device(device, gen_device):
    x = rows(12, d=5000, seed=6).to(device)
    x[0] *= 100
    for name in SUITE + ["krum", "median"]:
        for pre in (None, ["nnm", "bucketing"]):
            if pre and name in NO_PRE:
                continue
            params = {} if pre is None else {"pre": pre}
            r = DEFENSES.get(name)(x, ctx(12, 1, generator=gen(3, gen_device), state={}, **params))
            assert r.update.device == x.device and r.update.dtype == x.dtype, name
            assert r.weights.shape == (12,) and torch.isfinite(r.update).all(), name


def test_flame_through_the_registry_drops_the_minority_and_adds_noise():
    g = gen(4)
    d = 1000
    base, other = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    x = torch.stack([base + 0.3 * torch.randn(d, generator=g, dtype=F64) for _ in range(7)]
                    + [other + 0.3 * torch.randn(d, generator=g, dtype=F64) for _ in range(3)])
    r = DEFENSES.get("flame")(x, ctx(10, generator=gen(0), epsilon=3705.0, delta=0.01))
    assert set(r.info["admitted"]) <= set(range(7)) and r.weights[7:].abs().max() == 0
    lam = math.sqrt(2 * math.log(1.25 / 0.01)) / 3705.0
    assert r.info["noise_std"] == pytest.approx(lam * r.info["median_norm"])
    assert not torch.allclose(r.update, r.weights @ x)  # the noise is nobody's update
    assert (r.update - r.weights @ x).std().item() == pytest.approx(r.info["noise_std"], rel=0.15)


def test_aggregators_module_is_untouched_by_the_registry_wrapper():
    """The wrapper passes through: existing rules give the same result, bit for bit."""
    x = rows(9, seed=8)
    assert torch.equal(DEFENSES.get("median")(x, ctx(9)).update, A.median(x).update)
    assert torch.equal(DEFENSES.get("krum")(x, ctx(9, 2)).update, A.krum(x, 2).update)
