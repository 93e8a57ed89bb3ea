"""Run configuration: one dataclass describes one cell (dataset, attack, defense, setting, seed).

Defaults follow Section 6.1 of the paper (n = 10, all clients selected, Adam lr 1e-3, 5 local
epochs, T = 20, m = 10 auxiliary samples of one class). Dataset-specific batch sizes follow
Appendix C (fmnist 64, cifar10/kather 32). The backdoor target is the authors' code's ``single``: one
training image of class 4 relabelled 3.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from robustfl.engine.options import CONFIG_KEYS, PRECISIONS, EngineOptions

#: Appendix C batch sizes; everything else uses ``RunConfig.batch_size``.
PAPER_BATCH = {"fmnist": 64, "cifar10": 32, "kather": 32}

#: the flat keys of earlier configurations that the ``engine`` mapping replaced: old key -> its key there
MOVED_TO_ENGINE = {"conv": "conv", "cuda_graph": "cuda_graph"}

__all__ = ["PAPER_BATCH", "PRECISIONS", "RunConfig"]


@dataclass
class RunConfig:
    """All parameters of one FL run (one cell of a study grid, one seed).

    The scientific fields set what is computed; ``engine`` (a mapping with the keys ``kind``, ``conv``,
    ``cuda_graph``; missing keys take their defaults ``auto``, ``auto``, null: robustfl.engine.EngineOptions)
    sets how. ``precision`` stays a field of its own: it changes the arithmetic (bf16). Cell ids
    (robustfl.fl.experiment.cell_id) name an engine key only where it differs from its default, as
    ``engine=<kind>``, ``conv=<conv>``, ``cuda_graph=<value>`` (the flat fields it replaced), so a cell
    with the default engine keeps its id.
    """

    dataset: str = "digits"
    model: str | None = None  # None -> the dataset's default network (models.default_model)
    model_params: dict[str, Any] = field(default_factory=dict)  # keyword options of the model (dense_relu)
    n_clients: int = 10
    n_attackers: int = 0
    attack: str = "none"
    attack_params: dict[str, Any] = field(default_factory=dict)
    defense: str = "fedavg"
    defense_params: dict[str, Any] = field(default_factory=dict)
    partition: str = "iid"  # iid | classes | dirichlet
    partition_params: dict[str, Any] = field(default_factory=dict)
    rounds: int = 20
    local_epochs: int = 5
    batch_size: int | None = None  # None -> PAPER_BATCH.get(dataset, 64)
    lr: float = 1e-3
    aux_size: int = 10  # m, Section 6.1
    aux_class: int | None = None  # None -> serversets.resolve_aux_class: 1 (reference code) unless the backdoor uses it
    aux_source: str = "train"  # train (held out from clients) | test (reference code)
    root_size: int = 100  # FLTrust root dataset size (Cao et al. use 100)
    backdoor: str = "semantic"  # semantic | trojan (used by backdoor attacks)
    backdoor_mode: str = "single"  # single (reference code, the paper's target) | multiple (20 targeted inputs)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # {kind: auto | vectorised | sequential, conv: auto | vmap | grouped | channels_last | triton,
    #  cuda_graph: null | true | false}: robustfl.engine.EngineOptions
    engine: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # fp32 | tf32 (dense products in TF32 too) | bf16 (autocast on CUDA)
    deterministic: bool = False
    checkpoint_every: int = 5
    snapshot_round: int | None = -1  # round whose PLRs are dumped for the figures (-1: last, None: off)
    eval_every: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.engine, Mapping):  # every key, defaults filled in (equal configs compare equal)
            try:
                self.engine = EngineOptions.from_config(self.engine).config()
            except ValueError as exc:
                raise ValueError(f"config key 'engine': {exc}") from None
        self.validate()

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size if self.batch_size is not None else PAPER_BATCH.get(self.dataset, 64)

    @property
    def engine_options(self) -> EngineOptions:
        """The engine options this run asks for (``auto`` not yet resolved for a model and device)."""
        return EngineOptions.from_config(self.engine)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field for impossible settings."""
        def bad(key: str, msg: str) -> None:
            raise ValueError(f"config key {key!r}: {msg}")

        if self.n_clients < 1:
            bad("n_clients", f"must be >= 1, got {self.n_clients}")
        if self.n_attackers < 0:
            bad("n_attackers", f"must be >= 0, got {self.n_attackers}")
        if 2 * self.n_attackers >= self.n_clients and self.n_attackers > 0:
            bad("n_attackers", f"f = {self.n_attackers} attackers out of n = {self.n_clients}: the threat model "
                "(Section 3.2) needs f < n/2")
        if self.attack != "none" and self.n_attackers == 0:
            bad("n_attackers", f"attack {self.attack!r} needs at least one attacker")
        if self.rounds < 1:
            bad("rounds", f"must be >= 1, got {self.rounds}")
        if self.local_epochs < 1:
            bad("local_epochs", f"must be >= 1, got {self.local_epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            bad("batch_size", f"must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if self.aux_size < 2:
            bad("aux_size", f"the unbiased MMD (Eq. 4) needs m >= 2 auxiliary samples, got {self.aux_size}")
        if self.aux_class is not None and (isinstance(self.aux_class, bool) or not isinstance(self.aux_class, int)
                                           or self.aux_class < 0):
            bad("aux_class", f"must be a class index >= 0 or null (the default class), got {self.aux_class!r}")
        if self.aux_source not in ("train", "test"):
            bad("aux_source", f"must be 'train' or 'test', got {self.aux_source!r}")
        if self.backdoor not in ("semantic", "trojan"):
            bad("backdoor", f"must be 'semantic' or 'trojan', got {self.backdoor!r}")
        if self.backdoor_mode not in ("single", "multiple"):
            bad("backdoor_mode", f"must be 'single' or 'multiple', got {self.backdoor_mode!r}")
        if self.partition not in ("iid", "classes", "dirichlet"):
            bad("partition", f"must be iid, classes or dirichlet, got {self.partition!r}")
        if not isinstance(self.engine, Mapping):
            bad("engine", f"must be a mapping with the keys {list(CONFIG_KEYS)} (e.g. engine: {{kind: {self.engine}}}), "
                f"got {self.engine!r}")
        if self.precision not in PRECISIONS:
            bad("precision", f"must be 'fp32', 'tf32' or 'bf16', got {self.precision!r}")
        if self.checkpoint_every < 0:
            bad("checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        if self.snapshot_round is not None and self.snapshot_round != -1 and not 1 <= self.snapshot_round <= self.rounds:
            bad("snapshot_round", f"must be -1 (last round), null (off) or a round in 1..{self.rounds}, "
                f"got {self.snapshot_round}")
        if self.eval_every < 1:
            bad("eval_every", f"must be >= 1, got {self.eval_every}")
        if self.defense == "bulyan":  # El Mhamdi et al. 2018: n >= 4f + 3 (robustfl.aggregation.aggregators.bulyan)
            f = self.defense_params.get("f", max(self.n_attackers, 1))
            if isinstance(f, int) and not isinstance(f, bool) and self.n_clients < 4 * f + 3:
                bad("defense_params", f"Bulyan needs n >= 4f + 3, but n = {self.n_clients} and f = {f} (the cell's "
                    "attackers unless defense_params sets f; the authors' code uses f = 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        moved = sorted(set(d) & set(MOVED_TO_ENGINE))
        if moved:
            raise ValueError(f"config key(s) {moved} moved into the engine mapping: write engine: "
                             + "{" + ", ".join(f"{MOVED_TO_ENGINE[k]}: {json.dumps(d[k])}" for k in moved) + "}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known: {sorted(names)}")
        return cls(**d)
