"""GPU batch mode (config ``pack: N``, N > 1): a study's runs that are not done yet, dealt into pack jobs
of at most N runs, each one process training its runs' clients together
(:func:`robustfl.fl.experiment.run_cells`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable

from robustfl.fl import experiment as rx
from robustfl.pipeline.outputs import run_done
from robustfl.pipeline.study import Cell


@dataclasses.dataclass(frozen=True)
class Pack:
    """One pack job: its rule name (a digest of its members), dataset and (cell id, seed) members."""

    name: str
    dataset: str
    members: tuple[tuple[str, int], ...]


def plan_packs(cells: Iterable[Cell], size: int, results: str) -> list[Pack]:
    """The runs (cell x seed) of ``cells`` not done under ``results``, grouped by
    :func:`robustfl.fl.experiment.pack_group` (same dataset, model, local training, number of clients and
    partition) and dealt round-robin into packs of at most ``size`` runs, so the costly attack cells
    spread over the packs. Runs done are left out: a rerun after an interruption packs only what is
    missing."""
    by_id = {c.id: c for c in cells}
    groups: dict[str, list[tuple[str, int]]] = {}
    for c in sorted(by_id.values(), key=lambda c: c.id):
        for s in sorted(c.seeds):
            if not run_done(results, c.id, s):
                key = json.dumps(rx.pack_group(c.run_config(s)), default=str)
                groups.setdefault(key, []).append((c.id, s))
    packs = []
    for key in sorted(groups):
        members = groups[key]
        k = -(-len(members) // size)
        for j in range(k):
            mem = tuple(members[j::k])
            digest = hashlib.sha1(json.dumps(mem).encode()).hexdigest()[:10]
            dataset = by_id[mem[0][0]].dataset
            packs.append(Pack(f"run_pack_{dataset}_{digest}", dataset, mem))
    return packs
