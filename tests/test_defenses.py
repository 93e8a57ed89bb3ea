"""The registered defenses' parameters: how the trimmed mean's k and Bulyan's f are chosen
(robustfl.aggregation.defenses), by hand, and through the simulator's server context."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustfl.aggregation import aggregators as A
from robustfl.data import datasets as data
from robustfl.fl import experiment
from robustfl.config import RunConfig
from robustfl.data.datasets import load_prepared
from robustfl.aggregation.defenses import DEFENSES, ServerContext, trim_k
from robustfl.fl.simulate import Simulation

F64 = torch.float64


def ctx(n: int, server_f: int = 1, /, **params: object) -> ServerContext:
    """Server context with the assumed f (the simulator's: the cell's attackers, at least 1) and the
    cell's defense_params."""
    return ServerContext(n_clients=n, f=server_f, params=dict(params))


def rows(n: int, d: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------------------------------ trimmed mean
# 10 clients, one coordinate: sorted [0, 0, 0, 0, 0, 0, 0, 100, 200, 1000]
#   trim code (k = int(0.1 * 10) = 1): mean of [0 x 6, 100, 200]  = 300 / 8 = 37.5
#   trim f with f = 3 (k = 3):         mean of [0 x 4]             = 0
#   trim f with f = 2 (k = 2):         mean of [0 x 5, 100]        = 100 / 6
HAND = torch.tensor([[1000.0], [0.0], [200.0], [0.0], [0.0], [100.0], [0.0], [0.0], [0.0], [0.0]], dtype=F64)


def test_trim_by_hand():
    tm = DEFENSES.get("trimmed_mean")
    code = tm(HAND, ctx(10, 3, trim="code"))
    assert code.info["k"] == 1 and code.update.tolist() == [37.5]
    by_f = tm(HAND, ctx(10, 3, trim="f"))
    assert by_f.info["k"] == 3 and by_f.update.tolist() == [0.0]
    default = tm(HAND, ctx(10, 3))  # trim: f is the default
    assert default.info["k"] == 3 and default.update.tolist() == [0.0]
    assert tm(HAND, ctx(10, 2)).update.tolist() == [pytest.approx(100 / 6)]


@pytest.mark.parametrize(("trim", "n", "f", "k"), [
    ("code", 10, 3, 1), ("code", 20, 3, 2), ("code", 9, 1, 0), ("code", 30, 1, 3),
    ("f", 10, 1, 1), ("f", 10, 3, 3), ("f", 20, 4, 4),
    (0, 10, 3, 0), (2, 10, 3, 2), (4, 10, 1, 4),
    (0.1, 10, 3, 1), (0.15, 10, 3, 1), (0.2, 10, 3, 2), (0.35, 10, 1, 3), (0.1, 20, 3, 2),
])
def test_trim_options(trim, n, f, k):
    assert trim_k(trim, n, f) == k
    x = rows(n)
    res = DEFENSES.get("trimmed_mean")(x, ctx(n, f, trim=trim))
    assert res.info["k"] == k and torch.equal(res.update, A.trimmed_mean(x, k).update)


def test_trim_synonym_k_and_server_f():
    tm = DEFENSES.get("trimmed_mean")
    x = rows(10)
    assert tm(x, ctx(10, 3, k="code")).info["k"] == 1
    assert tm(x, ctx(10, 3, k=2)).info["k"] == 2
    assert tm(x, ctx(10, 1, trim="f", f=2)).info["k"] == 2  # an f among the params wins
    with pytest.raises(ValueError, match="trim or its synonym k, not both"):
        tm(x, ctx(10, trim="code", k=1))


@pytest.mark.parametrize(("trim", "n", "f", "msg"), [
    ("half", 10, 1, "trim must be 'f', 'code'"),
    (True, 10, 1, "trim must be 'f', 'code'"),
    (0.5, 10, 1, "trim must be 'f', 'code'"),
    (1.0, 10, 1, "trim must be 'f', 'code'"),
    (0.0, 10, 1, "trim must be 'f', 'code'"),
    (None, 10, 1, "trim must be 'f', 'code'"),
    (-1, 10, 1, r"trim=-1 drops k=-1 values per side, but n=10"),
    (5, 10, 1, r"trim=5 drops k=5 values per side, but n=10 clients need 0 <= k and n > 2k \(k <= 4\)"),
    ("f", 10, 5, r"trim='f' drops k=5 values per side, but n=10"),
    ("f", 4, 2, r"trim='f' drops k=2 values per side, but n=4"),
])
def test_bad_trim_is_one_clear_error(trim, n, f, msg):
    with pytest.raises(ValueError, match=msg):
        DEFENSES.get("trimmed_mean")(rows(n), ctx(n, f, trim=trim))


def test_trimmed_mean_unknown_param():
    with pytest.raises(ValueError, match=r"defense 'trimmed_mean': unknown params \['beta'\]"):
        DEFENSES.get("trimmed_mean")(rows(10), ctx(10, beta=0.1))


# ------------------------------------------------------------------------------------------------ Bulyan
def test_bulyan_f_default_is_the_server_f_and_must_be_admissible():
    bul = DEFENSES.get("bulyan")
    x = rows(10, d=5)
    # the cell's 3 attackers of n = 10: Bulyan needs n >= 4f + 3 = 15
    with pytest.raises(ValueError, match=r"f=3 is inadmissible for n=10 clients \(Bulyan needs n >= 4f \+ 3, "
                                         r"so f <= 1\)"):
        bul(x, ctx(10, 3))
    # the authors' code's f = 1, given explicitly, overrides the server's f
    res = bul(x, ctx(10, 3, f=1))
    assert res.info["theta"] == 8 and res.info["beta"] == 6
    assert torch.equal(res.update, A.bulyan(x, 1).update)
    assert torch.equal(bul(x, ctx(10, 1)).update, res.update)
    assert bul(rows(11, d=5), ctx(11, 2)).info["beta"] == 3  # 11 >= 4*2 + 3
    with pytest.raises(ValueError, match=r"f=2 is inadmissible for n=10"):
        bul(x, ctx(10, 1, f=2))
    with pytest.raises(ValueError, match=r"defense 'bulyan': unknown params \['trim'\]"):
        bul(x, ctx(10, trim="code"))


# ----------------------------------------------------------------------------- through the simulator
@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return data.prepare("digits", {}, tmp_path_factory.mktemp("d") / "digits")


def _one_round(digits: Path, tmp: Path, **kw: object) -> None:
    cfg = RunConfig(dataset="digits", rounds=1, local_epochs=1, batch_size=32, engine={"kind": "sequential"},
                    attack="trimmedmean_untargeted", n_attackers=3, **kw)
    part = tmp / f"{experiment.partition_key(cfg)}.npz"
    if not part.exists():
        experiment.build_partition(digits, cfg, part)
    run_data, _ = experiment._setup(cfg, load_prepared(digits), part, torch.device("cpu"), {})
    sim = Simulation(cfg, run_data, tmp / experiment.cell_id(cfg), None, torch.device("cpu"))
    sim.step(sim.train_benign(), 0.0)


def test_simulator_passes_the_cells_f_and_trim(digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A cell with 3 attackers of 10: Bulyan's f is 3 (an error) unless defense_params {f: 1}; the trimmed
    mean trims 3 per side by default and int(0.1 * 10) = 1 with {trim: code}."""
    seen: list[tuple[str, int]] = []
    bulyan, trimmed = A.bulyan, A.trimmed_mean
    monkeypatch.setattr(A, "bulyan", lambda u, f, **kw: seen.append(("bulyan", f)) or bulyan(u, f, **kw))
    monkeypatch.setattr(A, "trimmed_mean", lambda u, k: seen.append(("trimmed_mean", k)) or trimmed(u, k))
    with pytest.raises(ValueError, match=r"Bulyan needs n >= 4f \+ 3, but n = 10 and f = 3"):
        _one_round(digits, tmp_path, defense="bulyan")  # refused when the cell is read
    _one_round(digits, tmp_path, defense="bulyan", defense_params={"f": 1})
    _one_round(digits, tmp_path, defense="trimmed_mean")
    _one_round(digits, tmp_path, defense="trimmed_mean", defense_params={"trim": "code"},
               attack_params={"variant": "code"})
    assert seen == [("bulyan", 1), ("trimmed_mean", 3), ("trimmed_mean", 1)]
