"""What an attacker sees in one round (white-box adversary, Section 3.2 of the paper)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robustfl.engine import EngineOptions


@dataclass
class AttackContext:
    """Everything a colluding group of attackers may use in one round.

    Attackers see the global model and the benign updates of the round (white-box, Section 3.2);
    each attacker trains only on its own shard plus the backdoor set.
    """

    model: nn.Module  # architecture template (its own parameters are not the global model)
    global_flat: torch.Tensor  # (d,) current global parameters theta
    benign_updates: torch.Tensor  # (n_ben, d) the benign clients' updates of this round
    n_attackers: int
    n_clients: int
    round: int
    # attackers' own data: one (x float NCHW, y int64) pair per attacker, already on `device`
    attacker_data: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # backdoor set: inputs (float NCHW) the attacker wants classified as `backdoor_y`
    backdoor_x: torch.Tensor | None = None
    backdoor_y: torch.Tensor | None = None
    # local-training hyper-parameters (Section 6.1)
    lr: float = 1e-3
    local_epochs: int = 5
    batch_size: int = 64
    num_classes: int = 10
    precision: str = "fp32"  # the run's training precision (attackers that train honestly train in it)
    # what the server does, for attacks tailored to a rule (Fang et al. target Krum / trimmed mean)
    defense: str = "fedavg"
    f: int = 0
    # the cell's defense_params as the server reads them (attacks that run the server's rule themselves)
    defense_params: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # the attack's own config parameters
    generator: torch.Generator | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # how the engine computes (the run's): all attackers crafted at once where it trains with a stacked
    # layout (robustfl.engine.options.EngineOptions.layout), else one model at a time
    engine: EngineOptions = field(default_factory=lambda: EngineOptions(kind="sequential"))


def check_n_mal(n_mal: Any) -> int:
    """The attackers' count an attack function is asked for: an int >= 0 (``ValueError`` naming it otherwise)."""
    if isinstance(n_mal, bool) or not isinstance(n_mal, int) or n_mal < 0:
        raise ValueError(f"n_mal must be an int >= 0, got {n_mal!r}")
    return n_mal
