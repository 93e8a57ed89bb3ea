"""Client partitions (robustfl/data/partition.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robustfl.data import partition as P


def balanced(n_classes: int = 10, per_class: int = 100, seed: int = 0) -> np.ndarray:
    y = np.repeat(np.arange(n_classes), per_class)
    return y[np.random.default_rng(seed).permutation(len(y))]


def assert_disjoint_sorted(parts: list[np.ndarray]) -> None:
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)
    for p in parts:
        assert p.dtype.kind == "i" and np.all(np.diff(p) > 0)


# ------------------------------------------------------------------------------------------ iid


def test_iid_disjoint_complete_balanced() -> None:
    y = balanced(10, 101)  # 1010 samples, n = 7 -> 144 each, remainder 2 dropped
    parts = P.iid(y, 7, seed=0)
    assert_disjoint_sorted(parts)
    assert [len(p) for p in parts] == [144] * 7
    assert len(np.concatenate(parts)) == len(y) - len(y) % 7


def test_iid_seed_determinism_and_exclude() -> None:
    y = balanced()
    a, b, c = P.iid(y, 10, 3), P.iid(y, 10, 3), P.iid(y, 10, 4)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    ex = np.arange(0, 1000, 7)
    parts = P.iid(y, 10, 3, exclude=ex)
    assert not np.intersect1d(np.concatenate(parts), ex).size
    assert [len(p) for p in parts] == [(1000 - len(ex)) // 10] * 10


# ------------------------------------------------------------------------------------------ classes


@pytest.mark.parametrize("n,c_sel", [(10, 2), (10, 3), (7, 2), (20, 1), (10, 10), (5, 4)])
def test_classes_exact_distinct_balanced(n: int, c_sel: int) -> None:
    y = balanced(10, 100)
    parts = P.classes(y, n, c_sel, seed=1)
    assert_disjoint_sorted(parts)
    assert len({len(p) for p in parts}) == 1
    for p in parts:
        assert len(np.unique(y[p])) == c_sel
    q, r = divmod(n * c_sel, 10)
    if r == 0 and 100 % q == 0:  # shards divide the balanced classes evenly: nothing is lost
        assert len(np.concatenate(parts)) == 1000
    else:  # the shard size is the largest feasible one: at most a shard's worth less per class
        assert len(np.concatenate(parts)) >= 1000 - 10 * len(parts[0]) // c_sel


def test_classes_sattler_default_uses_all_data() -> None:
    y = balanced(10, 600)
    parts = P.classes(y, 10, 2, seed=0)
    assert [len(p) for p in parts] == [600] * 10  # 2 shards of 300
    m = P.manifest(parts, y, 0, "classes", {"c_sel": 2})
    assert m["classes_per_client"] == [2] * 10 and m["n_dropped"] == 0


def test_classes_seed_and_exclude() -> None:
    y = balanced()
    a, b, c = P.classes(y, 10, 2, 5), P.classes(y, 10, 2, 5), P.classes(y, 10, 2, 6)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    ex = np.flatnonzero(y == 3)[:37]
    parts = P.classes(y, 10, 2, 5, exclude=ex)
    assert not np.intersect1d(np.concatenate(parts), ex).size
    for p in parts:
        assert len(np.unique(y[p])) == 2


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=2, max_size=8), n=st.integers(1, 9),
       c_sel=st.integers(1, 5), seed=st.integers(0, 5))
def test_classes_property(counts: list[int], n: int, c_sel: int, seed: int) -> None:
    y = np.repeat(np.arange(len(counts)), counts)
    if len(y) == 0:
        return
    try:
        parts = P.classes(y, n, c_sel, seed)
    except ValueError as e:
        present = np.count_nonzero(counts)
        cap = sum(min(n, c) for c in counts)
        # it may only refuse when the request really is impossible
        assert c_sel > int(y.max()) + 1 or c_sel > present or n > len(y) or cap < n * c_sel, str(e)
        return
    assert len(parts) == n
    assert_disjoint_sorted(parts)
    assert len({len(p) for p in parts}) == 1
    assert all(len(np.unique(y[p])) == c_sel for p in parts)


def test_classes_impossible_requests() -> None:
    y = balanced(10, 100)
    with pytest.raises(ValueError, match="c_sel"):
        P.classes(y, 10, 11, 0)
    with pytest.raises(ValueError, match="c_sel"):
        P.classes(y, 10, 0, 0)
    y3 = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="impossible.*shards"):
        P.classes(y3, 2, 2, 0)  # 4 class-pure shards needed, the three classes hold one sample each
    with pytest.raises(ValueError, match="after exclude"):
        P.classes(y, 10, 2, 0, exclude=np.flatnonzero(y >= 1))  # only class 0 is left


# ------------------------------------------------------------------------------------------ dirichlet


def test_dirichlet_min_size_all_assigned_deterministic() -> None:
    y = balanced(10, 60)
    parts = P.dirichlet(y, 10, 0.5, seed=0, min_size=10)
    assert_disjoint_sorted(parts)
    assert min(len(p) for p in parts) >= 10
    assert len(np.concatenate(parts)) == len(y)
    again = P.dirichlet(y, 10, 0.5, seed=0, min_size=10)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))
    other = P.dirichlet(y, 10, 0.5, seed=1, min_size=10)
    assert not all(np.array_equal(p, q) for p, q in zip(parts, other))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    y = balanced(10, 200)

    def mean_entropy(parts: list[np.ndarray]) -> float:
        h = []
        for p in parts:
            q = np.bincount(y[p], minlength=10) / len(p)
            q = q[q > 0]
            h.append(-(q * np.log(q)).sum())
        return float(np.mean(h))

    assert mean_entropy(P.dirichlet(y, 10, 0.1, 0)) < mean_entropy(P.dirichlet(y, 10, 100.0, 0))


def test_dirichlet_exclude_and_errors() -> None:
    y = balanced()
    ex = np.arange(50)
    parts = P.dirichlet(y, 5, 1.0, 0, exclude=ex)
    assert not np.intersect1d(np.concatenate(parts), ex).size
    assert len(np.concatenate(parts)) == len(y) - 50
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            P.dirichlet(y, 10, bad, 0)
    with pytest.raises(ValueError, match="min_size"):
        P.dirichlet(y, 10, 1.0, 0, min_size=101)
    with pytest.raises(ValueError, match="no draw"):
        P.dirichlet(np.zeros(30, np.int64), 10, 0.01, 0, min_size=3, max_tries=5)


# ------------------------------------------------------------------------------------------ common errors


@pytest.mark.parametrize("fn", [lambda y, n: P.iid(y, n, 0), lambda y, n: P.classes(y, n, 1, 0),
                                lambda y, n: P.dirichlet(y, n, 1.0, 0)])
def test_bad_n(fn) -> None:
    y = balanced(2, 5)
    for n in (0, -3):
        with pytest.raises(ValueError, match="n "):
            fn(y, n)
    with pytest.raises(ValueError, match="n = 11 clients"):
        fn(y, 11)


def test_exclude_out_of_range() -> None:
    with pytest.raises(ValueError, match="exclude"):
        P.iid(balanced(), 2, 0, exclude=[5000])


# ------------------------------------------------------------------------------------------ manifest / io


def test_manifest_and_save_load(tmp_path: Path) -> None:
    y = balanced()
    ex = np.arange(10)
    parts = P.classes(y, 10, 2, 0, exclude=ex)
    m = P.manifest(parts, y, 0, "classes", {"c_sel": 2}, exclude=ex)
    assert m["sizes"] == [len(p) for p in parts] and m["n_excluded"] == 10
    assert m["n_assigned"] + m["n_dropped"] + m["n_excluded"] == 1000
    assert all(sum(h) == s for h, s in zip(m["class_hist"], m["sizes"]))
    npz, js = P.save_partition(tmp_path / "part" / "p", parts, m)
    assert npz.name == "p.npz" and js.name == "p.json"
    assert sorted(x.name for x in npz.parent.iterdir()) == ["p.json", "p.npz"]  # no temp files left
    back, m2 = P.load_partition(tmp_path / "part" / "p.npz")
    assert all(np.array_equal(p, q) for p, q in zip(parts, back))
    assert m2 == json.loads(json.dumps(m))
    with np.load(npz, allow_pickle=False) as z:
        assert set(z.files) == {"indices", "offsets"}
    js.unlink()
    with pytest.raises(FileNotFoundError, match="p.json"):
        P.load_partition(tmp_path / "part" / "p")


def test_manifest_rejects_overlap() -> None:
    y = balanced()
    with pytest.raises(ValueError, match="overlap"):
        P.manifest([np.array([1, 2]), np.array([2, 3])], y, 0, "iid")


# ------------------------------------------------------------------------- partition key (experiment)


def test_partition_key_uses_the_resolved_aux_class() -> None:
    from robustfl.fl import experiment as X
    from robustfl.config import RunConfig

    def cfg(**kw: object) -> RunConfig:
        return RunConfig(dataset="cifar10", **kw)

    bd = {"attack": "krum_backdoor", "n_attackers": 1}
    free = X.partition_key(cfg())
    assert "_aux10c1train_" in free
    # cells whose aux class resolves to 1 share the attack-free cells' partition
    assert X.partition_key(cfg(**bd)) == X.partition_key(cfg(**bd, backdoor="trojan", backdoor_mode="multiple")) == free
    assert X.partition_key(cfg(attack="krum_untargeted", n_attackers=3, backdoor_mode="multiple")) == free
    with pytest.warns(UserWarning, match="aux_class 1"):
        assert X.partition_key(cfg(**bd, backdoor_mode="multiple", aux_class=1)) == free
    multi = X.partition_key(cfg(**bd, backdoor_mode="multiple"))  # green cars use class 1: aux class 0
    assert "_aux10c0train_" in multi and multi == X.partition_key(cfg(aux_class=0))
    # the partition rule's parameters rebuild the same key without the attack fields
    for c in (cfg(), cfg(**bd, backdoor_mode="multiple"), cfg(partition="classes", partition_params={"c_sel": 2})):
        fields = X.partition_fields(c)
        assert set(fields) == set(X.PARTITION_FIELDS)
        assert X.partition_key(RunConfig.from_dict(fields)) == X.partition_key(c)
