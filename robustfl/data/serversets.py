"""Server-side and attacker-side data sets, carved out of an :class:`~robustfl.data.datasets.ArrayDataset`.

* :func:`aux_set` - FLARE's auxiliary set D: ``m`` clean samples of one class (Section 3.1 / 6.1).
* :func:`root_set` - FLTrust's root data set (Cao et al. 2021: 100 clean samples drawn uniformly from the
  training data).
* :func:`backdoor_set` - the targeted inputs of the backdoor attacks (Bhagoji et al. 2019 as used by the
  FLARE authors' code): semantic or trojan, ``single`` or ``multiple``.
* :func:`resolve_aux_class` - the auxiliary set's class: never one the backdoor set is built from, unless given.

Every function is deterministic in its ``seed``. Training indices a set reserves are returned so that the
partition can leave them out of every client (``exclude=``). Typical order (each excludes the previous)::

    bd = backdoor_set(ds, "semantic", "single", seed=s)
    cls = resolve_aux_class(ds.name, None, ("semantic", "single"))
    aux = aux_set(ds, m=10, cls=cls, source="train", seed=s, exclude=bd.exclude_train)
    root = root_set(ds, 100, seed=s, exclude=union(bd.exclude_train, aux.exclude_train))
    parts = partition.iid(ds.y_train, n, s, exclude=union(bd.exclude_train, aux.exclude_train, root.indices))

All choices are recorded in ``docs/decisions/data.md``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import warnings

import numpy as np

from robustfl.data.datasets import ArrayDataset
from robustfl.data.partition import available_mask

__all__ = [
    "AUX_CLASS", "AuxClassWarning", "AuxSet", "RootSet", "BackdoorSet", "SemanticRule", "SEMANTIC_RULES",
    "TRIGGER_OFFSETS", "aux_set", "backdoor_classes", "resolve_aux_class", "root_set", "backdoor_set",
    "split_trigger", "stamp_trigger", "trigger_mask", "semantic_scores", "semantic_ranking", "union",
]

# reference code, objective `single`: one image of class 4 relabelled to class 3 (fmnist: Coat -> Dress)
SINGLE_SOURCE = 4
SINGLE_TARGET = 3
TROJAN_TARGET = 3  # trojan `multiple`: fixed target class (the reference code draws one at random)
TROJAN_N_EVAL = 100  # reference code `target_backdoor`: 100 stamped test images for evaluation


def union(*arrays: Any) -> np.ndarray:
    """Sorted unique int64 union of index arrays (``None`` entries ignored)."""
    parts = [np.asarray(a, dtype=np.int64).ravel() for a in arrays if a is not None]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)


def _check_class(ds: ArrayDataset, k: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < ds.num_classes:
        raise ValueError(f"{what} must be a class index in 0..{ds.num_classes - 1} of {ds.name}, got {k!r}")
    return int(k)


# --------------------------------------------------------------------------------------------------
# auxiliary set (FLARE) and root set (FLTrust)
# --------------------------------------------------------------------------------------------------


@dataclass
class AuxSet:
    """FLARE's auxiliary set D: ``x`` uint8 (m, H, W, C), ``y`` int64 (m,), indices into ``source``'s split."""

    x: np.ndarray
    y: np.ndarray
    indices: np.ndarray
    source: str  # "train" (held out of the clients' data) or "test" (reference code)

    @property
    def exclude_train(self) -> np.ndarray:
        """Training indices to keep away from clients (empty when the set comes from the test split)."""
        return self.indices if self.source == "train" else np.empty(0, np.int64)


def aux_set(ds: ArrayDataset, m: int = 10, cls: int = 1, source: str = "train", seed: int = 0,
            exclude: Any = None) -> AuxSet:
    """``m`` clean samples of class ``cls``.

    ``source="train"``: drawn uniformly (seeded) from the training images of ``cls`` not in ``exclude``;
    the caller removes ``.exclude_train`` from the clients' data. ``source="test"``: the first ``m`` test
    images of ``cls`` (the FLARE authors' code), ``seed`` and ``exclude`` unused.
    """
    cls = _check_class(ds, cls, "cls")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"m must be an integer >= 1, got {m!r}")
    if source == "train":
        avail = np.flatnonzero(available_mask(len(ds.y_train), exclude) & (np.asarray(ds.y_train) == cls))
        if m > len(avail):
            raise ValueError(f"aux set: m = {m} but only {len(avail)} training images of class {cls} are available")
        idx = np.sort(np.random.default_rng(seed).choice(avail, size=m, replace=False))
        x, y = ds.x_train[idx], ds.y_train[idx]
    elif source == "test":
        avail = np.flatnonzero(np.asarray(ds.y_test) == cls)
        if m > len(avail):
            raise ValueError(f"aux set: m = {m} but only {len(avail)} test images of class {cls} exist")
        idx = avail[:m]
        x, y = ds.x_test[idx], ds.y_test[idx]
    else:
        raise ValueError(f"aux set: source must be 'train' or 'test', got {source!r}")
    return AuxSet(np.array(x), np.array(y, dtype=np.int64), idx.astype(np.int64), source)


@dataclass
class RootSet:
    """FLTrust's root data set (training indices, disjoint from the clients' data)."""

    x: np.ndarray
    y: np.ndarray
    indices: np.ndarray


def root_set(ds: ArrayDataset, size: int = 100, seed: int = 0, exclude: Any = None) -> RootSet:
    """``size`` training samples drawn uniformly without replacement from those not in ``exclude``."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"root set size must be an integer >= 1, got {size!r}")
    avail = np.flatnonzero(available_mask(len(ds.y_train), exclude))
    if size > len(avail):
        raise ValueError(f"root set: size = {size} but only {len(avail)} training samples are available")
    idx = np.sort(np.random.default_rng(seed).choice(avail, size=size, replace=False)).astype(np.int64)
    return RootSet(np.array(ds.x_train[idx]), np.array(ds.y_train[idx], dtype=np.int64), idx)


# --------------------------------------------------------------------------------------------------
# trojan trigger
# --------------------------------------------------------------------------------------------------

#: the reference code's 5-pixel "X" centred at (rows - 2, cols - 2): (row offset, col offset) from the
#: bottom-right corner (H - 1, W - 1)
TRIGGER_OFFSETS = ((-2, -2), (-2, 0), (-1, -1), (0, -2), (0, 0))


def trigger_mask(h: int, w: int) -> np.ndarray:
    """bool (h, w): True on the trigger's pixels."""
    if h < 3 or w < 3:
        raise ValueError(f"the 3x3 X trigger needs images of at least 3x3, got {h}x{w}")
    m = np.zeros((h, w), dtype=bool)
    for dr, dc in TRIGGER_OFFSETS:
        m[h - 1 + dr, w - 1 + dc] = True
    return m


def stamp_trigger(x: np.ndarray, value: int = 255) -> np.ndarray:
    """A copy of uint8 image(s) ``(H, W, C)`` or ``(N, H, W, C)`` with the X trigger set to ``value`` in every
    channel; all other pixels are unchanged."""
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ValueError(f"stamp_trigger expects uint8 (H, W, C) or (N, H, W, C), got {x.dtype} {x.shape}")
    out = np.array(x, copy=True)
    h, w = out.shape[-3], out.shape[-2]
    out[..., trigger_mask(h, w), :] = value
    return out


def split_trigger(mask: np.ndarray, n_parts: int) -> list[np.ndarray]:
    """The trigger ``mask`` (bool ``(h, w)``, e.g. :func:`trigger_mask`) cut into ``n_parts`` local triggers,
    DBA's decomposition of a global trigger (Xie et al., ICLR 2020, Sec. 2.2): its pixels in row-major order
    split into ``n_parts`` consecutive runs whose sizes differ by at most one (the first ones larger). The
    parts are disjoint and their union is ``mask``. Needs ``1 <= n_parts <=`` the trigger's pixel count."""
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.ndim != 2:
        raise ValueError(f"split_trigger expects a bool (h, w) mask, got {mask.dtype} {mask.shape}")
    pixels = np.flatnonzero(mask)
    if isinstance(n_parts, bool) or not isinstance(n_parts, (int, np.integer)) or not 1 <= n_parts <= len(pixels):
        raise ValueError(f"the trigger has {len(pixels)} pixels: n_parts must be an integer in 1..{len(pixels)}, "
                         f"got {n_parts!r}")
    parts = []
    for run in np.array_split(pixels, int(n_parts)):
        part = np.zeros(mask.size, dtype=bool)
        part[run] = True
        parts.append(part.reshape(mask.shape))
    return parts


# --------------------------------------------------------------------------------------------------
# semantic rules: reproducible pixel rules that pick inputs sharing a natural feature
# --------------------------------------------------------------------------------------------------


def _grey(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] == 1:
        return x[..., 0]
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def green_score(x: np.ndarray) -> np.ndarray:
    """Green-dominant area of the image centre minus that of its border: a pixel is green when G > R + 16,
    G > B + 16 and G >= 48 (0..255); the centre is the middle half of each side, the border the outer ring
    of width max(1, side // 8). High for green-painted cars, low for cars on grass or under trees."""
    c = np.asarray(x)[..., :3].astype(np.int16)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    green = (g > r + 16) & (g > b + 16) & (g >= 48)
    h, w = green.shape[1:3]
    centre = green[:, h // 4:h - h // 4, w // 4:w - w // 4].reshape(len(c), -1).mean(axis=1)
    ring = np.ones((h, w), dtype=bool)
    bw = max(1, min(h, w) // 8)
    ring[bw:h - bw, bw:w - bw] = False
    return centre - green[:, ring].mean(axis=1)


def hstripe_score(x: np.ndarray) -> np.ndarray:
    """Horizontal-stripe energy inside the garment: mean |vertical gradient| - mean |horizontal gradient| over
    the eroded silhouette (rows filled between their first and last pixel > 8), in units of 1/255.
    Images with fewer than 30 interior pixels score -1."""
    g = _grey(x)
    fg = g > 8
    n, h, w = fg.shape
    cols = np.arange(w)
    any_row = fg.any(axis=2)
    first = np.where(any_row, fg.argmax(axis=2), w)
    last = np.where(any_row, w - 1 - fg[:, :, ::-1].argmax(axis=2), -1)
    sil = (cols[None, None, :] >= first[..., None]) & (cols[None, None, :] <= last[..., None])
    inner = sil.copy()  # 4-neighbour erosion, one pixel
    inner[:, 1:, :] &= sil[:, :-1, :]
    inner[:, :-1, :] &= sil[:, 1:, :]
    inner[:, :, 1:] &= sil[:, :, :-1]
    inner[:, :, :-1] &= sil[:, :, 1:]
    inner[:, [0, -1], :] = False
    inner[:, :, [0, -1]] = False
    dy = np.abs(g[:, 1:, :] - g[:, :-1, :])
    dx = np.abs(g[:, :, 1:] - g[:, :, :-1])
    my = inner[:, 1:, :] & inner[:, :-1, :]
    mx = inner[:, :, 1:] & inner[:, :, :-1]
    cnt = inner.reshape(n, -1).sum(axis=1)
    sy = (dy * my).reshape(n, -1).sum(axis=1) / np.maximum(my.reshape(n, -1).sum(axis=1), 1)
    sx = (dx * mx).reshape(n, -1).sum(axis=1) / np.maximum(mx.reshape(n, -1).sum(axis=1), 1)
    return np.where(cnt >= 30, (sy - sx) / 255.0, -1.0)


def lumen_score(x: np.ndarray) -> np.ndarray:
    """Fraction of near-white pixels (every channel >= 200): open lumen / empty space in a histology tile."""
    x = np.asarray(x)
    return (x[..., :3].min(axis=-1) >= 200).reshape(len(x), -1).mean(axis=1)


def ink_score(x: np.ndarray) -> np.ndarray:
    """Mean intensity (ink mass): high for bold, thick-stroke digits."""
    return _grey(x).reshape(len(x), -1).mean(axis=1) / 255.0


@dataclass(frozen=True)
class SemanticRule:
    """Inputs of ``source`` class ranked by ``score`` (descending, ties by index) and relabelled ``target``."""

    name: str
    source: int
    target: int
    score: Callable[[np.ndarray], np.ndarray]
    description: str


#: per dataset name: the default semantic backdoor (docs/decisions/data.md says why each)
SEMANTIC_RULES: dict[str, SemanticRule] = {
    "cifar10": SemanticRule("green_cars", 1, 2, green_score,
                            "green cars (automobiles whose centre is most green-dominant relative to their "
                            "border) -> bird, as Bagdasaryan et al. 2020"),
    "fmnist": SemanticRule("striped_tops", 0, 2, hstripe_score,
                           "striped T-shirts/tops (largest horizontal-stripe energy) -> Pullover ('sweater', "
                           "the paper's Section 7.1.1 example)"),
    "kather": SemanticRule("lumen_tumour", 0, 5, lumen_score,
                           "tumour tiles with the most open lumen (near-white area) -> normal mucosa (the "
                           "paper's 'tumour classified as normal tissue' example)"),
    "digits": SemanticRule("bold_threes", 3, 8, ink_score, "bold threes (largest ink mass) -> 8"),
}

_SCORES = {"green_cars": green_score, "striped_tops": hstripe_score, "lumen_tumour": lumen_score,
           "bold_threes": ink_score, "green": green_score, "hstripe": hstripe_score, "lumen": lumen_score,
           "ink": ink_score}


def _rule(ds: ArrayDataset, rule: str | SemanticRule | None) -> SemanticRule:
    if isinstance(rule, SemanticRule):
        return rule
    if rule is None:
        if ds.name not in SEMANTIC_RULES:
            raise ValueError(f"no default semantic backdoor rule for dataset {ds.name!r} (known: "
                             f"{sorted(SEMANTIC_RULES)}); pass rule=SemanticRule(...) or a score name "
                             f"{sorted(_SCORES)} with source_class and target_label")
        return SEMANTIC_RULES[ds.name]
    for r in SEMANTIC_RULES.values():
        if r.name == rule:
            return r
    if rule in _SCORES:
        return SemanticRule(rule, -1, -1, _SCORES[rule], f"score {rule}")
    raise ValueError(f"unknown semantic rule {rule!r}; known: {sorted(_SCORES)}")


def semantic_scores(x: np.ndarray, rule: SemanticRule, batch: int = 4096) -> np.ndarray:
    return np.concatenate([rule.score(np.asarray(x[i:i + batch])) for i in range(0, len(x), batch)]) \
        if len(x) else np.empty(0)


def semantic_ranking(x: np.ndarray, y: np.ndarray, source: int, rule: SemanticRule,
                     available: np.ndarray | None = None) -> np.ndarray:
    """Indices of class-``source`` images (optionally only where ``available``), best score first,
    ties broken by the lower index."""
    cand = np.flatnonzero((np.asarray(y) == source) & (True if available is None else available))
    if not len(cand):
        return cand.astype(np.int64)
    s = semantic_scores(x[cand], rule)
    return cand[np.lexsort((cand, -s))].astype(np.int64)


# --------------------------------------------------------------------------------------------------
# backdoor sets
# --------------------------------------------------------------------------------------------------


@dataclass
class BackdoorSet:
    """The targeted inputs of a backdoor attack.

    ``train_x``/``train_y``: uint8 images the attacker trains on (trigger already stamped for trojan) and
    their target labels. ``eval_x``/``eval_y``: the targeted inputs and target labels on which ASR and target
    confidence are measured. ``exclude_train``: training indices removed from every client's data.
    """

    kind: str
    mode: str
    train_x: np.ndarray
    train_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    exclude_train: np.ndarray
    train_indices: np.ndarray  # into the training split
    eval_indices: np.ndarray  # into ``eval_split``
    eval_split: str  # "train" (the targets themselves) or "test" (held-out inputs)
    target_label: int
    source_class: int | None  # None: any class but the target
    description: str
    true_labels: dict[str, np.ndarray] = field(default_factory=dict)  # original labels of train/eval inputs


def backdoor_set(ds: ArrayDataset, kind: str = "semantic", mode: str = "single", seed: int = 0,
                 n_targets: int = 20, target_label: int | None = None, n_eval: int | None = None, *,
                 source_class: int | None = None, eval_on: str | None = None,
                 rule: str | SemanticRule | None = None, exclude: Any = None) -> BackdoorSet:
    """Build the backdoor inputs (see docs/decisions/data.md).

    * ``single`` (both kinds): one training image of ``source_class`` (default 4) drawn with ``seed``,
      relabelled ``target_label`` (default 3); trojan stamps the X trigger. Trained on and evaluated
      (reference code), so per-round ASR is 0 or 1.
    * ``semantic`` + ``multiple``: the ``n_targets`` training images of the rule's source class with the
      highest rule score (deterministic, no seed), relabelled to the rule's target. ``eval_on="targets"``
      (default, Bhagoji et al.'s ``multiple``): the same images are evaluated; ``"test"``: the ``n_eval``
      (default ``n_targets``) highest-scoring test images of the source class.
    * ``trojan`` + ``multiple``: ``n_targets`` random training images of classes other than the target
      (default 3), stamped and relabelled; ``eval_on="test"`` (default): ``n_eval`` (default 100) random test
      images of other classes, stamped; ``"targets"``: the training targets themselves.

    ``exclude`` removes training indices from the candidates (sets built earlier).
    """
    if kind not in ("semantic", "trojan"):
        raise ValueError(f"backdoor kind must be 'semantic' or 'trojan', got {kind!r}")
    if mode not in ("single", "multiple"):
        raise ValueError(f"backdoor mode must be 'single' or 'multiple', got {mode!r}")
    if isinstance(n_targets, bool) or not isinstance(n_targets, (int, np.integer)) or n_targets < 1:
        raise ValueError(f"n_targets must be an integer >= 1, got {n_targets!r}")
    if n_eval is not None and (isinstance(n_eval, bool) or not isinstance(n_eval, (int, np.integer))
                               or n_eval < 1):
        raise ValueError(f"n_eval must be an integer >= 1, got {n_eval!r}")
    if eval_on not in (None, "targets", "test"):
        raise ValueError(f"eval_on must be 'targets' or 'test', got {eval_on!r}")
    avail = available_mask(len(ds.y_train), exclude)
    y_tr, y_te = np.asarray(ds.y_train), np.asarray(ds.y_test)
    rng = np.random.default_rng(seed)
    cname = ds.classes

    if mode == "single":
        src = _check_class(ds, SINGLE_SOURCE if source_class is None else source_class, "source_class")
        tgt = _check_class(ds, SINGLE_TARGET if target_label is None else target_label, "target_label")
        if src == tgt:
            raise ValueError(f"source_class and target_label are both {src}")
        cand = np.flatnonzero(avail & (y_tr == src))
        if not len(cand):
            raise ValueError(f"backdoor single: no available training image of class {src} ({cname[src]})")
        tr_idx = np.array([rng.choice(cand)], dtype=np.int64)
        ev_on = eval_on or "targets"
        ev_idx, ev_split = _eval_for_single(ev_on, tr_idx, y_te, src, rng, n_eval or 1)
        desc = (f"{kind} single: training image {int(tr_idx[0])} of class {src} ({cname[src]}) relabelled "
                f"{tgt} ({cname[tgt]})" + (" with the X trigger" if kind == "trojan" else ""))
    elif kind == "semantic":
        r = _rule(ds, rule)
        src = r.source if source_class is None else source_class
        tgt = r.target if target_label is None else target_label
        src = _check_class(ds, src, "source_class")
        tgt = _check_class(ds, tgt, "target_label")
        if src == tgt:
            raise ValueError(f"source_class and target_label are both {src}")
        ranked = semantic_ranking(ds.x_train, y_tr, src, r, avail)
        if n_targets > len(ranked):
            raise ValueError(f"backdoor semantic: n_targets = {n_targets} but class {src} has only "
                             f"{len(ranked)} available training images")
        tr_idx = np.sort(ranked[:n_targets])
        ev_on = eval_on or "targets"
        if ev_on == "targets":
            ev_idx, ev_split = tr_idx, "train"
        else:
            k = n_eval or n_targets
            ranked_te = semantic_ranking(ds.x_test, y_te, src, r)
            if k > len(ranked_te):
                raise ValueError(f"backdoor semantic: n_eval = {k} but class {src} has {len(ranked_te)} test images")
            ev_idx, ev_split = np.sort(ranked_te[:k]), "test"
        desc = (f"semantic multiple, rule {r.name}: {r.description}; the {n_targets} top-scoring training "
                f"images of class {src} ({cname[src]}) relabelled {tgt} ({cname[tgt]}); evaluated on "
                + ("the same images" if ev_split == "train" else f"the {len(ev_idx)} top-scoring test images"))
    else:  # trojan multiple
        tgt = _check_class(ds, TROJAN_TARGET if target_label is None else target_label, "target_label")
        src = None if source_class is None else _check_class(ds, source_class, "source_class")
        ok_tr = avail & ((y_tr != tgt) if src is None else (y_tr == src))
        cand = np.flatnonzero(ok_tr)
        if n_targets > len(cand):
            raise ValueError(f"backdoor trojan: n_targets = {n_targets} but only {len(cand)} candidates")
        tr_idx = np.sort(rng.choice(cand, size=n_targets, replace=False)).astype(np.int64)
        ev_on = eval_on or "test"
        if ev_on == "targets":
            ev_idx, ev_split = tr_idx, "train"
        else:
            k = n_eval or TROJAN_N_EVAL
            cand_te = np.flatnonzero((y_te != tgt) if src is None else (y_te == src))
            if k > len(cand_te):
                raise ValueError(f"backdoor trojan: n_eval = {k} but only {len(cand_te)} test candidates")
            ev_idx, ev_split = np.sort(rng.choice(cand_te, size=k, replace=False)).astype(np.int64), "test"
        desc = (f"trojan multiple: {n_targets} random training images of "
                + ("classes other than " + f"{tgt}" if src is None else f"class {src} ({cname[src]})")
                + f" stamped with the X trigger and relabelled {tgt} ({cname[tgt]}); evaluated on "
                + ("the same images" if ev_split == "train" else f"{len(ev_idx)} stamped test images"))

    x_src_ev = ds.x_train if ev_split == "train" else ds.x_test
    y_src_ev = y_tr if ev_split == "train" else y_te
    train_x = np.array(ds.x_train[tr_idx])
    eval_x = np.array(x_src_ev[ev_idx])
    if kind == "trojan":
        train_x, eval_x = stamp_trigger(train_x), stamp_trigger(eval_x)
    return BackdoorSet(
        kind=kind, mode=mode,
        train_x=train_x, train_y=np.full(len(tr_idx), tgt, dtype=np.int64),
        eval_x=eval_x, eval_y=np.full(len(ev_idx), tgt, dtype=np.int64),
        exclude_train=np.sort(tr_idx).astype(np.int64),
        train_indices=tr_idx, eval_indices=np.asarray(ev_idx, dtype=np.int64), eval_split=ev_split,
        target_label=int(tgt), source_class=None if src is None else int(src), description=desc,
        true_labels={"train": y_tr[tr_idx].astype(np.int64), "eval": y_src_ev[ev_idx].astype(np.int64)},
    )


def _eval_for_single(eval_on: str, tr_idx: np.ndarray, y_te: np.ndarray, src: int, rng: np.random.Generator,
                     k: int) -> tuple[np.ndarray, str]:
    if eval_on == "targets":
        return tr_idx, "train"
    cand = np.flatnonzero(y_te == src)
    if k > len(cand):
        raise ValueError(f"backdoor single: n_eval = {k} but class {src} has {len(cand)} test images")
    return np.sort(rng.choice(cand, size=k, replace=False)).astype(np.int64), "test"


# --------------------------------------------------------------------------------------------------
# the auxiliary set's class
# --------------------------------------------------------------------------------------------------

#: FLARE's auxiliary class wherever no backdoor set is built from it (reference code: class 1)
AUX_CLASS = 1


class AuxClassWarning(UserWarning):
    """An explicit auxiliary class is one the cell's backdoor set is built from."""


def backdoor_classes(dataset: str, kind: str, mode: str) -> dict[str, int]:
    """The classes the default backdoor set ``(kind, mode)`` of ``dataset`` is built from, by role.

    ``single``: {source: 4, target: 3}; semantic ``multiple``: the rule's source and target
    (:data:`SEMANTIC_RULES`; empty for a dataset without a rule); trojan ``multiple``: {target: 3} (its
    inputs are random images of every other class).
    """
    if kind not in ("semantic", "trojan"):
        raise ValueError(f"backdoor kind must be 'semantic' or 'trojan', got {kind!r}")
    if mode not in ("single", "multiple"):
        raise ValueError(f"backdoor mode must be 'single' or 'multiple', got {mode!r}")
    if mode == "single":
        return {"source": SINGLE_SOURCE, "target": SINGLE_TARGET}
    if kind == "trojan":
        return {"target": TROJAN_TARGET}
    rule = SEMANTIC_RULES.get(dataset)
    return {} if rule is None else {"source": rule.source, "target": rule.target}


def resolve_aux_class(dataset: str, aux_class: int | None = None, backdoor: tuple[str, str] | None = None,
                      *, warn: bool = True) -> int:
    """FLARE's auxiliary class for a cell on ``dataset`` whose attack uses the backdoor set
    ``backdoor = (kind, mode)`` (None: no backdoor).

    ``aux_class=None``: :data:`AUX_CLASS` unless the backdoor set is built from it, else the lowest class
    it is not built from (:func:`backdoor_classes`; CIFAR-10 semantic ``multiple``, automobile 1 -> bird 2,
    gives 0). An explicit ``aux_class`` is returned as given; where the backdoor set is built from it, an
    :class:`AuxClassWarning` names both classes (``warn=False``: silent).
    """
    used = backdoor_classes(dataset, *backdoor) if backdoor is not None else {}
    if aux_class is None:
        return next(c for c in (AUX_CLASS, *range(len(used) + 1)) if c not in used.values())
    if isinstance(aux_class, bool) or not isinstance(aux_class, (int, np.integer)) or aux_class < 0:
        raise ValueError(f"aux_class must be a class index >= 0 or None, got {aux_class!r}")
    roles = [role for role, c in used.items() if c == aux_class]
    if warn and roles and backdoor is not None:
        pair = " -> ".join(f"{role} {c}" for role, c in used.items())
        warnings.warn(f"aux_class {aux_class} is the {roles[0]} class of the {backdoor[0]} {backdoor[1]} backdoor "
                      f"on {dataset} ({pair}): FLARE's auxiliary set shares a class with the attack",
                      AuxClassWarning, stacklevel=2)
    return int(aux_class)
