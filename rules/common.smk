"""Shared code of the rules: config validation, study expansion, output paths and input functions.

Everything here runs when Snakemake parses the workflow, i.e. before any job: a bad config stops the
workflow with ONE line naming the offending key or value (schema, registries, empty grids, missing data
mirrors, a GPU that is not there). Cells are expanded from `studies` once; the run rule looks a cell's
RunConfig up by its id (robustfl.fl.experiment.cell_id), so a run directory's path encodes its parameters.
"""

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import jsonschema
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")

# the repository root holds the robustfl package (importable without installing it)
REPO = Path(workflow.basedir)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

try:
    from robustfl.fl import experiment as rx
    from robustfl.attacks import ATTACKS, is_targeted
    from robustfl.config import RunConfig
    from robustfl.data.datasets import DATASETS
    from robustfl.aggregation.defenses import DEFENSES
    from robustfl.models import MODELS
except ImportError as exc:  # the library is not importable: say so in one line
    raise WorkflowError(
        f"cannot import the robustfl library from {REPO} ({exc}); run snakemake from the "
        "repository's environment (pip install -e .)"
    ) from None


def fail(msg):
    """Stop before any job with one line."""
    raise WorkflowError(f"config error: {msg}")


# ------------------------------------------------------------------------------------- validation
SCHEMA_PATH = REPO / "schemas" / "config.schema.yaml"


def _where(path):
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def schema_error(cfg, schema):
    """The most relevant schema violation of `cfg` as one line, or None."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    err = jsonschema.exceptions.best_match(validator.iter_errors(cfg))
    if err is None:
        return None
    where = _where(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = sorted(err.schema.get("properties", {}))
        unknown = sorted(set(err.instance) - set(allowed))
        return f"unknown key {unknown[0]!r} at {where} (allowed: {', '.join(allowed)})"
    if err.validator == "required":
        return f"{where}: {err.message}"
    return f"bad value at {where}: {err.message}"


with open(SCHEMA_PATH) as _fh:
    CONFIG_SCHEMA = yaml.safe_load(_fh)
_msg = schema_error(config, CONFIG_SCHEMA)
if _msg:
    fail(_msg)
validate(config, str(SCHEMA_PATH))  # snakemake's validation (fills in the schema's defaults)


# ----------------------------------------------------------------------------- study -> cells
#: RunConfig fields that are not part of a cell: the seed comes from `seeds`, device and checkpoint
#: cadence from the top level (changing them must not rerun anything).
NON_CELL_FIELDS = ("seed", "device", "checkpoint_every")
CELL_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in NON_CELL_FIELDS)
DEFAULT_SEEDS = (0, 1, 2)

TABLES = ("table2", "table3", "table3_multiple", "table3_trojan", "table4", "table5", "aux_ablation")
TABLE_ASR = config.get("table_asr", "rounds")  # the ASR the tables show (robustfl.reporting.tables.ASR_DEFINITIONS)
DATASET_FIGURES = ("fig_confidence", "fig12", "fig13")  # one figure per dataset
SNAPSHOT_FIGURES = ("fig_plr", "fig_mmd", "fig4")  # one figure per designated cell (first seed)
CELL_FIGURES = ("fig_attack",)  # one figure per tagged cell, from the runs of all its seeds

REGISTRY_CHECKS = {
    "dataset": (DATASETS, ()),
    "attack": (ATTACKS, ("none",)),
    "defense": (DEFENSES, ()),
    "model": (MODELS, (None,)),
}


def check_names(where, key, values):
    if key not in REGISTRY_CHECKS:
        return
    registry, extra = REGISTRY_CHECKS[key]
    for v in values:
        if v not in extra and v not in registry:
            known = ", ".join([str(e) for e in extra if e is not None] + registry.names())
            fail(f"unknown {key} {v!r} at {where}.{key} (known: {known})")


def make_cell(overrides, where):
    """RunConfig of one grid point -> (cell id, cell dict of every CELL_FIELDS value)."""
    try:
        rc = RunConfig.from_dict(dict(overrides))
    except (TypeError, ValueError) as exc:
        shown = ", ".join(f"{k}={v}" for k, v in overrides.items())
        fail(f"{where} cell ({shown}): {exc}")
    # nested dicts (attack_params, ...) in sorted key order: the params trigger sees no spurious change
    cfg = json.loads(json.dumps({k: v for k, v in rc.to_dict().items() if k in CELL_FIELDS}, sort_keys=True))
    return rx.cell_id(rc), {k: cfg[k] for k in CELL_FIELDS}


def add_cell(cells, cid, cfg, seeds, outputs, where):
    cell = cells.get(cid)
    if cell is None:
        cells[cid] = {"id": cid, "cfg": cfg, "seeds": set(seeds), "outputs": set(outputs), "where": [where]}
        return
    if cell["cfg"] != cfg:
        fail(f"{where}: two different cells share the id {cid!r}; make them differ in a readable field")
    cell["seeds"].update(seeds)
    cell["outputs"].update(outputs)
    cell["where"].append(where)


def expand_study(name, stack=()):
    """Cells of study `name`: {cell id: {id, cfg, seeds, outputs, where}} (includes resolved)."""
    studies = config["studies"]
    if name not in studies:
        known = ", ".join(sorted(studies))
        fail(f"unknown study {name!r}" + (f" included by {stack[-1]!r}" if stack else "") + f" (known: {known})")
    if name in stack:
        fail(f"studies include each other in a cycle: {' -> '.join([*stack, name])}")
    study = studies[name]
    cells = {}
    for inc in study.get("include", []):
        for cid, c in expand_study(inc, (*stack, name)).items():
            for w in c["where"]:
                add_cell(cells, cid, c["cfg"], c["seeds"], c["outputs"], w)
    seeds = study.get("seeds", DEFAULT_SEEDS)
    base = study.get("base", {})
    for key, value in base.items():
        check_names(f"studies.{name}.base", key, [value])
    for bi, block in enumerate(study.get("grid", [])):
        where = f"studies.{name}.grid[{bi}]"
        outputs = block.get("outputs", [])
        axes = {k: v for k, v in block.items() if k != "outputs"}
        for key, values in axes.items():
            if len(values) == 0:
                fail(f"{where}.{key} is an empty list, so this grid block has zero cells")
            check_names(where, key, values)
        for combo in itertools.product(*axes.values()):
            cid, cfg = make_cell({**base, **dict(zip(axes, combo))}, where)
            add_cell(cells, cid, cfg, seeds, outputs, where)
    if not cells:
        fail(f"study {name!r} has zero cells: give it a non-empty `grid` or `include`")
    return cells


for _name in config["data"]["datasets"]:
    check_names("data.datasets", "dataset", [_name])

STUDIES = {name: expand_study(name) for name in config["studies"]}
STUDY = config["study"]
if STUDY not in STUDIES:
    fail(f"study {STUDY!r} is not defined under `studies` (known: {', '.join(sorted(STUDIES))})")

CELLS = {}  # every cell of every study, by id
for _cells in STUDIES.values():
    for _cid, _c in _cells.items():
        CELLS.setdefault(_cid, _c)

for _sname, _cells in STUDIES.items():
    for _c in _cells.values():
        _out = _c["outputs"]
        if _out & set(SNAPSHOT_FIGURES) and _c["cfg"]["snapshot_round"] is None:
            fail(f"{_c['where'][0]}: cell {_c['id']!r} feeds {sorted(_out & set(SNAPSHOT_FIGURES))} but has "
                 "snapshot_round: null (no snapshot.npz)")
        if "fig_attack" in _out and not (_c["cfg"]["attack"] != "none" and is_targeted(_c["cfg"]["attack"])):
            fail(f"{_c['where'][0]}: `fig_attack` draws a backdoor cell's attackers, but cell {_c['id']!r} has "
                 f"attack {_c['cfg']['attack']!r} (not a targeted attack)")
        if "cost" in _out and _c["cfg"]["defense"] != "flare":
            fail(f"{_c['where'][0]}: `cost` measures FLARE's aggregation time, but cell {_c['id']!r} uses "
                 f"defense {_c['cfg']['defense']!r}")


# ----------------------------------------------------------------------- data and device checks
RESULTS = config.get("results_dir", "results")
REPORTS = config.get("reports_dir", "reports")
DATA_DIR = config["data"].get("dir", "data/cache")
RAW_DIR = config["data"].get("raw_dir", "data/raw")
PART_DIR = config["data"].get("partitions_dir", "data/partitions")
EMBEDDED_DATASETS = ("digits",)  # ship with a package; need neither mirror nor download


def check_data(study):
    for ds in sorted({c["cfg"]["dataset"] for c in STUDIES[study].values()}):
        spec = config["data"]["datasets"].get(ds)
        if spec is None:
            fail(f"study {study!r} uses dataset {ds!r}, which has no entry under data.datasets")
        mirror = spec.get("mirror")
        if mirror:
            if not Path(mirror).expanduser().exists():
                fail(f"data.datasets.{ds}.mirror: {mirror!r} does not exist (resolved: "
                     f"{Path(mirror).expanduser().absolute()})")
        elif not spec.get("download") and not getattr(DATASETS.get(ds), "embedded", ds in EMBEDDED_DATASETS):
            fail(f"data.datasets.{ds}: no mirror and download: false, so study {study!r} has no source for {ds!r}")


check_data(STUDY)

DEVICE = config.get("device", "auto")


def _cuda_available():
    import torch

    return torch.cuda.is_available()


if DEVICE.startswith("cuda") and config.get("gpu_check", True) and not _cuda_available():
    fail(f"device: {DEVICE} requested but torch.cuda.is_available() is False on this machine "
         "(use device: cpu or auto; if the jobs run on other machines, e.g. SLURM, set gpu_check: false, "
         "on the command line --config gpu_check=False)")


def res(job, key, default):
    return config.get("resources", {}).get(job, {}).get(key, default)


_RUN_GPUS = res("run", "gpu", 1)
RUN_GPU = _RUN_GPUS if _RUN_GPUS and (DEVICE.startswith("cuda") or (DEVICE == "auto" and _cuda_available())) else 0


# ----------------------------------------------------------------------------------- paths
def run_dir(cid, seed):
    return f"{RESULTS}/runs/{cid}/seed{seed}"


def _cell(cid):
    try:
        return CELLS[cid]
    except KeyError:
        raise WorkflowError(f"no cell with id {cid!r} in any study of the config") from None


def cell_params(cid):
    """The run rule's params: the cell's full RunConfig minus seed/device (a change reruns the cell)."""
    return _cell(cid)["cfg"]


def cell_dataset(cid):
    return _cell(cid)["cfg"]["dataset"]


def _run_config(cid, seed):
    return RunConfig.from_dict({**_cell(cid)["cfg"], "seed": int(seed)})


PARTITIONS = {}  # (dataset, partition key) -> the RunConfig fields the partition depends on


def partition_key(cid, seed):
    rc = _run_config(cid, seed)
    key = rx.partition_key(rc)
    fields = json.loads(json.dumps(rx.partition_fields(rc), sort_keys=True))  # aux_class resolved
    PARTITIONS.setdefault((rc.dataset, key), {f: fields[f] for f in rx.PARTITION_FIELDS})
    return key


for _c in CELLS.values():
    for _s in _c["seeds"]:
        partition_key(_c["id"], _s)


def partition_path(cid, seed, ext="npz"):
    return f"{PART_DIR}/{cell_dataset(cid)}/{partition_key(cid, seed)}.{ext}"


def partition_cfg(dataset, key):
    """Params of the partition rule: exactly robustfl.fl.experiment.PARTITION_FIELDS (stable per key)."""
    try:
        return PARTITIONS[(dataset, key)]
    except KeyError:
        raise WorkflowError(f"no cell of the config uses partition {dataset}/{key}") from None


# ------------------------------------------------------------------------------- packed runs
PACK = int(config.get("pack", 1))


def run_done(cid, seed):
    """A run is done when its run.json exists: robustfl writes it last, atomically."""
    return (Path(run_dir(cid, seed)) / "run.json").exists()


def make_packs(study, size):
    """GPU batch mode: the runs of `study` not done yet, grouped by robustfl.fl.experiment.pack_group (same
    dataset, model, local-training settings, number of clients and partition) and dealt round-robin
    into jobs of at most `size` runs (so the costly attack cells spread over the jobs). A pack's id is a digest of its members; runs that
    are done are left out, so a rerun after an interruption packs only what is missing."""
    import hashlib

    groups = {}
    for c in study_cells(study):
        for s in sorted(c["seeds"]):
            if not run_done(c["id"], s):
                key = json.dumps(rx.pack_group(_run_config(c["id"], s)), default=str)
                groups.setdefault(key, []).append((c["id"], s))
    packs = []
    for key in sorted(groups):
        members = groups[key]
        k = -(-len(members) // size)
        for j in range(k):
            mem = members[j::k]
            digest = hashlib.sha1(json.dumps(mem).encode()).hexdigest()[:10]
            dataset = cell_dataset(mem[0][0])
            packs.append({"name": f"run_pack_{dataset}_{digest}", "dataset": dataset, "members": mem})
    return packs


def dataset_spec(dataset):
    return dict(config["data"]["datasets"][dataset])


def study_cells(study, output=None, dataset=None):
    if study not in STUDIES:
        raise WorkflowError(f"unknown study {study!r}")
    cells = STUDIES[study].values()
    if output is not None:
        cells = [c for c in cells if output in c["outputs"]]
    if dataset is not None:
        cells = [c for c in cells if c["cfg"]["dataset"] == dataset]
    return sorted(cells, key=lambda c: c["id"])


def run_dirs(study, output=None, dataset=None):
    """Every run directory (cell x seed) of `study`, optionally only the cells feeding `output`."""
    return [run_dir(c["id"], s) for c in study_cells(study, output, dataset) for s in sorted(c["seeds"])]


def snapshot_run(study, cid):
    """The designated snapshot run of a cell: its first seed."""
    cell = STUDIES[study].get(cid) if study in STUDIES else None
    if cell is None:
        raise WorkflowError(f"cell {cid!r} is not part of study {study!r}")
    return run_dir(cid, min(cell["seeds"]))


def cells_manifest(study):
    """One row per cell of the study (its id, seeds, outputs and non-default fields), for the report."""
    default = RunConfig().to_dict()
    rows = []
    for c in study_cells(study):
        changed = {k: v for k, v in c["cfg"].items() if v != default[k]}
        rows.append({"cell_id": c["id"], "seeds": " ".join(map(str, sorted(c["seeds"]))),
                     "outputs": " ".join(sorted(c["outputs"])), "overrides": json.dumps(changed, sort_keys=True)})
    return rows


def table_files(study, table):
    return [f"{REPORTS}/{study}/tables/{table}{suffix}.{ext}" for suffix in ("", "_long") for ext in ("csv", "md", "tex")]


def study_targets(study):
    """Everything `rule all` builds for a study."""
    targets = [
        f"{RESULTS}/studies/{study}/all_rounds.csv",
        f"{RESULTS}/studies/{study}/all_clients.csv",
        f"{RESULTS}/studies/{study}/summary.csv",
        f"{REPORTS}/{study}/cells.csv",
    ]
    for table in TABLES:
        if study_cells(study, table):
            targets += table_files(study, table)
    for fig in DATASET_FIGURES:
        for ds in sorted({c["cfg"]["dataset"] for c in study_cells(study, fig)}):
            targets.append(f"{REPORTS}/{study}/figures/{fig}_{ds}.png")
    for fig in (*SNAPSHOT_FIGURES, *CELL_FIGURES):
        for c in study_cells(study, fig):
            targets.append(f"{REPORTS}/{study}/figures/{fig}/{c['id']}.png")
    if study_cells(study, "cost"):
        targets += [f"{REPORTS}/{study}/tables/cost.csv", f"{REPORTS}/{study}/figures/cost.png"]
    if study_cells(study, "attack_sweep"):
        targets += [f"{REPORTS}/{study}/tables/attack_sweep.csv", f"{REPORTS}/{study}/tables/attack_sweep.md"]
    return targets


# ------------------------------------------------------------------------- input-function factories
def output_runs(output):
    """Input function: the run directories of the cells of {study} that feed `output`."""
    return lambda w: run_dirs(w.study, output)


def dataset_output_runs(output):
    """Input function: as output_runs, restricted to the cells of dataset {dataset}."""
    return lambda w: run_dirs(w.study, output, w.dataset)


def snapshot_input(w):
    return snapshot_run(w.study, w.cell)


def cell_runs(w):
    """Input function: the run directories of cell {cell} of {study}, one per seed."""
    cell = STUDIES[w.study].get(w.cell) if w.study in STUDIES else None
    if cell is None:
        raise WorkflowError(f"cell {w.cell!r} is not part of study {w.study!r}")
    return [run_dir(w.cell, s) for s in sorted(cell["seeds"])]


TABLE_TITLES = {
    "table2": "Table 2: accuracy, no attack",
    "table3": "Table 3: semantic backdoor attacks",
    "table3_multiple": "Table 3 (20 targeted inputs): semantic backdoor attacks",
    "table3_trojan": "Table 3 (trojan): trojan backdoor attacks",
    "table4": "Table 4: untargeted attacks",
    "table5": "Table 5: non-i.i.d. backdoor ASR",
    "aux_ablation": "FLARE's auxiliary class (ablation)",
}
