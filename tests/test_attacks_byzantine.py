"""The untargeted Byzantine attacks of the standard suite (robustfl.attacks.byzantine): ALIE, IPM, sign flipping,
the Gaussian attack, label flipping. Known answers worked by hand, cross-checks against ByzFL 0.0.11's
``ALittleIsEnough``, ``InnerProductManipulation``, ``SignFlipping``, ``Gaussian`` and ``LabelFlipping`` (with the
differences in definition stated and tested), one clear error per bad ``attack_params`` key, label flipping
through the engine (sequential, vectorised, stacked layout), and 2-round digits runs of every attack, alone
and packed."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from _byzfl import load_byzfl
from _digits import digits_tensors, seeded_digits_cnn

from robustfl.attacks import ATTACKS, AttackContext, is_targeted
from robustfl.attacks import byzantine as B
from robustfl.config import RunConfig
from robustfl.data import datasets as data
from robustfl.engine import EngineOptions, train_clients
from robustfl.engine.adam import ADAM_EPS
from robustfl.fl import experiment
from robustfl.models import build_model
from robustfl.params import load_flat_
from robustfl.reporting.tables import ATTACK_NAMES

F64 = torch.float64
SUITE = ["alie", "ipm", "sign_flip", "gaussian", "label_flip"]
BZA = load_byzfl("attacks.attacks")
BZC = load_byzfl("fed_framework.client")
needs_byzfl = pytest.mark.skipif(BZA is None or BZC is None, reason="byzfl is not installed")


def rows(n: int, d: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.05 * torch.randn(d, generator=g, dtype=dtype) + 0.1 * torch.randn(n, d, generator=g, dtype=dtype)


def ctx(benign: torch.Tensor, n_mal: int = 2, n_clients: int | None = None, params: dict | None = None,
        seed: int | None = 0, **kw) -> AttackContext:
    d = benign.shape[1]
    return AttackContext(model=torch.nn.Linear(1, 1), global_flat=kw.pop("theta", torch.zeros(d, dtype=benign.dtype)),
                         benign_updates=benign, n_attackers=n_mal, n_clients=n_clients or len(benign) + n_mal, round=1,
                         params=dict(params or {}),
                         generator=None if seed is None else torch.Generator().manual_seed(seed), **kw)


def test_the_suite_is_registered_untargeted_with_display_names():
    for name in SUITE:
        assert name in ATTACKS.names() and not is_targeted(name)
        assert name in ATTACK_NAMES
    assert B.parse_params("alie", {}) == {"z": None}
    assert B.parse_params("ipm", {}) == {"epsilon": 0.1}
    assert B.parse_params("sign_flip", {}) == {} and B.parse_params("label_flip", None) == {}
    assert B.parse_params("gaussian", {}) == {"mu": 0.0, "sigma": 1.0, "same_values": False, "space": "update"}


# ------------------------------------------------------------------------------------------ by hand
def test_alie_z_by_hand():
    # n = 10, f = 3: s = floor(6) - 3 = 3, Phi^{-1}(7/10) = 0.5244005 (normal table)
    assert B.alie_z(10, 3) == pytest.approx(0.5244005127, abs=1e-9)
    # n = 10, f = 1: s = 5, Phi^{-1}(1/2) = 0 -- with an even n and one attacker ALIE sends the benign mean
    assert B.alie_z(10, 1) == 0.0
    # n = 50, f = 24: s = 26 - 24 = 2, Phi^{-1}(48/50) = 1.7506861
    assert B.alie_z(50, 24) == pytest.approx(1.7506860713, abs=1e-9)
    # n = 5, f = 1: s = floor(3.5) - 1 = 2, Phi^{-1}(3/5) = 0.2533471
    assert B.alie_z(5, 1) == pytest.approx(0.2533471031, abs=1e-9)
    with pytest.raises(ValueError, match=r"1 <= s = floor\(n/2 \+ 1\) - f <= n - 1, got s = 0 \(n = 4, f = 3\)"):
        B.alie_z(4, 3)


def test_alie_by_hand():
    # benign [1, 2] and [3, 6]: mean [2, 4], sample std [sqrt 2, sqrt 8]; z = 1 -> [2 - 1.41421, 4 - 2.82843]
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=F64)
    want = torch.tensor([2 - math.sqrt(2), 4 - math.sqrt(8)], dtype=F64)
    got = B.alie(x, 3, 1.0)
    assert got.shape == (3, 2) and torch.allclose(got, want.expand(3, -1), rtol=0, atol=1e-15)
    assert torch.equal(B.alie(x, 1, 0.0), x.mean(0, keepdim=True))
    # the registered attack takes z from n and f: n = 5 clients, f = 1 -> z = 0.2533471
    got = ATTACKS.get("alie")(ctx(x, n_mal=1, n_clients=5))
    assert torch.allclose(got[0], torch.tensor([2 - 0.2533471031 * math.sqrt(2), 4 - 0.2533471031 * math.sqrt(8)],
                                               dtype=F64), atol=1e-9)
    assert torch.allclose(ATTACKS.get("alie")(ctx(x, n_mal=1, n_clients=5, params={"z": 1.0})), want)
    with pytest.raises(ValueError, match="at least 2 benign updates, got 1"):
        B.alie(x[:1], 1, 1.0)


def test_ipm_and_sign_flip_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])  # mean [4, 5, 6]
    assert torch.allclose(ATTACKS.get("ipm")(ctx(x, 2)), torch.tensor([[-0.4, -0.5, -0.6]] * 2))
    assert torch.allclose(ATTACKS.get("ipm")(ctx(x, 1, params={"epsilon": 100})), torch.tensor([[-400.0, -500, -600]]))
    assert torch.equal(ATTACKS.get("sign_flip")(ctx(x, 3)), torch.tensor([[-4.0, -5.0, -6.0]] * 3))
    assert ATTACKS.get("sign_flip")(ctx(x, 0)).shape == (0, 3)


def test_gaussian_by_hand_and_its_moments():
    x = torch.zeros(3, 4)
    theta = torch.tensor([1.0, -2.0, 0.5, 0.0])
    assert torch.equal(ATTACKS.get("gaussian")(ctx(x, 2, params={"mu": 3.0, "sigma": 0.0})), torch.full((2, 4), 3.0))
    # space "model": the crafted local model is N(mu, sigma^2), the update that model minus theta
    got = ATTACKS.get("gaussian")(ctx(x, 2, params={"mu": 3.0, "sigma": 0.0, "space": "model"}, theta=theta))
    assert torch.equal(got, (3.0 - theta).expand(2, -1))
    big = torch.zeros(2, 100_000)
    ind = ATTACKS.get("gaussian")(ctx(big, 3, params={"mu": -1.0, "sigma": 2.0}, seed=4))
    assert not torch.equal(ind[0], ind[1])  # each attacker draws its own
    for r in ind.double():  # 1e5 draws: the sample mean within 5 standard errors (0.032) of mu, the std near sigma
        assert abs(float(r.mean()) + 1.0) < 0.032 and abs(float(r.std()) - 2.0) < 0.03
    same = ATTACKS.get("gaussian")(ctx(big, 3, params={"same_values": True}, seed=4))
    assert torch.equal(same[0], same[2])
    # deterministic from ctx.generator; the global stream untouched
    c9, c9b, c10 = ctx(x, 2, seed=9), ctx(x, 2, seed=9), ctx(x, 2, seed=10)
    state = torch.random.get_rng_state()
    a = ATTACKS.get("gaussian")(c9)
    assert torch.equal(a, ATTACKS.get("gaussian")(c9b))
    assert not torch.equal(a, ATTACKS.get("gaussian")(c10))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_flip_labels_by_hand():
    assert B.flip_labels(torch.tensor([0, 1, 9, 4]), 10).tolist() == [9, 8, 0, 5]
    assert B.flip_labels(torch.tensor([0, 1, 2]), 3).tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got \[0, 3\]"):
        B.flip_labels(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="labels must be integers"):
        B.flip_labels(torch.tensor([0.0]), 3)


# --------------------------------------------------------------------------------------- ByzFL cross-checks
@needs_byzfl
@pytest.mark.parametrize("n_clients,f", [(10, 3), (13, 4), (30, 9)])
def test_alie_matches_byzfl_with_tau_minus_z(n_clients, f):
    """Same definition up to the sign convention and z: ByzFL's ``ALittleIsEnough(tau)`` sends
    ``mean + tau * std`` (sample std, ddof = 1, as ours) with a fixed tau (default 1.5); ALIE takes
    ``mu - z sigma`` with z from n and f. So ours with z equals ByzFL with tau = -z."""
    x = rows(n_clients - f, 50, seed=n_clients, dtype=torch.float32)  # ByzFL's tools return float32
    z = B.alie_z(n_clients, f)
    ours = ATTACKS.get("alie")(ctx(x, f, n_clients))
    ref = BZA.ALittleIsEnough(tau=-z)(x)
    assert ours.shape == (f, 50)
    for r in ours:
        torch.testing.assert_close(r, ref, rtol=1e-6, atol=1e-7)
    # the difference: ByzFL's default tau = 1.5 pushes the other way, by a fixed amount
    assert not torch.allclose(ours[0], BZA.ALittleIsEnough()(x))
    torch.testing.assert_close(ATTACKS.get("alie")(ctx(x, 1, n_clients, params={"z": -1.5}))[0],
                               BZA.ALittleIsEnough()(x), rtol=1e-6, atol=1e-7)


@needs_byzfl
@pytest.mark.parametrize("epsilon", [0.1, 2.0, 100.0])
def test_ipm_matches_byzfl(epsilon):
    """ByzFL's ``InnerProductManipulation(tau)`` is ours with epsilon = tau. (Defaults differ: ByzFL 2.0, ours
    Xie et al.'s 0.1, checked in test_the_suite_is_registered_untargeted_with_display_names.)"""
    x = rows(7, 40, seed=3, dtype=torch.float32)
    ours = ATTACKS.get("ipm")(ctx(x, 2, params={"epsilon": epsilon}))
    ref = BZA.InnerProductManipulation(tau=epsilon)(x)
    for r in ours:  # ByzFL's mean in float32, ours in float64: float32 rounding of a sum with cancellations
        torch.testing.assert_close(r, ref, rtol=2e-5, atol=1e-6 * epsilon)


@needs_byzfl
def test_sign_flip_matches_byzfl():
    x = rows(9, 33, seed=5, dtype=torch.float32)
    ours = ATTACKS.get("sign_flip")(ctx(x, 3))
    ref = BZA.SignFlipping()(x)
    for r in ours:
        torch.testing.assert_close(r, ref, rtol=1e-6, atol=1e-8)


@needs_byzfl
def test_gaussian_matches_byzfl_on_the_same_stream():
    """ByzFL's ``Gaussian(mu, sigma)`` draws ``torch.randn(d) * sigma + mu`` from the global stream and its
    ``ByzantineClient`` sends that one vector f times: ours with ``same_values`` and a generator seeded as the
    global stream is, bit for bit. Ours by default draws one vector per attacker (tested above)."""
    x = torch.zeros(4, 257)
    torch.manual_seed(21)
    ref = BZA.Gaussian(mu=0.5, sigma=3.0)(x)
    ours = ATTACKS.get("gaussian")(ctx(x, 3, params={"mu": 0.5, "sigma": 3.0, "same_values": True}, seed=21))
    for r in ours:
        assert torch.equal(r, ref)


@pytest.fixture(scope="module")
def digits():
    """Three attackers' shards of scikit-learn's digits (60, 90 and 25 samples), the digits CNN (no dropout)."""
    x, y = digits_tensors()
    model, theta = seeded_digits_cnn()
    shards = [torch.arange(0, 60), torch.arange(60, 150), torch.arange(150, 175)]
    return {"model": model, "theta": theta, "x": x, "y": y, "shards": shards}


def lf_ctx(s, engine: EngineOptions, n: int = 3, seed: int = 5, **kw) -> AttackContext:
    owns = [(s["x"][sh], s["y"][sh]) for sh in s["shards"][:n]]
    d = s["theta"].numel()
    return AttackContext(model=s["model"], global_flat=s["theta"], benign_updates=torch.zeros(4, d), n_attackers=n,
                         n_clients=n + 4, round=1, attacker_data=owns, num_classes=10,
                         generator=torch.Generator().manual_seed(seed), engine=engine, **kw)


@needs_byzfl
def test_label_flip_first_step_matches_byzfl_flipped_gradients(digits):
    """ByzFL's label flipping: an honest client also computes its gradient on the batch with targets
    ``C - 1 - y`` (``fed_framework.Client``, ``LabelFlipping=True``) and ``LabelFlipping`` sends the mean of those
    gradients. Ours: each attacker trains on its own shard with the same flipped labels. With one full-batch
    step (1 epoch, batch >= shard) Adam's first step from fresh moments is ``-lr g / (|g| + eps)``, so each
    attacker's update is that function of ByzFL's flipped gradient on its shard (LabelFlipping of one vector is
    the vector)."""
    s, lr = digits, 1e-2
    got = ATTACKS.get("label_flip")(lf_ctx(s, EngineOptions(kind="sequential"), n=2, lr=lr, local_epochs=1,
                                           batch_size=128))
    for i, sh in enumerate(s["shards"][:2]):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(s["x"][sh], s["y"][sh]),
                                             batch_size=len(sh), shuffle=False)
        client = BZC.Client({"model_name": "logreg_mnist", "device": "cpu", "loss_name": "CrossEntropyLoss",
                             "LabelFlipping": True, "nb_labels": 10, "momentum": 0.0, "training_dataloader": loader,
                             "store_per_client_metrics": False})
        net = build_model("digits_cnn", 10, 1)
        load_flat_(net, s["theta"])
        client.model = net
        client.compute_gradients()
        g = BZA.LabelFlipping()([client.get_flat_flipped_gradients().detach()])
        want = -lr * g / (g.abs() + ADAM_EPS)
        assert want.abs().max() > 0.5 * lr
        # float rounding of two gradient computations moves g / (|g| + eps) only where |g| is near eps
        big = g.abs() > 1e-5
        assert big.float().mean() > 0.5
        torch.testing.assert_close(got[i][big], want[big], rtol=0, atol=1e-4 * lr)
        torch.testing.assert_close(got[i], want, rtol=0, atol=2e-3 * lr)
        # not the honest update: the unflipped labels' first step disagrees in sign on many coordinates
        ys = s["y"][sh]
        unflipped = train_clients(s["model"], s["theta"], s["x"][sh], ys, [torch.arange(len(ys))], epochs=1,
                                  batch_size=128, lr=lr, options=EngineOptions(kind="sequential"),
                                  generator=torch.Generator().manual_seed(0))[0]
        assert (torch.sign(unflipped) != torch.sign(want)).float().mean() > 0.1


# ------------------------------------------------------------------------------------- label flip, engine
def test_label_flip_is_honest_training_on_flipped_labels_through_the_engine(digits):
    """The attackers' updates are exactly what the engine's honest training gives the same shards with
    ``C - 1 - y`` and the mini-batches from the same generator (several epochs, partial batches)."""
    s = digits
    got = ATTACKS.get("label_flip")(lf_ctx(s, EngineOptions(kind="sequential"), local_epochs=2, batch_size=32))
    want = train_clients(s["model"], s["theta"], s["x"], 9 - s["y"], s["shards"], epochs=2, batch_size=32, lr=1e-3,
                         options=EngineOptions(kind="sequential"), generator=torch.Generator().manual_seed(5))
    assert got.shape == (3, s["theta"].numel()) and torch.equal(got, want)
    assert float(got.norm()) > 0


@pytest.mark.parametrize("engine", [EngineOptions(kind="vectorised", conv="vmap", cuda_graph=False),
                                    EngineOptions(kind="vectorised", conv="grouped", cuda_graph=False)])
def test_label_flip_on_the_vectorised_engine_equals_the_sequential_one(digits, engine):
    s = digits
    want = ATTACKS.get("label_flip")(lf_ctx(s, EngineOptions(kind="sequential"), batch_size=32, local_epochs=1))
    got = ATTACKS.get("label_flip")(lf_ctx(s, engine, batch_size=32, local_epochs=1))
    for g, w in zip(got, want):  # every attacker's row (shards of unequal size)
        assert w.norm() > 1e-3 and float((g - w).norm() / w.norm()) < 1e-4


@pytest.mark.parametrize("engine", [EngineOptions(kind="sequential"),
                                    EngineOptions(kind="vectorised", conv="vmap", cuda_graph=False)])
def test_label_flip_attackers_read_only_their_own_shard_and_are_deterministic(digits, engine):
    s = digits
    clean = ATTACKS.get("label_flip")(lf_ctx(s, engine, n=2, batch_size=32, local_epochs=1))
    assert torch.equal(clean, ATTACKS.get("label_flip")(lf_ctx(s, engine, n=2, batch_size=32, local_epochs=1)))
    c = lf_ctx(s, engine, n=2, batch_size=32, local_epochs=1)
    c.attacker_data[1] = (torch.full_like(c.attacker_data[1][0], float("nan")), c.attacker_data[1][1])
    poisoned = ATTACKS.get("label_flip")(c)
    assert torch.equal(poisoned[0], clean[0]) and not torch.isfinite(poisoned[1]).all()
    other = ATTACKS.get("label_flip")(lf_ctx(s, engine, n=2, seed=6, batch_size=32, local_epochs=1))
    assert not torch.equal(other, clean)


def test_label_flip_needs_a_shard_per_attacker(digits):
    c = lf_ctx(digits, EngineOptions(kind="sequential"), n=2)
    c.attacker_data = c.attacker_data[:1]
    with pytest.raises(ValueError, match="label_flip: attacker_data has 1 shards for 2 attackers"):
        ATTACKS.get("label_flip")(c)


# ------------------------------------------------------------------------------------------ bad params
@pytest.mark.parametrize("name,params,msg", [
    ("alie", {"tau": 1.5}, r"attack 'alie': unknown params \['tau'\]; allowed: \['z'\]"),
    ("alie", {"z": float("nan")}, r"attack 'alie': z must be a finite number, got nan"),
    ("alie", {"z": "big"}, r"attack 'alie': z must be a finite number, got 'big'"),
    ("ipm", {"epsilon": -0.1}, r"attack 'ipm': epsilon must be > 0, got -0.1"),
    ("ipm", {"epsilon": 0}, r"attack 'ipm': epsilon must be > 0, got 0"),
    ("ipm", {"eps": 0.1}, r"attack 'ipm': unknown params \['eps'\]; allowed: \['epsilon'\]"),
    ("ipm", {"epsilon": True}, r"attack 'ipm': epsilon must be a finite number, got True"),
    ("sign_flip", {"scale": 2.0}, r"attack 'sign_flip': unknown params \['scale'\]; allowed: \[\]"),
    ("gaussian", {"sigma": -1.0}, r"attack 'gaussian': sigma must be >= 0, got -1.0"),
    ("gaussian", {"mu": float("inf")}, r"attack 'gaussian': mu must be a finite number, got inf"),
    ("gaussian", {"std": 200}, r"attack 'gaussian': unknown params \['std'\]; allowed: \['mu', 'same_values', "
                               r"'sigma', 'space'\]"),
    ("gaussian", {"same_values": 1}, r"attack 'gaussian': same_values must be true or false, got 1"),
    ("gaussian", {"space": "grad"}, r"attack 'gaussian': space must be one of \['model', 'update'\], got 'grad'"),
    ("label_flip", {"mapping": "random"}, r"attack 'label_flip': unknown params \['mapping'\]; allowed: \[\]"),
])
def test_bad_params_get_one_clear_error(name, params, msg):
    with pytest.raises(ValueError, match=msg):
        B.parse_params(name, params)
    with pytest.raises(ValueError, match=msg):  # the registered attack: before any computation
        ATTACKS.get(name)(ctx(rows(5, 8), 2, params=params))


def test_bad_benign_updates_are_named():
    x = rows(5, 8)
    x[3, 2] = float("nan")
    for name in ("alie", "ipm", "sign_flip"):
        with pytest.raises(ValueError, match=r"benign_updates has non-finite \(NaN/Inf\) entries for client indices \[3\]"):
            ATTACKS.get(name)(ctx(x, 2))
    with pytest.raises(ValueError, match="must be a 2-D tensor"):
        B.ipm(torch.zeros(3), 1, 0.1)


# ------------------------------------------------------------------------------------------- simulation
@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return data.prepare("digits", {}, tmp_path_factory.mktemp("d") / "digits")


def _part(prepared: Path, cfg: RunConfig, tmp: Path) -> Path:
    p = tmp / f"{experiment.partition_key(cfg)}.npz"
    if not p.exists():
        experiment.build_partition(prepared, cfg, p)
    return p


def _rounds(out: Path) -> list[dict[str, str]]:
    with open(out / "rounds.csv") as fh:
        return list(csv.DictReader(fh))


def _finite_metrics(out: Path) -> None:
    rs = _rounds(out)
    assert len(rs) == 2
    for r in rs:
        assert math.isfinite(float(r["test_acc"])) and 0.0 <= float(r["test_acc"]) <= 1.0
        assert math.isfinite(float(r["test_loss"]))


@pytest.mark.parametrize("attack,params", [("alie", {}), ("ipm", {"epsilon": 100.0}), ("sign_flip", {}),
                                           ("gaussian", {"sigma": 200.0}), ("label_flip", {})])
def test_every_attack_runs_two_rounds_on_digits(prepared, tmp_path, attack, params):
    cfg = RunConfig(dataset="digits", rounds=2, local_epochs=1, batch_size=32, device="cpu", attack=attack,
                    attack_params=params, n_attackers=3, defense="median", engine={"kind": "sequential"})
    experiment.run_cell(cfg, prepared, _part(prepared, cfg, tmp_path), tmp_path / "run")
    _finite_metrics(tmp_path / "run")


def test_label_flip_runs_on_the_vectorised_engine_and_packed(prepared, tmp_path):
    """A run on the vectorised engine (stacked layout) and a pack of cells (one process, the benign clients of
    all trained in one call, each cell's attackers crafting on its own engine options)."""
    cfg = RunConfig(dataset="digits", rounds=2, local_epochs=1, batch_size=32, device="cpu", attack="label_flip",
                    n_attackers=2, engine={"kind": "vectorised", "conv": "grouped"})
    experiment.run_cell(cfg, prepared, _part(prepared, cfg, tmp_path), tmp_path / "vec")
    _finite_metrics(tmp_path / "vec")
    cfgs = [RunConfig(dataset="digits", rounds=2, local_epochs=1, batch_size=32, device="cpu", attack=a, n_attackers=2,
                      defense=d) for a, d in (("label_flip", "fedavg"), ("alie", "trimmed_mean"), ("gaussian", "krum"))]
    outs = [tmp_path / f"packed{i}" for i in range(len(cfgs))]
    finals = experiment.run_cells(cfgs, prepared, [_part(prepared, c, tmp_path) for c in cfgs], outs)
    assert all(f["engine"].startswith("vectorised-packed(3)") for f in finals)
    for o in outs:
        _finite_metrics(o)
