"""The FL loop: common random numbers across defenses, and the packed (lock-step) runner."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from robustfl.data import datasets as data
from robustfl.fl import experiment
from robustfl.config import RunConfig
from robustfl.data.datasets import load_prepared
from robustfl.fl.simulate import Simulation


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return data.prepare("digits", {}, tmp_path_factory.mktemp("d") / "digits")


def _sim(digits: Path, tmp: Path, **kw: object) -> Simulation:
    cfg = RunConfig(dataset="digits", rounds=2, local_epochs=1, batch_size=32, engine={"kind": "sequential"}, **kw)
    part = tmp / f"{experiment.partition_key(cfg)}.npz"
    if not part.exists():
        experiment.build_partition(digits, cfg, part)
    run_data, _ = experiment._setup(cfg, load_prepared(digits), part, torch.device("cpu"), {})
    return Simulation(cfg, run_data, tmp / experiment.cell_id(cfg), None, torch.device("cpu"))


def test_defenses_draw_the_same_client_batches(digits: Path, tmp_path: Path) -> None:
    """Server-side training (FLARE's pre-training, FLTrust's root update) uses its own random stream,
    so every defense of one setting and seed sees the same mini-batches round after round."""
    sims = {d: _sim(digits, tmp_path, defense=d) for d in ("fedavg", "fltrust", "flare")}
    plans = {d: s.benign_plan() for d, s in sims.items()}
    for d in ("fltrust", "flare"):
        assert torch.equal(plans[d].idx, plans["fedavg"].idx)
    for s in sims.values():  # one full round each, then compare the next round's batches
        s.step(_train(s), 0.0)
    plans2 = {d: s.benign_plan() for d, s in sims.items()}
    for d in ("fltrust", "flare"):
        assert torch.equal(plans2[d].idx, plans2["fedavg"].idx)
    assert not torch.equal(plans2["fedavg"].idx, plans["fedavg"].idx)  # a fresh permutation per round


def _train(s: Simulation) -> torch.Tensor:
    from robustfl.engine.train import train_sequential

    return train_sequential(s.model, s.theta, s.data.x_train, s.data.y_train, [s.shards[i] for i in s.benign],
                            epochs=s.cfg.local_epochs, batch_size=s.bs, lr=s.cfg.lr,
                            generator=torch.Generator().manual_seed(0))


def test_flare_pretrains_on_the_aux_set(digits: Path, tmp_path: Path) -> None:
    """Section 5.2 point 1: FLARE's initial model is trained on D, the others start from the same init."""
    a, b = _sim(digits, tmp_path, defense="fedavg"), _sim(digits, tmp_path, defense="flare")
    c = _sim(digits, tmp_path, defense="flare", defense_params={"pretrain": False})
    assert torch.equal(a.theta, c.theta)
    assert not torch.equal(a.theta, b.theta)


def test_packed_run_writes_every_cell(digits: Path, tmp_path: Path) -> None:
    cfgs = [RunConfig(dataset="digits", rounds=2, local_epochs=1, batch_size=32, defense=d, seed=s)
            for d, s in (("fedavg", 0), ("median", 1))]
    parts, outs = [], []
    for c in cfgs:
        p = tmp_path / f"{experiment.partition_key(c)}.npz"
        experiment.build_partition(digits, c, p)
        parts.append(p)
        outs.append(tmp_path / "runs" / f"{experiment.cell_id(c)}-{c.seed}")
    finals = experiment.run_cells(cfgs, digits, parts, outs)
    assert len(finals) == 2 and all(0.0 <= f["test_acc"] <= 1.0 for f in finals)
    for o in outs:
        assert {"rounds.csv", "clients.csv", "run.json"} <= {p.name for p in o.iterdir()}
        assert json.loads((o / "run.json").read_text())["peak_gpu_mem_gib"] is None  # CPU
    assert all(f["engine"].startswith("vectorised-packed(2)") for f in finals)


def test_peak_gpu_memory_is_reported_in_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30 + 2**29)
    assert experiment.peak_gpu_mem_gib(torch.device("cuda", 0)) == 3.5
    assert experiment.peak_gpu_mem_gib(torch.device("cpu")) is None


def test_claim_gpu_spreads_jobs_over_cards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent jobs take the first free (slot, GPU) lock in slot-major order: one job per card first."""
    import fcntl
    import tempfile

    from robustfl.fl import simulate

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    held = []
    for name in ("robustfl-gpu0-slot0.lock",):  # another job already holds card 0, slot 0
        fh = open(tmp_path / name, "w")  # noqa: SIM115
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(fh)
    monkeypatch.setattr(simulate, "_GPU_LOCK", None)
    assert simulate.claim_gpu() == 1  # card 1 is free at slot 0
    assert simulate.claim_gpu() == 1  # a process claims once and keeps its card
    monkeypatch.setattr(simulate, "_GPU_LOCK", None)
    assert simulate.claim_gpu() == 0  # slot 1 of card 0 comes next
    for fh in held:
        fh.close()


def test_a_claimed_gpu_becomes_the_process_current_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """resolve_device makes the run's card the current CUDA device: Triton launches its kernels on the
    current device, and a run on cuda:1 whose current device stayed cuda:0 failed ("Pointer argument
    cannot be accessed from Triton" on a 4-GPU host)."""
    from robustfl.fl import simulate

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(simulate, "claim_gpu", lambda: 2)
    assert simulate.resolve_device("auto") == torch.device("cuda", 2)
    assert simulate.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert calls == [torch.device("cuda", 2), torch.device("cuda", 1)]
    assert simulate.resolve_device("cpu") == torch.device("cpu") and len(calls) == 2


def test_clients_record_the_norm_of_each_update(digits: Path, tmp_path: Path) -> None:
    """clients.csv's update_norm is ||delta_i||_2 of the update the server received; a client whose
    update holds NaN is excluded (weight 0) and its norm is NaN."""
    import math

    s = _sim(digits, tmp_path, defense="fedavg")
    n, d = s.cfg.n_clients, s.spec.dim
    ben = torch.zeros(n, d, dtype=s.theta.dtype)
    for i in range(n):
        ben[i, i] = 3.0 * (i + 1)
        ben[i, i + n] = 4.0 * (i + 1)  # ||delta_i|| = 5 (i + 1)
    ben[2, 0] = float("nan")
    s.step(ben, 0.0)
    rows = {r["client"]: r for r in s.client_rows}
    for i in range(n):
        if i == 2:
            assert math.isnan(rows[i]["update_norm"]) and rows[i]["weight"] == 0.0
        else:
            assert rows[i]["update_norm"] == pytest.approx(5.0 * (i + 1), rel=1e-6)


def test_resumes_a_checkpoint_written_before_update_norm(digits: Path, tmp_path: Path) -> None:
    """A checkpoint whose client rows lack the optional columns (an older version's) still resumes;
    the rounds it holds get NaN there."""
    import math

    from robustfl.io import load_checkpoint, save_checkpoint
    from robustfl.reporting.results import CLIENT_COLUMNS

    cfg = dict(defense="fedavg", checkpoint_every=1)
    s = _sim(digits, tmp_path, **cfg)
    s.checkpoints.path = tmp_path / "run.ckpt.pt"
    s.step(_train(s), 0.0)
    st = load_checkpoint(s.checkpoints.path)
    st["client_rows"] = st["client_rows"][:, : len(CLIENT_COLUMNS)]
    save_checkpoint(s.checkpoints.path, st)
    r = Simulation(s.cfg, s.data, s.out_dir, s.checkpoints.path, torch.device("cpu"))
    assert r.round == 1 and torch.equal(r.theta, s.theta)
    assert all(math.isnan(row["update_norm"]) for row in r.client_rows)
    assert [row["weight"] for row in r.client_rows] == [row["weight"] for row in s.client_rows]


def test_packing_runs_of_different_client_counts(digits: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A 10-client and a 4-client run packed together (unequal shards): skipping the idle clients gives
    the same runs as computing them on masked batches, and round 1 matches each run alone up to float
    summation order (later rounds drift apart through Adam, as any two float orders do)."""
    import pandas as pd

    from robustfl.engine import EngineOptions

    cfgs = [RunConfig(dataset="digits", rounds=2, local_epochs=1, batch_size=32, engine={"kind": "vectorised"},
                      defense="fedavg", n_clients=n, seed=s) for n, s in ((10, 0), (4, 1))]
    parts = []
    for c in cfgs:
        p = tmp_path / f"{experiment.partition_key(c)}.npz"
        experiment.build_partition(digits, c, p)
        parts.append(p)
    out = {k: [tmp_path / k / str(i) for i in range(2)] for k in ("skip", "masked", "alone")}
    experiment.run_cells(cfgs, digits, parts, out["skip"])
    with monkeypatch.context() as m:  # the packed call's options with idle clients computed on masked batches
        real = EngineOptions.packed
        m.setattr(EngineOptions, "packed", lambda self: real(self).replace(skip_idle=False))
        experiment.run_cells(cfgs, digits, parts, out["masked"])
    for c, p, o in zip(cfgs, parts, out["alone"]):
        experiment.run_cell(c, digits, p, o)
    read = lambda d, f: pd.read_csv(d / f)  # noqa: E731
    for a, b, alone in zip(out["skip"], out["masked"], out["alone"]):
        assert read(a, "rounds.csv")["test_acc"].tolist() == read(b, "rounds.csv")["test_acc"].tolist()
        pd.testing.assert_series_equal(read(a, "clients.csv")["update_norm"], read(b, "clients.csv")["update_norm"],
                                       rtol=1e-6)
        first = lambda d: read(d, "clients.csv").query("round == 1")["update_norm"]  # noqa: E731
        pd.testing.assert_series_equal(first(a), first(alone), rtol=1e-3)


def _by_round(rows: list[dict]) -> dict[int, dict[int, dict]]:
    out: dict[int, dict[int, dict]] = {}
    for r in rows:
        out.setdefault(r["round"], {})[r["client"]] = r
    return out


def test_attack_diagnostics_of_a_backdoor_cell(digits: Path, tmp_path: Path) -> None:
    """Attack-Krum-Backdoor against Krum: clients.csv and rounds.csv carry the diagnostics, finite for every
    client; ``selected`` is weight > 0; the attacker's krum_rank is 1 exactly in the rounds where Krum's
    weights pick it (Krum here runs with the diagnostics' f and squared distance); rounds.csv summarises the
    attacker's client rows."""
    import pandas as pd

    from robustfl.reporting.results import CLIENT_OPTIONAL_COLUMNS, ROUND_OPTIONAL_COLUMNS

    s = _sim(digits, tmp_path, defense="krum", attack="krum_backdoor", n_attackers=1)
    while not s.done:
        s.step(_train(s), 0.0)
    s.finish()
    (mal,) = s.mal
    clients = pd.read_csv(s.out_dir / "clients.csv")
    rounds = pd.read_csv(s.out_dir / "rounds.csv")
    assert set(CLIENT_OPTIONAL_COLUMNS) <= set(clients.columns) and set(ROUND_OPTIONAL_COLUMNS) <= set(rounds.columns)
    assert clients[["dist_ratio", "krum_rank", "selected"]].notna().all().all()
    assert (clients["selected"] == (clients["weight"] > 0).astype(int)).all()
    for _, rnd in clients.groupby("round"):
        assert sorted(rnd["krum_rank"]) == list(range(1, 11))
    att = clients[clients["client"] == mal].set_index("round")
    assert ((att["krum_rank"] == 1) == (att["weight"] > 0)).all()
    rounds = rounds.set_index("round")
    assert (rounds["mal_krum_rank"] == att["krum_rank"]).all() and (rounds["mal_selected"] == att["selected"]).all()
    assert (rounds["mal_dist_ratio"] == att["dist_ratio"]).all()
    # the benign ratios' mean square is 1 by the definition of the benign spread
    ben = clients[clients["malicious"] == 0]
    assert ben.groupby("round")["dist_ratio"].apply(lambda r: (r ** 2).mean()).tolist() == pytest.approx([1, 1], rel=1e-4)


def test_krum_rank_one_is_krums_choice_both_ways(digits: Path, tmp_path: Path) -> None:
    """An attacker sitting on the benign mean is Krum's choice (rank 1, selected, dist_ratio 0); one far
    away is not (rank n, weight 0, large dist_ratio). A FedAvg cell selects everybody yet still shows where
    Krum would have put the attacker; a cell without attackers has NaN round summaries."""
    s = _sim(digits, tmp_path, defense="krum", attack="krum_backdoor", n_attackers=1)
    s.attack_fn = lambda ctx: ctx.benign_updates.mean(0, keepdim=True)
    s.step(_train(s), 0.0)
    s.attack_fn = lambda ctx: ctx.benign_updates.mean(0, keepdim=True) + 1.0
    s.step(_train(s), 0.0)
    (mal,) = s.mal
    rows = _by_round(s.client_rows)
    assert rows[1][mal]["krum_rank"] == 1 and rows[1][mal]["selected"] == 1 and rows[1][mal]["weight"] == 1.0
    assert rows[1][mal]["dist_ratio"] == pytest.approx(0.0, abs=1e-3)
    assert rows[2][mal]["krum_rank"] == 10 and rows[2][mal]["selected"] == 0 and rows[2][mal]["dist_ratio"] > 10
    assert [r["mal_krum_rank"] for r in s.rows] == [1, 10] and [r["mal_selected"] for r in s.rows] == [1, 0]
    f = _sim(digits, tmp_path, defense="fedavg", attack="krum_backdoor", n_attackers=1)
    f.attack_fn = lambda ctx: ctx.benign_updates.mean(0, keepdim=True)
    f.step(_train(f), 0.0)
    assert all(r["selected"] == 1 for r in f.client_rows) and f.rows[0]["mal_selected"] == 1.0
    assert _by_round(f.client_rows)[1][mal]["krum_rank"] == 1
    import math

    n = _sim(digits, tmp_path, defense="fedavg")
    n.step(_train(n), 0.0)
    assert all(math.isnan(n.rows[0][c]) for c in ("mal_dist_ratio", "mal_krum_rank", "mal_selected"))
    assert all(math.isfinite(r["dist_ratio"]) and math.isfinite(r["krum_rank"]) for r in n.client_rows)


def test_diagnostics_change_no_other_column(digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The diagnostics only read the updates and weights: with them replaced by NaN every other value of
    both files is the same, and so is every random stream (digits' network has no dropout, so a draw from
    torch's global RNG would show only in its state)."""
    import pandas as pd

    from robustfl.fl import simulate

    new = ["dist_ratio", "krum_rank", "selected", "mal_dist_ratio", "mal_krum_rank", "mal_selected"]

    def run(name: str) -> tuple[pd.DataFrame, pd.DataFrame, torch.Tensor, torch.Tensor, torch.Tensor]:
        s = _sim(digits, tmp_path / name, defense="krum", attack="krum_untargeted", n_attackers=2)
        while not s.done:  # the attack draws from its generator, the clients' dropout from torch's
            s.step(s.train_benign(), 0.0)
        drop = lambda rows: pd.DataFrame(rows).drop(columns=["train_s", "attack_s", "agg_s", *new],  # noqa: E731
                                                    errors="ignore")
        return drop(s.rows), drop(s.client_rows), torch.get_rng_state(), s.g.get_state(), s.g_att.get_state()

    with_diag = run("a")
    monkeypatch.setattr(simulate, "attack_diagnostics", lambda u, b, f: {
        k: torch.full((u.shape[0],), float("nan"), dtype=torch.float64) for k in ("dist_ratio", "krum_rank")})
    without = run("b")
    for a, b in zip(with_diag[:2], without[:2]):
        pd.testing.assert_frame_equal(a, b)
    for a, b in zip(with_diag[2:], without[2:]):
        assert torch.equal(a, b)


def test_resumes_a_checkpoint_written_before_the_attack_diagnostics(digits: Path, tmp_path: Path) -> None:
    """A checkpoint of the version that had update_norm but no diagnostics (rows of the required round
    columns, client rows with update_norm) resumes; its rounds read NaN there and the run finishes."""
    import math

    import pandas as pd

    from robustfl.reporting import results
    from robustfl.io import load_checkpoint, save_checkpoint

    s = _sim(digits, tmp_path, defense="krum", attack="krum_backdoor", n_attackers=1, checkpoint_every=1)
    s.checkpoints.path = tmp_path / "run.ckpt.pt"
    s.step(_train(s), 0.0)
    st = load_checkpoint(s.checkpoints.path)
    st["rows"] = st["rows"][:, : len(results.ROUND_COLUMNS)]
    st["client_rows"] = st["client_rows"][:, : len(results.CLIENT_COLUMNS) + 1]
    save_checkpoint(s.checkpoints.path, st)
    r = Simulation(s.cfg, s.data, s.out_dir, s.checkpoints.path, torch.device("cpu"))
    assert r.round == 1 and torch.equal(r.theta, s.theta)
    assert all(math.isnan(row["selected"]) and math.isnan(row["krum_rank"]) for row in r.client_rows)
    assert [row["update_norm"] for row in r.client_rows] == [row["update_norm"] for row in s.client_rows]
    assert math.isnan(r.rows[0]["mal_krum_rank"])
    r.step(_train(r), 0.0)
    r.finish()
    clients = pd.read_csv(r.out_dir / "clients.csv")
    assert clients.loc[clients["round"] == 1, "selected"].isna().all()
    assert clients.loc[clients["round"] == 2, "selected"].isin([0, 1]).all()
    st["rows"] = st["rows"][:, :-1]  # a width no version wrote: not resumed
    save_checkpoint(s.checkpoints.path, st)
    assert Simulation(s.cfg, s.data, s.out_dir, s.checkpoints.path, torch.device("cpu")).round == 0
