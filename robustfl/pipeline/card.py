"""The runs of a defense report card: every defense under every attack x attacker fraction x partition x
seed, with the attack-free and FedAvg references, each run once (robustfl.reporting.report_card reduces
and renders them). Definitions and their reasons: ``docs/decisions/report-card.md``."""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from robustfl.config import RunConfig
from robustfl.reporting.results import C_SEL_KEYS

#: Attacker fractions of the card (f = round(fraction * n), halves rounded up).
FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.3)
#: Partitions of the card: i.i.d., and Dirichlet label skew with alpha 1.0 (mild) and 0.3 (strong).
PARTITIONS: tuple[dict[str, Any], ...] = (
    {"partition": "iid"},
    {"partition": "dirichlet", "partition_params": {"alpha": 1.0}},
    {"partition": "dirichlet", "partition_params": {"alpha": 0.3}},
)
SEEDS: tuple[int, ...] = (0, 1, 2)
DATASET = "cifar10"
#: Grid keys that the card sets itself; ``base`` may not set them.
CARD_KEYS = frozenset({"dataset", "n_clients", "defense", "attack", "n_attackers", "partition", "partition_params",
                       "seed"})
#: Fields that only backdoor attacks use: set on backdoor-attack cells only.
BACKDOOR_KEYS = ("backdoor", "backdoor_mode")
NO_ATTACK = "none"


# ------------------------------------------------------------------------------------------------ grid
def _registries() -> tuple[list[str], list[str], Any, Any]:
    from robustfl.aggregation.defenses import DEFENSES
    from robustfl.attacks import ATTACKS, is_targeted, required_backdoor
    return DEFENSES.names(), ATTACKS.names(), is_targeted, required_backdoor


def attackers(fraction: float, n: int) -> int:
    """f = round(fraction * n), halves rounded up (0.25 * 10 -> 3)."""
    return int(math.floor(fraction * n + 0.5 + 1e-9))


def _names(kind: str, given: Iterable[str] | None, known: list[str]) -> list[str]:
    if given is None:
        return list(known)
    if isinstance(given, str):
        given = [given]
    names = list(dict.fromkeys(given))
    if not names:
        raise ValueError(f"report card: the list of {kind}s is empty, so the grid has zero cells")
    for name in names:
        if name not in known:
            raise ValueError(f"report card: unknown {kind} {name!r} (known: {', '.join(known)})")
    return names


def partition_spec(p: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"iid"`` or ``{"partition": ..., "partition_params": {...}}`` -> (partition, partition_params)."""
    if isinstance(p, str):
        name, params = p, {}
    elif isinstance(p, Mapping):
        unknown = sorted(set(p) - {"partition", "partition_params"})
        if unknown or "partition" not in p:
            raise ValueError(f"report card: partition {dict(p)!r} must be a name or a mapping with 'partition' and "
                             "optional 'partition_params'" + (f" (unknown keys {unknown})" if unknown else ""))
        name, params = str(p["partition"]), dict(p.get("partition_params") or {})
    else:
        raise ValueError(f"report card: partition {p!r} must be a name or a mapping")
    if name not in ("iid", "classes", "dirichlet"):
        raise ValueError(f"report card: unknown partition {name!r} (known: iid, classes, dirichlet)")
    if name == "dirichlet" and "alpha" not in params:
        raise ValueError("report card: partition dirichlet needs partition_params {alpha: ...}")
    if name == "classes" and not any(k in params for k in C_SEL_KEYS):
        raise ValueError("report card: partition classes needs partition_params {c_sel: ...}")
    return name, params


def _key(cell: Mapping[str, Any]) -> str:
    return json.dumps(cell, sort_keys=True, default=str)


def _bulyan_params(f: int, n: int, given: Mapping[str, Any]) -> dict[str, Any]:
    """Bulyan needs n >= 4f + 3: where the cell's f exceeds that, the rule assumes the largest f it allows,
    (n - 3) // 4 (the authors' f = 1 at n = 10, as in Table 4)."""
    cap = (n - 3) // 4
    if "f" in given or max(f, 1) <= cap or cap < 1:
        return dict(given)
    return {**given, "f": cap}


def card_grid(defenses: Iterable[str] | None = None, attacks: Iterable[str] | None = None,
              fractions: Sequence[float] = FRACTIONS, partitions: Sequence[str | Mapping[str, Any]] = PARTITIONS,
              seeds: Sequence[int] = SEEDS, dataset: str = DATASET, n_clients: int = 10,
              base: Mapping[str, Any] | None = None, baseline: str = "full",
              defense_params: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The runs of the cards of ``defenses`` (None: every registered defense; ``attacks`` None: every
    registered attack), one RunConfig field dict per cell x seed, each run once.

    Per partition and seed: every defense without attack (its clean accuracy, honest false exclusions) and
    under every attack x fraction (f = round(fraction n) attackers); FedAvg without attack (the cost
    reference) and, with ``baseline="full"``, FedAvg under every attack x fraction (the no-defense
    reference; ``"clean"``: attack-free FedAvg only). ``base`` holds RunConfig overrides of every cell
    (rounds, ...; its ``backdoor``/``backdoor_mode`` go to backdoor-attack cells only); ``defense_params``
    maps a defense to its ``defense_params``. Raises ``ValueError`` (one line) naming an unknown defense,
    attack or partition, an empty list, a fraction giving f = 0 or f >= n/2, or a cell RunConfig rejects.
    """
    known_def, known_att, is_targeted, required_backdoor = _registries()
    defs = _names("defense", defenses, known_def)
    if attacks is not None:
        attacks = [attacks] if isinstance(attacks, str) else list(attacks)
    if attacks is not None and NO_ATTACK in attacks:
        raise ValueError(f"report card: attack {NO_ATTACK!r} is the attack-free baseline, always included; "
                         "list only attacks")
    atts = _names("attack", attacks, known_att)
    if baseline not in ("full", "clean"):
        raise ValueError(f"report card: baseline must be 'full' or 'clean', got {baseline!r}")
    for kind, values in (("attacker fraction", fractions), ("partition", partitions), ("seed", seeds)):
        if len(values) == 0:
            raise ValueError(f"report card: the list of {kind}s is empty, so the grid has zero cells")
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise ValueError(f"report card: n_clients must be an int >= 1, got {n_clients!r}")
    fs = []
    for frac in fractions:
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
            raise ValueError(f"report card: attacker fraction {frac!r} must be a number in (0, 1)")
        f = attackers(frac, n_clients)
        if f < 1:
            raise ValueError(f"report card: attacker fraction {frac:g} of n = {n_clients} gives f = 0 attackers")
        if 2 * f >= n_clients:
            raise ValueError(f"report card: attacker fraction {frac:g} of n = {n_clients} gives f = {f} >= n/2; the "
                             "threat model needs f < n/2")
        fs.append(f)
    fs = list(dict.fromkeys(fs))
    parts = [partition_spec(p) for p in partitions]
    base = dict(base or {})
    clash = sorted(set(base) & CARD_KEYS)
    if clash:
        raise ValueError(f"report card: base sets {clash}, which the card's grid sets itself")
    bd = {k: base.pop(k) for k in BACKDOOR_KEYS if k in base}
    dparams = {k: dict(v) for k, v in (defense_params or {}).items()}
    for d in dparams:
        if d not in known_def:
            raise ValueError(f"report card: defense_params names unknown defense {d!r} (known: {', '.join(known_def)})")

    cells: dict[str, dict[str, Any]] = {}

    def add(defense: str, attack: str, f: int, part: tuple[str, dict[str, Any]], seed: int) -> None:
        cell: dict[str, Any] = {**base, "dataset": dataset, "n_clients": n_clients, "defense": defense,
                                "attack": attack, "n_attackers": f, "partition": part[0],
                                "partition_params": dict(part[1]), "seed": int(seed)}
        if attack != NO_ATTACK and is_targeted(attack):
            cell.update({"backdoor": "semantic", "backdoor_mode": "single", **bd})
            cell["backdoor"] = required_backdoor(attack) or cell["backdoor"]  # DBA: the trojan trigger
        params = dparams.get(defense, {})
        if defense == "bulyan":
            params = _bulyan_params(f, n_clients, params)
        if params:
            cell["defense_params"] = params
        key = _key(cell)
        if key in cells:
            return
        try:
            RunConfig.from_dict(cell)
        except (TypeError, ValueError) as exc:
            shown = ", ".join(f"{k}={cell[k]}" for k in ("defense", "attack", "n_attackers", "partition"))
            raise ValueError(f"report card cell ({shown}): {' '.join(str(exc).split())}") from None
        cells[key] = cell

    for part in parts:
        for seed in seeds:
            add("fedavg", NO_ATTACK, 0, part, seed)
            if baseline == "full":
                for attack in atts:
                    for f in fs:
                        add("fedavg", attack, f, part, seed)
            for defense in defs:
                add(defense, NO_ATTACK, 0, part, seed)
                for attack in atts:
                    for f in fs:
                        add(defense, attack, f, part, seed)
    return list(cells.values())
