"""The federated-learning loop (Section 3.1, Figure 2, Algorithm 1).

One round (:meth:`Simulation.step`): distribute the global model theta -> benign clients train locally
(the engine, :func:`robustfl.engine.train_clients`, all clients of a call at once where it is vectorised)
-> the colluding attackers craft their updates with white-box knowledge of the benign ones (Section 3.2)
-> the server screens the updates (:mod:`robustfl.fl.screening`), aggregates them with the defense rule,
and sets theta <- theta + aggregate (Eq. 6) -> the new model is evaluated and the round recorded.

The run state is checkpointed every ``checkpoint_every`` rounds (:mod:`robustfl.fl.checkpoint`); a killed
run restarted with the same arguments resumes from the last checkpoint and ends with the same metrics.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from robustfl import engine
from robustfl.aggregation import aggregators as agg
from robustfl.aggregation.defenses import DEFENSES, NEEDS_AUX, NEEDS_ROOT, ServerContext
from robustfl.attacks import ATTACKS, AttackContext, is_targeted
from robustfl.config import RunConfig
from robustfl.engine import BatchPlan
from robustfl.fl.checkpoint import (CLIENT_COLUMNS, ROUND_COLUMNS, Checkpoints, RunState, remove_checkpoints,
                                    rng_state, set_rng_state, tensors_to)
from robustfl.fl.metrics import attack_diagnostics, attacker_summary, backdoor_metrics, detected
from robustfl.fl.screening import apply_aggregate, check_crafted, screen_plrs, screen_updates
from robustfl.io import atomic_open, atomic_write_json
from robustfl.models import PLRModel
from robustfl.params import ParamSpec, load_flat_, model_to_flat

log = logging.getLogger("robustfl")

__all__ = ["CLIENT_COLUMNS", "ROUND_COLUMNS", "RunData", "ServerSets", "Simulation", "remove_checkpoints",
           "resolve_device", "root_update", "screen_updates", "simulate", "simulate_many", "write_run_json"]


@dataclass
class ServerSets:
    """Data held by the server or the attackers, all disjoint from the clients' shards."""

    aux_x: torch.Tensor | None = None  # FLARE auxiliary set D (m inputs), Section 5.2
    aux_y: torch.Tensor | None = None
    root_x: torch.Tensor | None = None  # FLTrust root set
    root_y: torch.Tensor | None = None
    bd_train_x: torch.Tensor | None = None  # backdoor inputs the attackers train on
    bd_train_y: torch.Tensor | None = None
    bd_eval_x: torch.Tensor | None = None  # targeted inputs on which ASR is measured
    bd_eval_y: torch.Tensor | None = None
    probe_x: torch.Tensor | None = None  # inputs whose PLRs are dumped for the figures
    probe_y: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunData:
    model: PLRModel
    x_train: torch.Tensor  # uint8 NHWC on the device
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    shards: list[torch.Tensor]  # client i's indices into x_train
    sets: ServerSets
    num_classes: int


_GPU_LOCK: Any = None


def claim_gpu(max_slots: int = 256) -> int:
    """Spread concurrent run jobs over the visible GPUs: each process takes the first free (slot, GPU)
    file lock in the order slot 0 of every GPU, slot 1 of every GPU, ... so that k jobs on g GPUs put
    ceil(k/g) jobs on each card (Snakemake ``--resources gpu=N`` decides how many jobs run at once).
    The lock is held for the life of the process. Returns the GPU index."""
    global _GPU_LOCK
    if _GPU_LOCK is not None:
        return _GPU_LOCK[1]
    import fcntl
    import os
    import tempfile

    n = torch.cuda.device_count()
    for slot in range(max_slots):
        for i in range(n):
            path = os.path.join(tempfile.gettempdir(), f"robustfl-gpu{i}-slot{slot}.lock")
            fh = open(path, "w")  # noqa: SIM115 - held for the life of the process
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            _GPU_LOCK = (fh, i)
            return i
    return 0


def resolve_device(name: str) -> torch.device:
    """'auto' -> a claimed CUDA GPU if available else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"config device {name!r} requested, but torch sees no CUDA GPU on this machine")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", claim_gpu())
    if dev.type == "cuda":  # kernels launched on the current device (Triton's) must find this run's tensors
        torch.cuda.set_device(dev)
    return dev


def malicious_clients(cfg: RunConfig) -> list[int]:
    """The attackers are the last ``n_attackers`` clients (as in the authors' code for backdoor attacks;
    the partition is a random permutation, so which indices are malicious does not matter)."""
    return list(range(cfg.n_clients - cfg.n_attackers, cfg.n_clients))


@dataclass
class Aggregate:
    """What the server did with a round's updates: the global model before, the aggregate, the weight of
    every client (0: not chosen or excluded), the clients kept after screening, the update norms, and the
    clients' PLRs on the auxiliary set where they were computed (FLARE, the snapshot round)."""

    theta_prev: torch.Tensor
    update: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor
    norms: list[float]
    plrs: torch.Tensor | None


class Simulation:
    """The state of one cell's FL run, advanced one round at a time.

    :meth:`benign_plan` says which clients train from which model this round; the caller trains them
    (possibly packed with other cells' clients into one vectorised call) and hands the updates to
    :meth:`step`: :meth:`craft` (the attackers' updates) -> :meth:`aggregate` (the server's screening,
    the defense, Eq. 6) -> :meth:`evaluate` -> :meth:`record` (metrics rows, snapshot), then a checkpoint
    (:mod:`robustfl.fl.checkpoint`).
    """

    def __init__(self, cfg: RunConfig, data: RunData, out_dir: Path, ckpt_path: Path | None = None,
                 device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self.device = device = device or resolve_device(cfg.device)
        self.out_dir = Path(out_dir)
        self.model = model = data.model.to(device)
        self.spec = ParamSpec(model)
        n = cfg.n_clients
        if len(data.shards) != n:
            raise ValueError(f"partition has {len(data.shards)} client shards, config n_clients = {n}")
        self.mal = malicious_clients(cfg)
        self.benign = [i for i in range(n) if i not in set(self.mal)]
        self.targeted = cfg.attack != "none" and is_targeted(cfg.attack)
        self.attack_fn = ATTACKS.get(cfg.attack) if cfg.attack != "none" else None
        self.defense_fn = DEFENSES.get(cfg.defense)
        self.options = cfg.engine_options.resolve(model, device, cfg.precision)
        self.engine = self.options.kind  # what run.json reports ("vectorised-packed(n)" when packed)
        self.bs = cfg.effective_batch_size
        self.shards = [s.to(device) for s in data.shards]
        snap = cfg.snapshot_round
        self.snapshot_round = snap if snap is None or snap > 0 else cfg.rounds

        torch.manual_seed(cfg.seed)
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.g_att = torch.Generator().manual_seed(cfg.seed + 7919)
        # the server's own random stream and the defense's memory across rounds (FoolsGold's history,
        # centered clipping's centre): robustfl.aggregation.defenses.ServerContext
        self.g_def = torch.Generator().manual_seed(cfg.seed + 104729)
        self.defense_state: dict[str, Any] = {}
        self.theta = model_to_flat(model).to(device)
        if cfg.defense in NEEDS_AUX and cfg.defense_params.get("pretrain", True):
            # Section 5.2 point 1: the server initialises theta by training on its auxiliary set D.
            engine.train_single(model, data.sets.aux_x, data.sets.aux_y, epochs=cfg.local_epochs, batch_size=self.bs,
                                lr=cfg.lr, generator=torch.Generator().manual_seed(cfg.seed + 15485863))
            self.theta = model_to_flat(model)
        self.rows: list[dict[str, Any]] = []
        self.client_rows: list[dict[str, Any]] = []
        self.round = 0
        self.checkpoints = Checkpoints(ckpt_path, cfg)
        st = self.checkpoints.restore(self.theta, self._rng_state())
        if st is not None:
            self.theta = st.theta.to(device)
            self.rows, self.client_rows, self.round = st.rows, st.client_rows, st.round
            self.defense_state = tensors_to(st.defense_state, device)
            set_rng_state(st.rng, self._generators(), device)
        self.wall0 = time.perf_counter()

    # -- checkpoints -------------------------------------------------------------------------------
    def _generators(self) -> dict[str, torch.Generator]:
        return {"gen": self.g, "gen_attack": self.g_att, "gen_defense": self.g_def}

    def _rng_state(self) -> dict[str, torch.Tensor]:
        return rng_state(self._generators(), self.device)

    def _checkpoint(self) -> None:
        """Checkpoint the state after this round, every ``checkpoint_every`` rounds but the last."""
        every = self.cfg.checkpoint_every
        if self.checkpoints.path is None or not every or self.round % every or self.done:
            return
        self.checkpoints.save(RunState(self.round, self.theta, self._rng_state(), self.rows, self.client_rows,
                                       self.defense_state))

    @property
    def done(self) -> bool:
        return self.round >= self.cfg.rounds

    # -- one round ---------------------------------------------------------------------------------
    def benign_plan(self) -> BatchPlan:
        """This round's mini-batches of the benign clients (drawn from this cell's own generator)."""
        return engine.batch_plan([self.shards[i] for i in self.benign], self.cfg.local_epochs, self.bs, self.g)

    def train(self, clients: list[int], **how: Any) -> torch.Tensor:
        """Local training of ``clients`` from the global model (the engine of this run's options; ``how``:
        ``plan`` or ``generator``)."""
        return engine.train_clients(self.model, self.theta, self.data.x_train, self.data.y_train,
                                    [self.shards[i] for i in clients], epochs=self.cfg.local_epochs,
                                    batch_size=self.bs, lr=self.cfg.lr, precision=self.cfg.precision,
                                    options=self.options, **how)

    def train_benign(self) -> torch.Tensor:
        """Train this cell's benign clients on their own (no packing)."""
        return self.train(self.benign, plan=self.benign_plan())

    def step(self, ben: torch.Tensor, train_s: float) -> dict[str, Any]:
        """Finish the round given the benign updates ``ben (n_ben, d)``; returns the round's metrics row."""
        rnd = self.round + 1
        t1 = time.perf_counter()
        updates = self.craft(ben, rnd)
        _sync(self.device)
        t2 = time.perf_counter()
        result = self.aggregate(updates, rnd)
        _sync(self.device)
        t3 = time.perf_counter()
        metrics = self.evaluate(rnd, result)
        row = self.record(rnd, updates, result, metrics, {"train_s": train_s, "attack_s": t2 - t1, "agg_s": t3 - t2})
        self.round = rnd
        self._checkpoint()
        return row

    def craft(self, ben: torch.Tensor, rnd: int) -> torch.Tensor:
        """Every client's update ``(n, d)``: the benign ones, and the attackers' crafted with white-box
        knowledge of them (Section 3.2; without an attack the attackers train honestly)."""
        cfg, data, mal = self.cfg, self.data, self.mal
        updates = torch.empty(cfg.n_clients, self.spec.dim, device=self.device, dtype=self.theta.dtype)
        updates[self.benign] = ben
        if self.attack_fn is not None:
            x_tr, y_tr = data.x_train, data.y_train
            ctx = AttackContext(
                model=self.model, global_flat=self.theta, benign_updates=ben, n_attackers=len(mal),
                n_clients=cfg.n_clients, round=rnd,
                attacker_data=[(engine.prepare_inputs(x_tr[self.shards[i]]), y_tr[self.shards[i]]) for i in mal],
                backdoor_x=None if data.sets.bd_train_x is None else engine.prepare_inputs(data.sets.bd_train_x),
                backdoor_y=data.sets.bd_train_y, lr=cfg.lr, local_epochs=cfg.local_epochs, batch_size=self.bs,
                num_classes=data.num_classes, precision=cfg.precision, defense=cfg.defense, f=cfg.n_attackers,
                defense_params=dict(cfg.defense_params), params=dict(cfg.attack_params), generator=self.g_att,
                device=self.device, engine=self.options)
            crafted = check_crafted(self.attack_fn(ctx), cfg.attack, (len(mal), self.spec.dim))
            updates[mal] = crafted.to(updates.dtype)
        elif mal:
            updates[mal] = self.train(mal, generator=self.g)
        return updates

    def aggregate(self, updates: torch.Tensor, rnd: int) -> Aggregate:
        """The server's step: screen the updates (:mod:`robustfl.fl.screening`), aggregate the kept ones with
        the defense rule, set theta <- theta + aggregate (Eq. 6)."""
        cfg, data, model, theta = self.cfg, self.data, self.model, self.theta
        n, d = cfg.n_clients, self.spec.dim
        keep = screen_updates(updates, d)
        norms = torch.linalg.vector_norm(updates, dim=1).tolist()
        plrs = None
        if cfg.defense in NEEDS_AUX or rnd == self.snapshot_round:
            plrs = engine.model_plrs(model, theta.unsqueeze(0) + torch.nan_to_num(updates), data.sets.aux_x)
            if cfg.defense in NEEDS_AUX:
                keep = screen_plrs(keep, plrs)
        kept = keep.nonzero().flatten()
        weights = torch.zeros(n, device=self.device)
        if len(kept) == 0:
            log.warning("round %d: every update was excluded; the global model is left unchanged", rnd)
            update = torch.zeros(d, device=self.device)
        else:
            sctx = ServerContext(
                n_clients=len(kept), f=cfg.defense_params.get("f", max(cfg.n_attackers, 1)),
                params={k: v for k, v in cfg.defense_params.items() if k not in ("f", "pretrain")},
                plr_fn=(lambda u, _p=plrs, _k=kept: _p[_k]) if plrs is not None else None,
                server_update_fn=((lambda: _server_update(model, theta, data.sets, cfg,
                                                          torch.Generator().manual_seed(cfg.seed * 1_000_003 + rnd)))
                                  if cfg.defense in NEEDS_ROOT else None),
                state=self.defense_state, generator=self.g_def, client_ids=kept.tolist())
            res = self.defense_fn(updates[kept], sctx)
            update = res.update
            weights[kept] = res.weights.to(weights.dtype)
        self.theta = apply_aggregate(theta, update, rnd, cfg.defense)
        return Aggregate(theta, update, weights, kept, norms, plrs)

    def evaluate(self, rnd: int, result: Aggregate) -> dict[str, float]:
        """Test accuracy and loss of the new global model (every ``eval_every`` rounds and the last), and
        for a backdoor attack its success rate and target confidence (NaN where not measured)."""
        cfg, data, model = self.cfg, self.data, self.model
        load_flat_(model, self.theta)
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            acc, loss = engine.evaluate(model, data.x_test, data.y_test)
            if not math.isfinite(loss):
                log.warning("round %d: the global model (finite) gives a non-finite test loss (%s) after defense %r "
                            "accepted an update of norm %.3g; clients training from it produce non-finite updates, "
                            "which the server excludes", rnd, loss, cfg.defense, float(result.update.double().norm()))
        else:
            acc, loss = float("nan"), float("nan")
        asr, conf = (backdoor_metrics(model, data.sets.bd_eval_x, data.sets.bd_eval_y) if self.targeted
                     else (float("nan"), float("nan")))
        return {"test_acc": acc, "test_loss": loss, "asr": asr, "target_conf": conf}

    def record(self, rnd: int, updates: torch.Tensor, result: Aggregate, metrics: dict[str, float],
               times: dict[str, float]) -> dict[str, Any]:
        """Append the round's row and its clients' rows (weights, detection, the attackers' diagnostics),
        log the round, write the PLR snapshot on its round; returns the round's row."""
        cfg, n, mal, weights = self.cfg, self.cfg.n_clients, self.mal, result.weights
        row: dict[str, Any] = {"round": rnd, **times, "n_excluded": int(n - len(result.kept)), **metrics}
        diag = attack_diagnostics(updates, self.benign, max(len(mal), 1))  # reads only: no RNG, no state
        diag["selected"] = weights > 0
        row.update(attacker_summary(diag, diag["selected"], mal))
        self.rows.append(row)
        det = detected(weights)
        diag = {k: v.tolist() for k, v in diag.items()}
        for i in range(n):
            self.client_rows.append({"round": rnd, "client": i, "malicious": int(i in mal),
                                     "weight": float(weights[i]), "detected": int(det[i]),
                                     "update_norm": result.norms[i], "dist_ratio": diag["dist_ratio"][i],
                                     "krum_rank": diag["krum_rank"][i], "selected": int(diag["selected"][i])})
        log.info("[%s seed %d] round %d/%d acc=%.4f loss=%.4f asr=%s conf=%s weights=[%s] excluded=%d "
                 "(train %.2fs, attack %.2fs, agg %.2fs)", cfg.defense, cfg.seed, rnd, cfg.rounds, metrics["test_acc"],
                 metrics["test_loss"], _fmt(metrics["asr"]), _fmt(metrics["target_conf"]),
                 " ".join(f"{w:.3f}" for w in weights.tolist()), n - len(result.kept), times["train_s"],
                 times["attack_s"], times["agg_s"])
        if rnd == self.snapshot_round:
            _write_snapshot(self.out_dir / "snapshot.npz", self.model, self.spec, result.theta_prev, updates,
                            result.plrs, self.data, mal, rnd)
        return row

    def finish(self) -> dict[str, Any]:
        """Write ``rounds.csv`` and ``clients.csv`` atomically, drop the checkpoints, return final metrics."""
        with atomic_open(self.out_dir / "rounds.csv") as fh:
            pd.DataFrame(self.rows, columns=ROUND_COLUMNS).to_csv(fh, index=False, float_format="%.6g")
        with atomic_open(self.out_dir / "clients.csv") as fh:
            pd.DataFrame(self.client_rows, columns=CLIENT_COLUMNS).to_csv(fh, index=False, float_format="%.6g")
        self.checkpoints.remove()
        last = self.rows[-1]
        return {"test_acc": last["test_acc"], "test_loss": last["test_loss"], "asr": last["asr"],
                "target_conf": last["target_conf"], "sim_wall_s": time.perf_counter() - self.wall0,
                "engine": self.engine, **self.options.report()}


def round_report(sim: Simulation) -> dict[str, Any]:
    """The last round's row plus ``mal_weight``, the attackers' mean aggregation weight (NaN without
    attackers): what a progress display shows."""
    row = dict(sim.rows[-1])
    mine = [c["weight"] for c in sim.client_rows if c["round"] == row["round"] and c["malicious"]]
    row["mal_weight"] = sum(mine) / len(mine) if mine else float("nan")
    return row


def simulate(cfg: RunConfig, data: RunData, out_dir: Path, ckpt_path: Path | None = None,
             device: torch.device | None = None,
             on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the FL simulation of one cell; write ``rounds.csv``, ``clients.csv`` (and ``snapshot.npz``)
    into ``out_dir`` atomically and return the final metrics. ``on_round`` gets :func:`round_report`
    after every round."""
    sim = Simulation(cfg, data, out_dir, ckpt_path, device)
    while not sim.done:
        t0 = time.perf_counter()
        ben = sim.train_benign()
        _sync(sim.device)
        sim.step(ben, time.perf_counter() - t0)
        if on_round is not None:
            on_round(round_report(sim))
    return sim.finish()


def simulate_many(sims: list[Simulation]) -> list[dict[str, Any]]:
    """Advance several cells in lock-step, training the benign clients of all of them in ONE vectorised
    call per round (per-client starting models, one batch plan per cell from that cell's own generator).

    The cells must share the architecture, the training arrays and the local-training hyper-parameters
    (epochs, batch size, lr, precision). Dropout masks come from the global RNG, so a packed run is
    reproducible for the same pack but not bit-identical to the same cell run alone.
    """
    if not sims:
        return []
    for s in sims:
        s.engine = f"vectorised-packed({len(sims)})"
    ref = sims[0]
    key = lambda s: (type(s.model), s.cfg.local_epochs, s.bs, s.cfg.lr, s.cfg.precision, s.options,  # noqa: E731
                     id(s.data.x_train))
    if any(key(s) != key(ref) for s in sims):
        raise ValueError("simulate_many: cells differ in model, data or local-training hyper-parameters")
    while any(not s.done for s in sims):
        active = [s for s in sims if not s.done]
        t0 = time.perf_counter()
        plans = [s.benign_plan() for s in active]
        thetas = torch.cat([s.theta.unsqueeze(0).expand(len(s.benign), -1) for s in active])
        shards = [s.shards[i] for s in active for i in s.benign]
        ben_all = engine.train_clients(ref.model, thetas, ref.data.x_train, ref.data.y_train, shards,
                                       epochs=ref.cfg.local_epochs, batch_size=ref.bs, lr=ref.cfg.lr,
                                       precision=ref.cfg.precision, plan=engine.concat_plans(plans),
                                       options=ref.options.packed())
        _sync(ref.device)
        train_s = (time.perf_counter() - t0) / len(active)
        a = 0
        for s in active:
            nb = len(s.benign)
            s.step(ben_all[a:a + nb], train_s)
            a += nb
    return [s.finish() for s in sims]


def _fmt(v: float) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def root_update(model: PLRModel, theta: torch.Tensor, root_x: torch.Tensor, root_y: torch.Tensor, *, epochs: int,
                batch_size: int, lr: float, generator: torch.Generator) -> torch.Tensor:
    """FLTrust's server model update g_0 (Cao et al., NDSS 2021, Algorithm 1 line 8): train the current
    global model ``theta`` on the root set as a client would; returns ``w_0 - theta`` ``(d,)``."""
    shard = torch.arange(len(root_y), device=theta.device)
    return engine.train_clients(model, theta, root_x, root_y, [shard], epochs=epochs, batch_size=batch_size, lr=lr,
                                generator=generator, options=engine.SEQUENTIAL)[0]


def _server_update(model: PLRModel, theta: torch.Tensor, sets: ServerSets, cfg: RunConfig, g: torch.Generator) -> torch.Tensor:
    """FLTrust's server model update g_0 with the run's local-training settings (:func:`root_update`)."""
    return root_update(model, theta, sets.root_x, sets.root_y, epochs=cfg.local_epochs,
                       batch_size=cfg.effective_batch_size, lr=cfg.lr, generator=g)


@torch.no_grad()
def _write_snapshot(path: Path, model: PLRModel, spec: ParamSpec, theta_prev: torch.Tensor, updates: torch.Tensor,
                    aux_plrs: torch.Tensor | None, data: RunData, mal: list[int], rnd: int) -> None:
    """PLRs of every local model on the probe inputs, their class templates and the MMD matrix on the
    auxiliary set: the material of Figures 1, 4, 6, 10 and 11."""
    flats = theta_prev.unsqueeze(0) + torch.nan_to_num(updates)
    out: dict[str, np.ndarray] = {"round": np.array(rnd), "malicious": np.isin(np.arange(len(flats)), mal)}
    if data.sets.probe_x is not None:
        out["plrs"] = engine.model_plrs(model, flats, data.sets.probe_x).cpu().numpy().astype(np.float32)
        out["probe_y"] = data.sets.probe_y.cpu().numpy()
    head_w = [n for n in spec.names if n.startswith("head.") and n.endswith("weight")][-1]
    out["templates"] = spec.unflatten(flats)[head_w].cpu().numpy().astype(np.float32)
    if aux_plrs is not None and bool(torch.isfinite(aux_plrs).all()):
        out["mmd"] = agg.pairwise_mmd2(aux_plrs).cpu().numpy()
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **out)


def write_run_json(out_dir: Path, payload: dict[str, Any]) -> None:
    atomic_write_json(Path(out_dir) / "run.json", payload)
