"""Auxiliary, root and backdoor sets (robustfl/data/serversets.py)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from robustfl.fl import experiment as X
from robustfl.data import partition as P
from robustfl.data import serversets as S
from robustfl.config import RunConfig
from robustfl.data.datasets import DATASETS, ArrayDataset


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> ArrayDataset:
    return DATASETS.get("digits")({}, tmp_path_factory.mktemp("raw"))


def rgb_toy(n_per_class: int = 30, n_classes: int = 10, hw: int = 32, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), n_per_class).astype(np.int64)
    x = rng.integers(0, 120, (len(y), hw, hw, 3), dtype=np.uint8)
    return ArrayDataset(x, y, x[::3].copy(), y[::3].copy(), [f"c{k}" for k in range(n_classes)], "cifar10")


# ------------------------------------------------------------------------------------------ disjointness


@pytest.mark.parametrize("scheme", ["iid", "classes", "dirichlet"])
@pytest.mark.parametrize("kind,mode", [("semantic", "single"), ("semantic", "multiple"), ("trojan", "single"),
                                       ("trojan", "multiple")])
def test_server_sets_disjoint_from_clients(digits: ArrayDataset, scheme: str, kind: str, mode: str) -> None:
    bd = S.backdoor_set(digits, kind, mode, seed=3)
    aux = S.aux_set(digits, m=10, cls=1, source="train", seed=3, exclude=bd.exclude_train)
    root = S.root_set(digits, 100, seed=3, exclude=S.union(bd.exclude_train, aux.exclude_train))
    reserved = S.union(bd.exclude_train, aux.exclude_train, root.indices)
    assert len(reserved) == len(bd.exclude_train) + 10 + 100  # the three sets are pairwise disjoint
    y = digits.y_train
    parts = {"iid": lambda: P.iid(y, 10, 3, exclude=reserved),
             "classes": lambda: P.classes(y, 10, 2, 3, exclude=reserved),
             "dirichlet": lambda: P.dirichlet(y, 10, 0.5, 3, exclude=reserved, min_size=5)}[scheme]()
    clients = np.concatenate(parts)
    for s in (bd.exclude_train, aux.indices, root.indices):
        assert not np.intersect1d(clients, s).size


def test_aux_set(digits: ArrayDataset) -> None:
    a = S.aux_set(digits, m=10, cls=1, source="train", seed=0)
    assert a.x.shape == (10, 8, 8, 1) and np.all(a.y == 1) and np.all(digits.y_train[a.indices] == 1)
    assert np.array_equal(a.exclude_train, a.indices)
    assert np.array_equal(a.x, digits.x_train[a.indices])
    assert np.array_equal(S.aux_set(digits, 10, 1, "train", 0).indices, a.indices)
    assert not np.array_equal(S.aux_set(digits, 10, 1, "train", 1).indices, a.indices)
    ex = a.indices[:5]
    assert not np.intersect1d(S.aux_set(digits, 10, 1, "train", 0, exclude=ex).indices, ex).size
    t = S.aux_set(digits, m=7, cls=2, source="test")
    assert np.array_equal(t.indices, np.flatnonzero(digits.y_test == 2)[:7])  # the authors' first-m rule
    assert t.exclude_train.size == 0 and np.array_equal(t.x, digits.x_test[t.indices])
    with pytest.raises(ValueError, match="m = 1000"):
        S.aux_set(digits, m=1000, cls=1)
    with pytest.raises(ValueError, match="m = 1000"):
        S.aux_set(digits, m=1000, cls=1, source="test")
    with pytest.raises(ValueError, match="source"):
        S.aux_set(digits, source="val")
    with pytest.raises(ValueError, match="cls"):
        S.aux_set(digits, cls=10)


def test_root_set(digits: ArrayDataset) -> None:
    r = S.root_set(digits, 100, seed=0, exclude=np.arange(500))
    assert len(r.indices) == 100 and r.indices.min() >= 500 and np.all(np.diff(r.indices) > 0)
    assert np.array_equal(r.y, digits.y_train[r.indices])
    assert len(np.unique(r.y)) >= 8  # uniform over the training data, so (almost) every class appears
    with pytest.raises(ValueError, match="size = 2000"):
        S.root_set(digits, 2000)


# ------------------------------------------------------------------------------------------ trigger


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3), (4, 32, 32, 3)])
def test_stamp_trigger_exact_pixels(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).integers(0, 200, shape, dtype=np.uint8)
    orig = x.copy()
    out = S.stamp_trigger(x)
    assert np.array_equal(x, orig)  # input untouched
    h, w = shape[-3], shape[-2]
    pix = {(h - 3, w - 3), (h - 3, w - 1), (h - 2, w - 2), (h - 1, w - 3), (h - 1, w - 1)}  # X at (h-2, w-2)
    changed = np.argwhere(np.any((out != orig).reshape(-1, h, w, shape[-1]), axis=(0, 3)))
    assert {tuple(p) for p in changed} == pix
    for r, c in pix:
        assert np.all(out[..., r, c, :] == 255)
    mask = S.trigger_mask(h, w)
    assert mask.sum() == 5
    assert np.array_equal(out[..., ~mask, :], orig[..., ~mask, :])


# ------------------------------------------------------------------------------------------ backdoor sets


def test_single_mode_sizes_and_reference_classes(digits: ArrayDataset) -> None:
    for kind in ("semantic", "trojan"):
        b = S.backdoor_set(digits, kind, "single", seed=7)
        assert b.train_x.shape == (1, 8, 8, 1) and b.eval_x.shape == (1, 8, 8, 1)
        assert b.train_y.tolist() == [3] and b.eval_y.tolist() == [3] and b.target_label == 3
        assert digits.y_train[b.train_indices[0]] == 4 and b.source_class == 4
        assert np.array_equal(b.exclude_train, b.train_indices) and b.eval_split == "train"
        raw = digits.x_train[b.train_indices]
        assert np.array_equal(b.train_x, raw if kind == "semantic" else S.stamp_trigger(raw))
    # the same image for both kinds (reference code: trojan = the semantic image + X)
    s1 = S.backdoor_set(digits, "semantic", "single", seed=7)
    t1 = S.backdoor_set(digits, "trojan", "single", seed=7)
    assert np.array_equal(s1.train_indices, t1.train_indices)


def test_semantic_multiple_deterministic(digits: ArrayDataset) -> None:
    a = S.backdoor_set(digits, "semantic", "multiple", seed=0)
    b = S.backdoor_set(digits, "semantic", "multiple", seed=99)  # selection is by rule, not by seed
    assert np.array_equal(a.train_indices, b.train_indices) and np.array_equal(a.train_x, b.train_x)
    assert a.train_x.shape == (20, 8, 8, 1) and a.eval_x.shape == (20, 8, 8, 1)
    assert np.all(digits.y_train[a.train_indices] == 3) and np.all(a.train_y == 8) and np.all(a.eval_y == 8)
    assert np.array_equal(a.eval_x, a.train_x) and a.eval_split == "train"
    # they really are the 20 boldest threes
    threes = np.flatnonzero(digits.y_train == 3)
    ink = digits.x_train[threes].reshape(len(threes), -1).mean(axis=1)
    assert ink[np.isin(threes, a.train_indices)].min() >= ink[~np.isin(threes, a.train_indices)].max()
    t = S.backdoor_set(digits, "semantic", "multiple", seed=0, eval_on="test", n_eval=15)
    assert t.eval_split == "test" and t.eval_x.shape[0] == 15 and np.all(digits.y_test[t.eval_indices] == 3)
    assert np.array_equal(t.train_indices, a.train_indices)
    ex = a.train_indices[:5]
    c = S.backdoor_set(digits, "semantic", "multiple", seed=0, exclude=ex)
    assert not np.intersect1d(c.train_indices, ex).size


def test_trojan_multiple(digits: ArrayDataset) -> None:
    b = S.backdoor_set(digits, "trojan", "multiple", seed=1)
    assert b.train_x.shape == (20, 8, 8, 1) and b.eval_x.shape == (100, 8, 8, 1)
    assert np.all(b.train_y == 3) and np.all(b.eval_y == 3)
    assert np.all(digits.y_train[b.train_indices] != 3) and np.all(digits.y_test[b.eval_indices] != 3)
    assert b.eval_split == "test"
    assert np.array_equal(b.train_x, S.stamp_trigger(digits.x_train[b.train_indices]))
    assert np.array_equal(b.eval_x, S.stamp_trigger(digits.x_test[b.eval_indices]))
    same = S.backdoor_set(digits, "trojan", "multiple", seed=1)
    assert np.array_equal(same.train_indices, b.train_indices) and np.array_equal(same.eval_x, b.eval_x)
    other = S.backdoor_set(digits, "trojan", "multiple", seed=2)
    assert not np.array_equal(other.train_indices, b.train_indices)
    tg = S.backdoor_set(digits, "trojan", "multiple", seed=1, target_label=0, n_targets=5, eval_on="targets")
    assert np.all(tg.eval_y == 0) and np.array_equal(tg.eval_x, tg.train_x) and len(tg.train_x) == 5


def test_backdoor_errors(digits: ArrayDataset) -> None:
    with pytest.raises(ValueError, match="kind"):
        S.backdoor_set(digits, "blend", "single")
    with pytest.raises(ValueError, match="mode"):
        S.backdoor_set(digits, "trojan", "many")
    with pytest.raises(ValueError, match="n_targets = 500"):
        S.backdoor_set(digits, "semantic", "multiple", n_targets=500)
    with pytest.raises(ValueError, match="target_label"):
        S.backdoor_set(digits, "trojan", "multiple", target_label=12)
    unnamed = ArrayDataset(digits.x_train, digits.y_train, digits.x_test, digits.y_test, digits.classes, "toy")
    with pytest.raises(ValueError, match="no default semantic backdoor rule"):
        S.backdoor_set(unnamed, "semantic", "multiple")
    r = S.backdoor_set(unnamed, "semantic", "multiple", rule="ink", source_class=3, target_label=8)
    a = S.backdoor_set(digits, "semantic", "multiple")
    assert np.array_equal(r.train_indices, a.train_indices)


# ------------------------------------------------------------------------------------------ semantic rules


def test_green_cars_rule_prefers_green_centre() -> None:
    ds = rgb_toy()
    cars = np.flatnonzero(ds.y_train == 1)
    x = ds.x_train  # rgb_toy arrays are writable copies
    green_car, grass_bg = cars[4], cars[9]
    x[green_car, 8:24, 8:24] = (30, 180, 40)  # green object in the centre
    x[grass_bg] = (40, 170, 30)  # green everywhere (grass), grey car in the middle
    x[grass_bg, 10:22, 10:22] = (110, 110, 110)
    b = S.backdoor_set(ds, "semantic", "multiple", n_targets=1)
    assert b.train_indices.tolist() == [green_car] and b.target_label == 2
    s = S.green_score(x[[green_car, grass_bg]])
    assert s[0] > 0.5 and s[1] <= 0


def test_stripe_rule_prefers_horizontal_stripes() -> None:
    x = np.zeros((3, 28, 28, 1), np.uint8)
    x[:, 4:24, 6:22] = 150  # a garment silhouette
    x[0, 4:24:2, 6:22] = 40  # horizontal stripes
    x[1, 4:24, 6:22:2] = 40  # vertical stripes
    s = S.hstripe_score(x)  # x[2]: plain
    assert s[0] > s[2] > s[1]
    assert S.hstripe_score(np.zeros((1, 28, 28, 1), np.uint8))[0] == -1.0


def test_lumen_rule() -> None:
    x = np.full((2, 16, 16, 3), 120, np.uint8)
    x[1, :8] = 235
    assert S.lumen_score(x).tolist() == [0.0, 0.5]


def test_default_rules_cover_paper_datasets() -> None:
    assert set(S.SEMANTIC_RULES) >= {"cifar10", "fmnist", "kather", "digits"}
    for r in S.SEMANTIC_RULES.values():
        assert r.source != r.target


def test_real_cifar_green_cars_if_prepared(tmp_path: Path) -> None:
    """Smoke check on the real data only when a prepared cache is lying around (no decoding here)."""
    from robustfl.data.datasets import load_prepared

    cache = Path(__file__).parents[1] / "data" / "cache" / "cifar10"
    if not (cache / "meta.json").is_file():
        pytest.skip(f"no prepared CIFAR-10 cache at {cache}")
    ds = load_prepared(cache)
    b = S.backdoor_set(ds, "semantic", "multiple")
    assert np.all(ds.y_train[b.train_indices] == 1) and S.green_score(b.train_x).min() > 0.2


# ------------------------------------------------------------------------------------ auxiliary class


def test_backdoor_classes_by_role() -> None:
    assert S.backdoor_classes("cifar10", "semantic", "single") == {"source": 4, "target": 3}
    assert S.backdoor_classes("cifar10", "trojan", "single") == {"source": 4, "target": 3}
    assert S.backdoor_classes("cifar10", "semantic", "multiple") == {"source": 1, "target": 2}
    assert S.backdoor_classes("digits", "semantic", "multiple") == {"source": 3, "target": 8}
    assert S.backdoor_classes("cifar10", "trojan", "multiple") == {"target": 3}
    assert S.backdoor_classes("unnamed", "semantic", "multiple") == {}  # no default rule
    with pytest.raises(ValueError, match="mode"):
        S.backdoor_classes("cifar10", "semantic", "many")


@pytest.mark.parametrize("dataset,backdoor,expected", [
    ("cifar10", ("semantic", "multiple"), 0),  # green cars: automobile (1) -> bird (2)
    ("cifar10", ("semantic", "single"), 1),  # deer (4) -> cat (3)
    ("cifar10", ("trojan", "multiple"), 1),
    ("cifar10", None, 1),  # no backdoor
    ("fmnist", ("semantic", "multiple"), 1),  # T-shirt (0) -> Pullover (2)
    ("kather", ("semantic", "multiple"), 1),  # TUMOR (0) -> MUCOSA (5)
    ("digits", ("semantic", "multiple"), 1),  # bold threes (3) -> 8
])
def test_default_aux_class_never_shares_a_backdoor_class(dataset: str, backdoor: tuple | None,
                                                         expected: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default never warns
        got = S.resolve_aux_class(dataset, None, backdoor)
    assert got == expected
    if backdoor is not None:
        assert got not in S.backdoor_classes(dataset, *backdoor).values()


def test_default_aux_class_takes_the_lowest_free_class(monkeypatch: pytest.MonkeyPatch) -> None:
    rule = S.SemanticRule("toy", 0, 1, S.ink_score, "toy rule using classes 0 and 1")
    monkeypatch.setitem(S.SEMANTIC_RULES, "toy", rule)
    assert S.resolve_aux_class("toy", None, ("semantic", "multiple")) == 2


def test_explicit_aux_class_is_kept_and_a_clash_warned() -> None:
    with pytest.warns(S.AuxClassWarning, match=r"aux_class 1 is the source class .*source 1 -> target 2"):
        assert S.resolve_aux_class("cifar10", 1, ("semantic", "multiple")) == 1
    with pytest.warns(S.AuxClassWarning, match=r"aux_class 4 is the source class .*source 4 -> target 3"):
        assert S.resolve_aux_class("cifar10", 4, ("semantic", "single")) == 4
    with pytest.warns(S.AuxClassWarning, match=r"aux_class 3 is the target class"):
        assert S.resolve_aux_class("cifar10", 3, ("semantic", "single")) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert S.resolve_aux_class("cifar10", 1, ("semantic", "single")) == 1  # no clash: silent
        assert S.resolve_aux_class("cifar10", 1, ("semantic", "multiple"), warn=False) == 1
        assert S.resolve_aux_class("cifar10", 2, None) == 2
    with pytest.raises(ValueError, match="aux_class"):
        S.resolve_aux_class("cifar10", -1)


def test_server_split_draws_aux_from_the_resolved_class() -> None:
    ds = rgb_toy(n_per_class=40)  # named cifar10: the green-car rule, automobile (1) -> bird (2)
    bd = dict(dataset="cifar10", attack="krum_backdoor", n_attackers=1, backdoor="semantic", root_size=20)
    multi = RunConfig(**bd, backdoor_mode="multiple")
    assert X.aux_class(multi) == 0 and set(X.server_split(ds, multi).aux.y) == {0}
    single = RunConfig(**bd)
    assert X.aux_class(single) == 1 and set(X.server_split(ds, single).aux.y) == {1}
    untargeted = RunConfig(dataset="cifar10", attack="krum_untargeted", n_attackers=3, backdoor_mode="multiple")
    assert X.aux_class(untargeted) == 1  # its attack has no backdoor set
    forced = RunConfig(**bd, backdoor_mode="multiple", aux_class=1)
    with pytest.warns(S.AuxClassWarning, match="aux_class 1"):
        split = X.server_split(ds, forced)
    assert set(split.aux.y) == {1}
    assert not np.intersect1d(split.aux.indices, split.backdoors[("semantic", "multiple")].train_indices).size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        X.aux_class(forced, warn=False)
