"""robustfl.pipeline.packs: runs grouped by robustfl.fl.experiment.pack_group, dealt round-robin into packs
of at most N, runs done left out, pack names a stable digest of their members."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from robustfl.fl.experiment import pack_group
from robustfl.pipeline.outputs import run_dir
from robustfl.pipeline.packs import Pack, plan_packs
from robustfl.pipeline.study import expand_study

BASE = {"dataset": "digits", "rounds": 2}
DEFENSES = ["fedavg", "flare", "median", "krum", "trimmed_mean"]


def cells(*grid, seeds=(0,)):
    return list(expand_study({"s": {"base": BASE, "seeds": list(seeds), "grid": list(grid)}}, "s").values())


def runs(packs: list[Pack]) -> list[tuple[str, int]]:
    return [m for p in packs for m in p.members]


def test_one_group_is_dealt_round_robin_into_packs_of_at_most_n(tmp_path):
    cs = cells({"defense": DEFENSES})
    order = sorted((c.id, 0) for c in cs)
    packs = plan_packs(cs, 2, str(tmp_path))
    assert [p.members for p in packs] == [(order[0], order[3]), (order[1], order[4]), (order[2],)]
    assert [len(p.members) for p in plan_packs(cs, 5, str(tmp_path))] == [5]
    assert [len(p.members) for p in plan_packs(cs, 9, str(tmp_path))] == [5]
    assert [len(p.members) for p in plan_packs(cs, 1, str(tmp_path))] == [1] * 5
    assert all(p.dataset == "digits" for p in packs)


@pytest.mark.parametrize("other", [{"n_clients": [20]}, {"rounds": [3]}, {"partition": ["classes"]},
                                   {"dataset": ["cifar10"]}, {"local_epochs": [2]}])
def test_packs_never_mix_groups(tmp_path, other):
    cs = cells({"defense": DEFENSES}, {"defense": ["fedavg", "flare"], **other}, seeds=(0, 1))
    packs = plan_packs(cs, 4, str(tmp_path))
    by_id = {c.id: c for c in cs}
    for p in packs:
        assert len({json.dumps(pack_group(by_id[c].run_config(s)), default=str) for c, s in p.members}) == 1
        assert {by_id[c].dataset for c, _ in p.members} == {p.dataset}
    # 10 runs of the first group in packs of <= 4 (3 packs), 4 of the other (1 pack); every run once
    assert sorted(len(p.members) for p in packs) == [3, 3, 4, 4]
    assert sorted(runs(packs)) == sorted((c.id, s) for c in cs for s in c.seeds)


def test_runs_done_are_left_out(tmp_path):
    cs = cells({"defense": DEFENSES})
    done = sorted(c.id for c in cs)[:2]
    for cid in done:
        Path(run_dir(str(tmp_path), cid, 0)).mkdir(parents=True)
        (Path(run_dir(str(tmp_path), cid, 0)) / "run.json").write_text("{}")
    Path(run_dir(str(tmp_path), sorted(c.id for c in cs)[2], 0)).mkdir(parents=True)  # interrupted: no run.json
    packs = plan_packs(cs, 9, str(tmp_path))
    assert sorted(runs(packs)) == sorted((c.id, 0) for c in cs if c.id not in done)
    for cid in done:
        (Path(run_dir(str(tmp_path), cid, 0)) / "run.json").unlink()
    assert len(runs(plan_packs(cs, 9, str(tmp_path)))) == 5


def test_pack_names_are_a_digest_of_their_members(tmp_path):
    cs = cells({"defense": DEFENSES}, {"defense": ["fedavg"], "n_clients": [20]}, seeds=(0, 2))
    packs = plan_packs(cs, 3, str(tmp_path))
    for p in packs:
        digest = hashlib.sha1(json.dumps([[c, s] for c, s in p.members]).encode()).hexdigest()[:10]
        assert p.name == f"run_pack_digits_{digest}"
    assert len({p.name for p in packs}) == len(packs)
    assert plan_packs(list(reversed(cs)), 3, str(tmp_path)) == packs  # independent of the cells' order
