"""The config's studies: checked, and each expanded into cells.

A study (``studies.<name>`` of config.yaml) is ``base`` (fields every cell shares), ``grid`` (blocks: the
cartesian product of a block's lists, the union over blocks; a block's ``outputs`` are the tables and
figures its cells feed), ``seeds`` (default 0, 1, 2) and ``include`` (other studies, their cells with
their own seeds and outputs). A cell is a RunConfig without seed, device and checkpoint cadence; its id
is :func:`robustfl.fl.experiment.cell_id`, and equal ids are one cell, seeds and outputs merged.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema

from robustfl.aggregation.defenses import DEFENSES
from robustfl.attacks import ATTACKS, is_targeted, required_backdoor
from robustfl.config import RunConfig
from robustfl.data.datasets import DATASETS
from robustfl.fl import experiment as rx
from robustfl.models import MODELS
from robustfl.pipeline.card import card_grid
from robustfl.pipeline.outputs import SNAPSHOT_FIGURES


class StudyError(ValueError):
    """A config the pipeline cannot run; the message is one line naming the offending key or value."""


#: RunConfig fields that are not part of a cell: the seed comes from ``seeds``, device and checkpoint
#: cadence from the top level (changing them must not rerun anything).
NON_CELL_FIELDS = ("seed", "device", "checkpoint_every")
CELL_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in NON_CELL_FIELDS)
DEFAULT_SEEDS = (0, 1, 2)

#: config key -> (registry its values must name, values allowed besides)
REGISTRY_CHECKS = {
    "dataset": (DATASETS, ()),
    "attack": (ATTACKS, ("none",)),
    "defense": (DEFENSES, ()),
    "model": (MODELS, (None,)),
}


# ------------------------------------------------------------------------------------------ schema
def dotted(path: Iterable[str | int]) -> str:
    """A config location as written in messages: ``studies.tiny.grid[0].defense``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def schema_error(cfg: Mapping[str, Any], schema: Mapping[str, Any]) -> str | None:
    """The most relevant violation of the JSON schema by ``cfg`` as one line, or None."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    err = jsonschema.exceptions.best_match(validator.iter_errors(cfg))
    if err is None:
        return None
    where = dotted(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = sorted(err.schema.get("properties", {}))
        unknown = sorted(set(err.instance) - set(allowed))
        return f"unknown key {unknown[0]!r} at {where} (allowed: {', '.join(allowed)})"
    if err.validator == "required":
        return f"{where}: {err.message}"
    return f"bad value at {where}: {err.message}"


def check_schema(cfg: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    """Raise StudyError with :func:`schema_error`'s line if ``cfg`` violates the schema."""
    msg = schema_error(cfg, schema)
    if msg:
        raise StudyError(msg)


def check_names(where: str, key: str, values: Iterable[Any]) -> None:
    """Dataset, attack, defense and model names must be in robustfl's registries."""
    if key not in REGISTRY_CHECKS:
        return
    registry, extra = REGISTRY_CHECKS[key]
    for v in values:
        if v not in extra and v not in registry:
            known = ", ".join([str(e) for e in extra if e is not None] + registry.names())
            raise StudyError(f"unknown {key} {v!r} at {where}.{key} (known: {known})")


# ------------------------------------------------------------------------------------------- cells
@dataclasses.dataclass
class Cell:
    """One cell of a study: its id, its :data:`CELL_FIELDS` (JSON values, nested keys sorted), the seeds
    it runs with, the outputs it feeds and where the config defines it."""

    id: str
    cfg: dict[str, Any]
    seeds: set[int]
    outputs: set[str]
    where: list[str]

    @property
    def dataset(self) -> str:
        return self.cfg["dataset"]

    def run_config(self, seed: int) -> RunConfig:
        """The RunConfig of this cell's run with ``seed`` (device and checkpoint cadence at their defaults)."""
        return RunConfig.from_dict({**self.cfg, "seed": int(seed)})

    def partition_key(self, seed: int) -> str:
        """:func:`robustfl.fl.experiment.partition_key` of the run with ``seed``."""
        return rx.partition_key(self.run_config(seed))


def make_cell(overrides: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """One grid point -> (cell id, every CELL_FIELDS value), checked by RunConfig."""
    try:
        rc = RunConfig.from_dict(dict(overrides))
    except (TypeError, ValueError) as exc:
        shown = ", ".join(f"{k}={v}" for k, v in overrides.items())
        raise StudyError(f"{where} cell ({shown}): {exc}") from None
    # nested dicts (attack_params, ...) in sorted key order: the params trigger sees no spurious change
    cfg = json.loads(json.dumps({k: v for k, v in rc.to_dict().items() if k in CELL_FIELDS}, sort_keys=True))
    return rx.cell_id(rc), {k: cfg[k] for k in CELL_FIELDS}


def _merge(cells: dict[str, Cell], new: Cell) -> None:
    """Add ``new`` to ``cells``: a cell with the same id gains its seeds, outputs and locations."""
    old = cells.get(new.id)
    if old is None:
        cells[new.id] = Cell(new.id, new.cfg, set(new.seeds), set(new.outputs), list(new.where))
        return
    if old.cfg != new.cfg:
        raise StudyError(f"{new.where[0]}: two different cells share the id {new.id!r}; make them differ in a "
                         "readable field")
    old.seeds |= new.seeds
    old.outputs |= new.outputs
    old.where += new.where


def card_cells(study: Mapping[str, Any], name: str, seeds: set[int], base: Mapping[str, Any],
               defenses: Sequence[str] | None = None) -> list[Cell]:
    """The cells of a study's ``card`` block (:func:`robustfl.pipeline.card.card_grid`), feeding output
    ``report_card``; ``defenses`` (the top-level ``defenses`` of the config) replaces the block's."""
    spec = dict(study["card"])
    if defenses is not None:
        spec["defenses"] = defenses
    where = f"studies.{name}.card"
    try:
        runs = card_grid(**spec, seeds=sorted(seeds), base=base)
    except (TypeError, ValueError) as exc:
        raise StudyError(f"{where}: {exc}") from None
    out: dict[str, Cell] = {}
    for run in runs:
        seed = int(run.pop("seed"))
        cid, cfg = make_cell(run, where)
        out.setdefault(cid, Cell(cid, cfg, set(), {"report_card"}, [where])).seeds.add(seed)
    return list(out.values())


def expand_study(studies: Mapping[str, Any], name: str, stack: Sequence[str] = (),
                 card_defenses: Sequence[str] | None = None) -> dict[str, Cell]:
    """The cells of study ``name`` of ``studies`` (the config's ``studies``), its includes resolved, by id;
    ``card_defenses`` replaces the defenses of its ``card`` block."""
    if name not in studies:
        known = ", ".join(sorted(studies))
        raise StudyError(f"unknown study {name!r}" + (f" included by {stack[-1]!r}" if stack else "")
                         + f" (known: {known})")
    if name in stack:
        raise StudyError(f"studies include each other in a cycle: {' -> '.join([*stack, name])}")
    study = studies[name]
    cells: dict[str, Cell] = {}
    for inc in study.get("include", []):
        for c in expand_study(studies, inc, (*stack, name)).values():
            _merge(cells, c)
    seeds = set(study.get("seeds", DEFAULT_SEEDS))
    base = study.get("base", {})
    for key, value in base.items():
        check_names(f"studies.{name}.base", key, [value])
    for bi, block in enumerate(study.get("grid", [])):
        where = f"studies.{name}.grid[{bi}]"
        outputs = set(block.get("outputs", []))
        axes = {k: v for k, v in block.items() if k != "outputs"}
        for key, values in axes.items():
            if len(values) == 0:
                raise StudyError(f"{where}.{key} is an empty list, so this grid block has zero cells")
            check_names(where, key, values)
        for combo in itertools.product(*axes.values()):
            cid, cfg = make_cell({**base, **dict(zip(axes, combo))}, where)
            _merge(cells, Cell(cid, cfg, seeds, outputs, [where]))
    if "card" in study:
        for c in card_cells(study, name, seeds, base, card_defenses):
            _merge(cells, c)
    if not cells:
        raise StudyError(f"study {name!r} has zero cells: give it a non-empty `grid`, `card` or `include`")
    return cells


def check_outputs(studies: Mapping[str, Mapping[str, Cell]]) -> None:
    """Each cell can feed its outputs: snapshot figures need a snapshot, ``fig_attack`` a targeted attack,
    ``cost`` FLARE; an attack that needs one backdoor set kind (DBA: trojan) has it."""
    for cells in studies.values():
        for c in cells.values():
            need = required_backdoor(c.cfg["attack"]) if c.cfg["attack"] != "none" else None
            if need is not None and c.cfg["backdoor"] != need:
                raise StudyError(f"{c.where[0]}: attack {c.cfg['attack']!r} needs backdoor: {need}, but cell {c.id!r} "
                                 f"has backdoor: {c.cfg['backdoor']}")
            snapshots = sorted(c.outputs & set(SNAPSHOT_FIGURES))
            if snapshots and c.cfg["snapshot_round"] is None:
                raise StudyError(f"{c.where[0]}: cell {c.id!r} feeds {snapshots} but has snapshot_round: null "
                                 "(no snapshot.npz)")
            if "fig_attack" in c.outputs and not (c.cfg["attack"] != "none" and is_targeted(c.cfg["attack"])):
                raise StudyError(f"{c.where[0]}: `fig_attack` draws a backdoor cell's attackers, but cell {c.id!r} "
                                 f"has attack {c.cfg['attack']!r} (not a targeted attack)")
            if "cost" in c.outputs and c.cfg["defense"] != "flare":
                raise StudyError(f"{c.where[0]}: `cost` measures FLARE's aggregation time, but cell {c.id!r} uses "
                                 f"defense {c.cfg['defense']!r}")


def expand_studies(config: Mapping[str, Any]) -> dict[str, dict[str, Cell]]:
    """Every study of the config, checked and expanded: {study: {cell id: Cell}}. The selected
    ``study`` must be one of them."""
    for name in config["data"]["datasets"]:
        check_names("data.datasets", "dataset", [name])
    defenses = config.get("defenses")
    if isinstance(defenses, str):
        defenses = [d.strip() for d in defenses.strip("[]").split(",") if d.strip()]
    selected = config["studies"].get(config["study"], {})
    if defenses is not None and "card" not in selected:
        raise StudyError(f"defenses={defenses} selects the defenses of a report card, but study {config['study']!r} "
                         "has no `card` block")
    studies = {name: expand_study(config["studies"], name,
                                  card_defenses=defenses if name == config["study"] else None)
               for name in config["studies"]}
    if config["study"] not in studies:
        raise StudyError(f"study {config['study']!r} is not defined under `studies` "
                         f"(known: {', '.join(sorted(studies))})")
    check_outputs(studies)
    return studies


def all_cells(studies: Mapping[str, Mapping[str, Cell]]) -> dict[str, Cell]:
    """Every cell of every study by id (the first study's, for its cfg); one id is one cell across studies."""
    cells: dict[str, Cell] = {}
    for study in studies.values():
        for c in study.values():
            first = cells.setdefault(c.id, c)
            if first.cfg != c.cfg:
                raise StudyError(f"{c.where[0]}: two different cells share the id {c.id!r}; make them differ in "
                                 "a readable field")
    return cells


def check_data(config: Mapping[str, Any], study: str, cells: Iterable[Cell]) -> None:
    """Every dataset of the study's cells has a source: an entry under ``data.datasets`` whose ``mirror``
    exists (relative to the working directory), or ``download: true``, or data shipped with a package."""
    for ds in sorted({c.dataset for c in cells}):
        spec = config["data"]["datasets"].get(ds)
        if spec is None:
            raise StudyError(f"study {study!r} uses dataset {ds!r}, which has no entry under data.datasets")
        mirror = spec.get("mirror")
        if mirror:
            if not Path(mirror).expanduser().exists():
                raise StudyError(f"data.datasets.{ds}.mirror: {mirror!r} does not exist (resolved: "
                                 f"{Path(mirror).expanduser().absolute()})")
        elif not spec.get("download") and not getattr(DATASETS.get(ds), "embedded", False):
            raise StudyError(f"data.datasets.{ds}: no mirror and download: false, so study {study!r} has no "
                             f"source for {ds!r}")


def partitions(studies: Mapping[str, Mapping[str, Cell]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(dataset, partition key) -> the fields of the partition (robustfl.fl.experiment.PARTITION_FIELDS,
    aux class resolved), for every run of every study: the partition rule's params."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for cells in studies.values():
        for c in cells.values():
            for seed in sorted(c.seeds):
                rc = c.run_config(seed)
                fields = json.loads(json.dumps(rx.partition_fields(rc), sort_keys=True))
                out.setdefault((rc.dataset, rx.partition_key(rc)), {f: fields[f] for f in rx.PARTITION_FIELDS})
    return out


def manifest(cells: Iterable[Cell]) -> list[dict[str, str]]:
    """One row per cell, by id: its id, seeds, outputs and the fields that differ from RunConfig's defaults."""
    default = RunConfig().to_dict()
    rows = []
    for c in sorted(cells, key=lambda c: c.id):
        changed = {k: v for k, v in c.cfg.items() if v != default[k]}
        rows.append({"cell_id": c.id, "seeds": " ".join(map(str, sorted(c.seeds))),
                     "outputs": " ".join(sorted(c.outputs)), "overrides": json.dumps(changed, sort_keys=True)})
    return rows
