"""One cell of a study, end to end: prepared data -> partition -> server sets -> simulation -> outputs.

This is the glue the Snakemake rules call (``scripts/*.py`` stay thin). A cell is a
:class:`~robustfl.config.RunConfig`; its partition depends only on the fields listed in
:data:`PARTITION_FIELDS`, so every defense and attack of the same setting and seed trains on exactly
the same client data.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from robustfl.data import partition as part
from robustfl.data import serversets
from robustfl.attacks import is_targeted
from robustfl.config import RunConfig
from robustfl.data.datasets import ArrayDataset, load_prepared
from robustfl.io import device_name, git_commit, versions
from robustfl.models import build_model, default_model
from robustfl.fl.simulate import RunData, ServerSets, Simulation, resolve_device, simulate, simulate_many, write_run_json

log = logging.getLogger("robustfl")

#: The RunConfig fields a partition depends on (the server's reserved sets are excluded from clients);
#: ``aux_class`` as resolved by :func:`aux_class`.
PARTITION_FIELDS = ("dataset", "partition", "partition_params", "n_clients", "seed", "aux_size", "aux_class",
                    "aux_source", "root_size")
#: Probe inputs whose PLRs are dumped for the PLR figures: this many test images from each of 3 classes.
PROBE_PER_CLASS = 30


def _slug(v: Any) -> str:
    if isinstance(v, dict):
        return "-".join(f"{k}{_slug(x)}" for k, x in sorted(v.items())) or "default"
    s = str(v)
    return re.sub(r"[^A-Za-z0-9.]+", "", s.replace("-", "m"))


def aux_class(cfg: RunConfig, warn: bool = True) -> int:
    """FLARE's auxiliary class of a cell: :func:`robustfl.data.serversets.resolve_aux_class` with the cell's
    backdoor set ``(backdoor, backdoor_mode)`` when its attack is targeted, none otherwise."""
    targeted = cfg.attack != "none" and is_targeted(cfg.attack)
    return serversets.resolve_aux_class(cfg.dataset, cfg.aux_class,
                                        (cfg.backdoor, cfg.backdoor_mode) if targeted else None, warn=warn)


def partition_fields(cfg: RunConfig) -> dict[str, Any]:
    """The :data:`PARTITION_FIELDS` of ``cfg`` with ``aux_class`` resolved: a RunConfig built from them
    alone has the same :func:`partition_key` (the partition rule's parameters)."""
    fields = {f: getattr(cfg, f) for f in PARTITION_FIELDS}
    fields["aux_class"] = aux_class(cfg, warn=False)
    return fields


def partition_key(cfg: RunConfig) -> str:
    """A path-safe string of exactly the fields the partition depends on (the resolved aux class)."""
    pp = _slug(cfg.partition_params) if cfg.partition_params else ""
    scheme = cfg.partition + (f"-{pp}" if pp else "")
    return (f"{scheme}_n{cfg.n_clients}_aux{cfg.aux_size}c{aux_class(cfg)}{cfg.aux_source}"
            f"_root{cfg.root_size}_seed{cfg.seed}")


def id_fields(cfg: RunConfig) -> list[tuple[str, Any]]:
    """``(name, value)`` of every field that names a cell, in the order cell ids list them: the RunConfig
    fields but ``seed`` and ``device``, with the ``engine`` mapping's keys under the names and at the
    places of the flat fields they replaced (``engine`` = its kind before ``precision``, ``conv`` and
    ``cuda_graph`` after it), so that ids of earlier runs stay what they were."""
    items: list[tuple[str, Any]] = []
    for f in dataclasses.fields(RunConfig):
        if f.name in ("seed", "device"):
            continue
        v = getattr(cfg, f.name)
        items.append(("engine", v["kind"]) if f.name == "engine" else (f.name, v))
        if f.name == "precision":
            items += [("conv", cfg.engine["conv"]), ("cuda_graph", cfg.engine["cuda_graph"])]
    return items


def cell_id(cfg: RunConfig) -> str:
    """A readable, path-safe, unique encoding of every non-seed field that differs from the defaults
    (:func:`id_fields`; the engine's keys only where they differ from theirs)."""
    parts = [f"{name}={_slug(v)}" for (name, v), (_, d) in zip(id_fields(cfg), id_fields(RunConfig())) if v != d]
    return ",".join(parts) or "default"


@dataclasses.dataclass
class ServerSplit:
    """What the server holds or holds out of the clients' pool, for one dataset and cell."""

    aux: Any  # serversets.AuxSet
    root: Any  # serversets.RootSet
    backdoors: dict[tuple[str, str], Any]  # (kind, mode) -> serversets.BackdoorSet
    reserved: np.ndarray  # every training index no client may get


def server_split(ds: ArrayDataset, cfg: RunConfig) -> ServerSplit:
    """The aux set (class :func:`aux_class`), the FLTrust root set and every training index held out of the
    clients' pool: the backdoor targets of both kinds and modes, then aux (when drawn from the training
    set) and root, each disjoint from the sets before it."""
    backdoors = {(kind, mode): serversets.backdoor_set(ds, kind=kind, mode=mode, seed=cfg.seed)
                 for kind in ("semantic", "trojan") for mode in ("single", "multiple")}
    targets = np.unique(np.concatenate([np.asarray(b.exclude_train, dtype=np.int64) for b in backdoors.values()]))
    aux = serversets.aux_set(ds, m=cfg.aux_size, cls=aux_class(cfg), source=cfg.aux_source, seed=cfg.seed,
                             exclude=targets)
    pre = np.union1d(targets, aux.exclude_train)
    root = serversets.root_set(ds, size=cfg.root_size, seed=cfg.seed, exclude=pre)
    reserved = np.unique(np.concatenate([pre, np.asarray(root.indices, dtype=np.int64)]))
    return ServerSplit(aux, root, backdoors, reserved)


def build_partition(data_dir: Path, cfg: RunConfig, out: Path) -> None:
    """Partition the client pool (training set minus the reserved indices) and save it with its manifest."""
    ds = load_prepared(data_dir)
    reserved = server_split(ds, cfg).reserved
    labels = np.asarray(ds.y_train)
    pp = dict(cfg.partition_params)
    if cfg.partition == "iid":
        parts = part.iid(labels, cfg.n_clients, cfg.seed, exclude=reserved)
    elif cfg.partition == "classes":
        parts = part.classes(labels, cfg.n_clients, int(pp.get("c_sel", 2)), cfg.seed, exclude=reserved)
    else:
        parts = part.dirichlet(labels, cfg.n_clients, float(pp.get("alpha", 0.5)), cfg.seed, exclude=reserved)
    man = part.manifest(parts, labels, cfg.seed, cfg.partition, pp)
    man.update(n_reserved=int(len(reserved)), partition_key=partition_key(cfg), dataset=cfg.dataset)
    part.save_partition(out, parts, man)


def _server_sets(ds: ArrayDataset, cfg: RunConfig, split: ServerSplit, device: torch.device) -> ServerSets:
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    def labels(a: Any) -> torch.Tensor:
        return t(np.asarray(a, dtype=np.int64))

    aux, root = split.aux, split.root
    sets = ServerSets(aux_x=t(aux.x), aux_y=labels(aux.y))
    sets.root_x, sets.root_y = t(ds.x_train[root.indices]), labels(ds.y_train[root.indices])
    if cfg.attack != "none" and is_targeted(cfg.attack):
        bd = split.backdoors[(cfg.backdoor, cfg.backdoor_mode)]
        sets.bd_train_x, sets.bd_train_y = t(bd.train_x), labels(bd.train_y)
        sets.bd_eval_x, sets.bd_eval_y = t(bd.eval_x), labels(bd.eval_y)
        sets.info["backdoor"] = bd.description
    classes = [0, 1, 2] if ds.num_classes >= 3 else list(range(ds.num_classes))
    probe = np.concatenate([np.flatnonzero(np.asarray(ds.y_test) == c)[:PROBE_PER_CLASS] for c in classes])
    sets.probe_x, sets.probe_y = t(ds.x_test[probe]), labels(ds.y_test[probe])
    sets.info.update(aux_indices=np.asarray(aux.indices).tolist(), aux_class=aux_class(cfg, warn=False),
                     aux_source=cfg.aux_source, root_size=int(len(root.indices)))
    return sets


def _setup(cfg: RunConfig, ds: ArrayDataset, partition: Path, device: torch.device,
           x_cache: dict[str, torch.Tensor]) -> tuple[RunData, str]:
    parts, man = part.load_partition(partition)
    if man.get("partition_key") not in (None, partition_key(cfg)):
        raise ValueError(f"partition {partition} was built for {man.get('partition_key')!r}, "
                         f"this cell needs {partition_key(cfg)!r}")
    split = server_split(ds, cfg)
    model_name = cfg.model or default_model(cfg.dataset)
    torch.manual_seed(cfg.seed)
    model = build_model(model_name, ds.num_classes, ds.image_shape[2], **cfg.model_params)
    if "x_train" not in x_cache:  # one copy of the data on the device, shared by packed cells
        x_cache["x_train"] = torch.from_numpy(np.array(ds.x_train)).to(device)
        x_cache["y_train"] = torch.from_numpy(np.array(ds.y_train, dtype=np.int64)).to(device)
        x_cache["x_test"] = torch.from_numpy(np.array(ds.x_test)).to(device)
        x_cache["y_test"] = torch.from_numpy(np.array(ds.y_test, dtype=np.int64)).to(device)
    data = RunData(model=model, x_train=x_cache["x_train"], y_train=x_cache["y_train"], x_test=x_cache["x_test"],
                   y_test=x_cache["y_test"], shards=[torch.as_tensor(p, dtype=torch.long) for p in parts],
                   sets=_server_sets(ds, cfg, split, device), num_classes=ds.num_classes)
    return data, model_name


def _reset_peak_memory(device: torch.device) -> None:
    # before the process's first CUDA call there is nothing to reset, and torch raises "Invalid device
    # argument" (measured on an H100 with torch 2.11: every pipeline run job failed here)
    if device.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_mem_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated by tensors of this process on ``device`` since the run began (GiB;
    None on CPU). For a packed job it is the whole pack's (``packed_cells`` runs)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _payload(cfg: RunConfig, cell: dict[str, Any] | None, final: dict[str, Any], model_name: str, device: torch.device,
             wall_s: float, partition: Path, ds: ArrayDataset, data: RunData, packed: int = 1) -> dict[str, Any]:
    return {
        "config": cfg.to_dict(), "cell": dict(cell or {}, cell_id=(cell or {}).get("cell_id", cell_id(cfg))),
        "final": final, "seed": cfg.seed, "model": model_name, "versions": versions(),
        "device": device_name(device), "git_commit": git_commit(), "wall_s": wall_s, "packed_cells": packed,
        "peak_gpu_mem_gib": peak_gpu_mem_gib(device),
        "partition": str(partition), "dataset_meta": {k: ds.meta.get(k) for k in ("source", "split", "checksums")},
        "server_sets": data.sets.info,
    }


def _ckpt(out_dir: Path, ckpt_path: Path | None) -> Path:
    return ckpt_path if ckpt_path is not None else out_dir.parent / f".{out_dir.name}.ckpt.pt"


def run_cell(cfg: RunConfig, data_dir: Path, partition: Path, out_dir: Path, cell: dict[str, Any] | None = None,
             ckpt_path: Path | None = None,
             on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one cell and write ``rounds.csv``, ``clients.csv``, ``snapshot.npz`` and ``run.json`` into
    ``out_dir`` (atomically; ``run.json`` last). Returns the final metrics; ``on_round`` as in
    :func:`robustfl.fl.simulate.simulate`."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    _reset_peak_memory(device)
    ds = load_prepared(data_dir)
    data, model_name = _setup(cfg, ds, Path(partition), device, {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("cell %s seed %d on %s: model %s, %d clients (%d attackers), attack %s, defense %s",
             (cell or {}).get("cell_id", cell_id(cfg)), cfg.seed, device, model_name, cfg.n_clients,
             cfg.n_attackers, cfg.attack, cfg.defense)
    final = simulate(cfg, data, out_dir, ckpt_path=_ckpt(out_dir, ckpt_path), device=device, on_round=on_round)
    write_run_json(out_dir, _payload(cfg, cell, final, model_name, device, time.perf_counter() - t0,
                                     Path(partition), ds, data))
    return final


def pack_key(cfg: RunConfig) -> tuple[Any, ...]:
    """Cells with the same key can be trained together in one vectorised call (:func:`run_cells`)."""
    return (cfg.dataset, cfg.model or default_model(cfg.dataset), json.dumps(cfg.model_params, sort_keys=True),
            cfg.local_epochs, cfg.effective_batch_size,
            cfg.lr, cfg.precision, cfg.engine["conv"], cfg.engine["cuda_graph"], cfg.device, cfg.rounds)


def pack_group(cfg: RunConfig) -> tuple[Any, ...]:
    """:func:`pack_key` plus what sets a client's shard size (number of clients, partition): the
    pipeline packs only runs of one group. Packed clients advance in lock-step, padded to the client
    with the most batches (:func:`robustfl.engine.train.concat_plans`): a 50-client run packed with 10-client
    runs would wait through the 10-client runs' ~5x more steps per round. ``train_vectorised`` no
    longer computes clients whose batches ran out (``skip_idle``), but those tail steps would train
    only the 10-client runs' clients, a narrower batch than a pack of their own."""
    params = json.dumps(cfg.partition_params or {}, sort_keys=True, default=str)
    return pack_key(cfg) + (cfg.n_clients, cfg.partition, params)


def run_cells(cfgs: list[RunConfig], data_dir: Path, partitions: list[Path], out_dirs: list[Path],
              cells: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run several cells of one dataset in one process, their benign clients trained together in one
    vectorised call per round (:func:`robustfl.fl.simulate.simulate_many`): the GPU batch mode. Each cell
    still writes its own outputs and checkpoints; a cell whose ``run.json`` exists is skipped."""
    if not cfgs:
        return []
    keys = {pack_key(c) for c in cfgs}
    if len(keys) != 1:
        raise ValueError(f"run_cells: cells differ in dataset/model/local-training settings: {sorted(map(str, keys))}")
    t0 = time.perf_counter()
    device = resolve_device(cfgs[0].device)
    _reset_peak_memory(device)
    ds = load_prepared(data_dir)
    cache: dict[str, torch.Tensor] = {}
    cells = cells or [{} for _ in cfgs]
    todo, sims, setups = [], [], []
    for cfg, partition, out_dir, cell in zip(cfgs, partitions, out_dirs, cells):
        out_dir = Path(out_dir)
        if (out_dir / "run.json").exists():
            log.info("cell %s seed %d already done; skipped", cell.get("cell_id", cell_id(cfg)), cfg.seed)
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        data, model_name = _setup(cfg, ds, Path(partition), device, cache)
        sims.append(Simulation(cfg, data, out_dir, _ckpt(out_dir, None), device))
        todo.append((cfg, cell, Path(partition), out_dir))
        setups.append((data, model_name))
    log.info("packed run: %d cells on %s", len(sims), device)
    finals = simulate_many(sims)
    wall = time.perf_counter() - t0
    for (cfg, cell, partition, out_dir), (data, model_name), final in zip(todo, setups, finals):
        write_run_json(out_dir, _payload(cfg, cell, final, model_name, device, wall / max(len(sims), 1), partition,
                                         ds, data, packed=len(sims)))
    return finals
