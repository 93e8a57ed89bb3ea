"""Client data partitions: pure functions of (labels, n, parameters, seed) -> list of sorted index arrays.

* :func:`iid` - one random permutation cut into ``n`` equal parts (paper Section 6.1, reference code).
* :func:`classes` - Sattler et al. 2019 (paper Section 7.3.2): every client holds exactly ``c_sel``
  distinct classes, non-overlapping, balanced (same number of samples per client).
* :func:`dirichlet` - per class, client proportions ~ Dir(alpha) (Hsu et al. 2019 style label skew).

``exclude`` holds indices reserved for the server (auxiliary set, root set, backdoor targets); they never go
to a client. Randomness comes only from ``np.random.default_rng(seed)``. Partitions are saved as one
``.npz`` (no pickle) plus a ``.json`` manifest, both written atomically.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from robustfl.io import atomic_open, atomic_write_text

__all__ = ["iid", "classes", "dirichlet", "manifest", "save_partition", "load_partition", "PARTITIONS"]


def _check_common(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if len(labels) and labels.min() < 0:
        raise ValueError("labels must be >= 0")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (number of clients) must be an integer >= 1, got {n!r}")
    return labels


def available_mask(n_total: int, exclude: Any) -> np.ndarray:
    """Boolean mask of the indices 0..n_total-1 not in ``exclude`` (which must be valid indices)."""
    mask = np.ones(n_total, dtype=bool)
    if exclude is not None:
        ex = np.asarray(exclude, dtype=np.int64).ravel()
        if len(ex) and (ex.min() < 0 or ex.max() >= n_total):
            raise ValueError(f"exclude holds indices outside 0..{n_total - 1}")
        mask[ex] = False
    return mask


def _pool(labels: np.ndarray, exclude: Any) -> np.ndarray:
    """Indices that may go to clients: all minus ``exclude``."""
    return np.flatnonzero(available_mask(len(labels), exclude))


def iid(labels: np.ndarray, n: int, seed: int, exclude: Any = None) -> list[np.ndarray]:
    """One random permutation of the (non-excluded) pool cut into ``n`` equal parts.

    The remainder ``len(pool) mod n`` (the last indices of the permutation) is dropped, so every client holds
    exactly ``len(pool) // n`` samples.
    """
    labels = _check_common(labels, n)
    pool = _pool(labels, exclude)
    if n > len(pool):
        raise ValueError(f"n = {n} clients but only {len(pool)} samples are available (after exclude)")
    rng = np.random.default_rng(seed)
    perm = pool[rng.permutation(len(pool))]
    size = len(pool) // n
    return [np.sort(perm[i * size:(i + 1) * size]) for i in range(n)]


def classes(labels: np.ndarray, n: int, c_sel: int, seed: int, exclude: Any = None) -> list[np.ndarray]:
    """Sattler et al. (2019): every client gets samples of exactly ``c_sel`` distinct classes, balanced.

    Scheme: the pool is cut into ``n * c_sel`` class-pure shards of one common size ``s``; each class ``k``
    contributes ``q_k`` shards with ``sum q_k = n * c_sel`` and ``q_k <= n`` (a class can be held by at most
    ``n`` clients, each once). The shards are laid out class by class (classes in a seeded random order) and
    shard ``t`` goes to slot ``t mod n``; since every class occupies a contiguous run of at most ``n``
    shards, the ``c_sel`` shards of a slot (``t, t + n, ...``) are of distinct classes. Slots are then
    shuffled onto clients. ``s`` is the largest size for which such ``q_k`` exist; shards are spread over
    classes as evenly as their sizes allow (balanced labels: ``q_k = n * c_sel / C``). Samples that do not
    fit in a shard are dropped. Raises ``ValueError`` when no assignment exists.
    """
    labels = _check_common(labels, n)
    if isinstance(c_sel, bool) or not isinstance(c_sel, (int, np.integer)) or c_sel < 1:
        raise ValueError(f"c_sel (classes per client) must be an integer >= 1, got {c_sel!r}")
    pool = _pool(labels, exclude)
    n_classes_total = int(labels.max()) + 1 if len(labels) else 0
    if c_sel > n_classes_total:
        raise ValueError(f"c_sel = {c_sel} exceeds the number of classes ({n_classes_total})")
    if n > len(pool):
        raise ValueError(f"n = {n} clients but only {len(pool)} samples are available (after exclude)")
    present = np.unique(labels[pool])
    counts = np.array([np.count_nonzero(labels[pool] == k) for k in present])
    if c_sel > len(present):
        raise ValueError(f"c_sel = {c_sel} but only {len(present)} classes have samples left after exclude")
    n_shards = n * c_sel

    def capacity(s: int) -> np.ndarray:
        return np.minimum(n, counts // s)

    if capacity(1).sum() < n_shards:
        raise ValueError(
            f"classes partition impossible: n * c_sel = {n} * {c_sel} = {n_shards} class-pure shards are needed, "
            f"each class can serve at most min(n, its sample count) clients, and these sum to only "
            f"{int(capacity(1).sum())} (class counts {dict(zip(present.tolist(), counts.tolist()))})")
    lo, hi = 1, int(counts.max())  # largest s with sum(capacity(s)) >= n_shards (monotone in s)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if capacity(mid).sum() >= n_shards:
            lo = mid
        else:
            hi = mid - 1
    s = lo
    cap = capacity(s)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(present))  # which classes get the extra shards / the layout order
    q = np.zeros(len(present), dtype=np.int64)
    remaining = n_shards
    while remaining:  # round-robin water filling: classes differ by at most one shard where capacity allows
        progressed = False
        for j in order:
            if remaining and q[j] < cap[j]:
                q[j] += 1
                remaining -= 1
                progressed = True
        assert progressed  # guaranteed by sum(cap) >= n_shards
    shards: list[np.ndarray] = []
    for j in order:
        if q[j] == 0:
            continue
        idx = pool[labels[pool] == present[j]]
        idx = idx[rng.permutation(len(idx))][: q[j] * s]
        shards.extend(np.split(idx, q[j]))
    slots: list[list[np.ndarray]] = [[] for _ in range(n)]
    for t, sh in enumerate(shards):
        slots[t % n].append(sh)
    clients = rng.permutation(n)
    parts: list[np.ndarray] = [np.empty(0, np.int64)] * n
    for slot, cl in enumerate(clients):
        parts[cl] = np.sort(np.concatenate(slots[slot]))
    for p in parts:  # the guarantee, checked
        assert len(np.unique(labels[p])) == c_sel and len(p) == c_sel * s
    return parts


def dirichlet(labels: np.ndarray, n: int, alpha: float, seed: int, exclude: Any = None, min_size: int = 1,
              max_tries: int = 1000) -> list[np.ndarray]:
    """Label-skewed split: for every class, client proportions ~ Dir(alpha * 1_n).

    The draw is repeated (same generator, bounded by ``max_tries``) until every client holds at least
    ``min_size`` samples; all pool samples are assigned.
    """
    labels = _check_common(labels, n)
    if not (isinstance(alpha, (int, float, np.floating, np.integer)) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}")
    pool = _pool(labels, exclude)
    if n > len(pool):
        raise ValueError(f"n = {n} clients but only {len(pool)} samples are available (after exclude)")
    if n * min_size > len(pool):
        raise ValueError(f"min_size = {min_size} for n = {n} clients needs {n * min_size} samples, only "
                         f"{len(pool)} are available")
    rng = np.random.default_rng(seed)
    by_class = [pool[labels[pool] == k] for k in np.unique(labels[pool])]
    for _ in range(max_tries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(n)]
        for idx in by_class:
            idx = idx[rng.permutation(len(idx))]
            p = rng.dirichlet(np.full(n, float(alpha)))
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                buckets[i].append(chunk)
        parts = [np.sort(np.concatenate(b)) if b else np.empty(0, np.int64) for b in buckets]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(f"dirichlet partition: no draw in {max_tries} tries gave every one of n = {n} clients at "
                     f"least min_size = {min_size} samples (alpha = {alpha}); raise alpha or lower min_size")


#: config name -> function, for ``RunConfig.partition`` / ``partition_params``
PARTITIONS = {"iid": iid, "classes": classes, "dirichlet": dirichlet}


def manifest(parts: list[np.ndarray], labels: np.ndarray, seed: int, scheme: str,
             params: dict[str, Any] | None = None, exclude: Any = None) -> dict[str, Any]:
    """A JSON-able description: sizes, per-client class histogram, totals (and a check of disjointness)."""
    labels = np.asarray(labels)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    allidx = np.concatenate(parts) if parts else np.empty(0, np.int64)
    if len(np.unique(allidx)) != len(allidx):
        raise ValueError("partition parts overlap")
    n_excl = 0 if exclude is None else int(len(np.unique(np.asarray(exclude))))
    return {
        "scheme": scheme,
        "seed": int(seed),
        "params": dict(params or {}),
        "n_clients": len(parts),
        "n_total": int(len(labels)),
        "n_excluded": n_excl,
        "n_assigned": int(len(allidx)),
        "n_dropped": int(len(labels) - n_excl - len(allidx)),
        "num_classes": n_classes,
        "sizes": [int(len(p)) for p in parts],
        "class_hist": [np.bincount(labels[p], minlength=n_classes).astype(int).tolist() for p in parts],
        "classes_per_client": [int(np.count_nonzero(np.bincount(labels[p], minlength=n_classes))) for p in parts],
    }


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    base = p.with_suffix("") if p.suffix in (".npz", ".json") else p
    return base.with_name(base.name + ".npz"), base.with_name(base.name + ".json")


def save_partition(path: str | os.PathLike, parts: list[np.ndarray], manifest: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<path>.npz`` (``indices`` concatenated + ``offsets``) then ``<path>.json`` (the manifest, the
    completion marker), each atomically (temp file + ``os.replace``)."""
    npz, js = _paths(path)
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
    indices = np.concatenate(parts) if parts else np.empty(0, np.int64)
    with atomic_open(npz, "wb") as f:
        np.savez(f, indices=indices, offsets=offsets)
    m = dict(manifest)
    m["sizes"] = [int(len(p)) for p in parts]
    atomic_write_text(js, json.dumps(m, indent=1, sort_keys=True))
    return npz, js


def load_partition(path: str | os.PathLike) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Read a partition written by :func:`save_partition` (``allow_pickle=False``); checks sizes vs manifest."""
    npz, js = _paths(path)
    if not js.is_file():
        raise FileNotFoundError(f"{js} is missing: the partition at {npz} was never completely written")
    m = json.loads(js.read_text())
    with np.load(npz, allow_pickle=False) as z:
        indices, offsets = z["indices"], z["offsets"]
    parts = [indices[offsets[i]:offsets[i + 1]].copy() for i in range(len(offsets) - 1)]
    if [len(p) for p in parts] != list(m.get("sizes", [])):
        raise ValueError(f"{npz} does not match its manifest {js} (sizes differ); rebuild the partition")
    return parts, m
