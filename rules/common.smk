"""Glue between the config and the rules: paths, lookups and input functions.

robustfl.pipeline checks the config and expands its studies into cells while Snakemake parses the
workflow (the GPU check waits until jobs are planned: run_gpus), so a bad config stops it before any job
with ONE line naming the offending key or value. A run directory is named by its cell's id
(robustfl.fl.experiment.cell_id), so its path encodes the cell's parameters.
"""

import functools
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")

# the repository root holds the robustfl package (importable without installing it)
REPO = Path(workflow.basedir)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

try:
    from robustfl.pipeline import device, outputs, packs
    from robustfl.pipeline.study import StudyError, all_cells, check_data, check_schema, expand_studies
    from robustfl.pipeline.study import manifest, partitions
except ImportError as exc:  # the library is not importable: say so in one line
    raise WorkflowError(
        f"cannot import the robustfl library from {REPO} ({exc}); run snakemake from the "
        "repository's environment (pip install -e .)"
    ) from None


def checked(fn, *args):
    """fn(*args), its StudyError turned into a one-line WorkflowError."""
    try:
        return fn(*args)
    except StudyError as exc:
        raise WorkflowError(f"config error: {exc}") from None


SCHEMA_PATH = REPO / "schemas" / "config.schema.yaml"
with open(SCHEMA_PATH) as _fh:
    checked(check_schema, config, yaml.safe_load(_fh))
validate(config, str(SCHEMA_PATH))  # snakemake's validation (fills in the schema's defaults)

STUDIES = checked(expand_studies, config)  # {study: {cell id: Cell}}, every study checked
CELLS = checked(all_cells, STUDIES)
STUDY = config["study"]
checked(check_data, config, STUDY, STUDIES[STUDY].values())
PARTITIONS = partitions(STUDIES)  # (dataset, partition key) -> the partition rule's params

RESULTS = config.get("results_dir", "results")
REPORTS = config.get("reports_dir", "reports")
DATA_DIR = config["data"].get("dir", "data/cache")
RAW_DIR = config["data"].get("raw_dir", "data/raw")
PART_DIR = config["data"].get("partitions_dir", "data/partitions")
PACK = int(config.get("pack", 1))
TABLE_ASR = config.get("table_asr", "rounds")  # the ASR the tables show (robustfl.reporting.tables.ASR_DEFINITIONS)


def res(job, key, default):
    return config.get("resources", {}).get(job, {}).get(key, default)


@functools.cache
def run_gpus():
    """The run jobs' gpu resource and the device check (robustfl.pipeline.device.run_gpus), asked once:
    before the first job runs (onstart, rules/run.smk), or when a dry-run lists a run job."""
    return checked(device.run_gpus, config)


# ----------------------------------------------------------------------------------- lookups
def run_dir(cid, seed):
    return outputs.run_dir(RESULTS, cid, seed)


def cell(cid):
    try:
        return CELLS[cid]
    except KeyError:
        raise WorkflowError(f"no cell with id {cid!r} in any study of the config") from None


def study_cell(study, cid):
    c = STUDIES[study].get(cid) if study in STUDIES else None
    if c is None:
        raise WorkflowError(f"cell {cid!r} is not part of study {study!r}")
    return c


def cell_params(cid):
    """The run rule's params: the cell's full RunConfig minus seed/device (a change reruns the cell)."""
    return cell(cid).cfg


def cell_dataset(cid):
    return cell(cid).dataset


def partition_path(cid, seed, ext="npz"):
    return f"{PART_DIR}/{cell_dataset(cid)}/{cell(cid).partition_key(seed)}.{ext}"


def partition_cfg(dataset, key):
    """Params of the partition rule: exactly robustfl.fl.experiment.PARTITION_FIELDS (stable per key)."""
    try:
        return PARTITIONS[(dataset, key)]
    except KeyError:
        raise WorkflowError(f"no cell of the config uses partition {dataset}/{key}") from None


def dataset_spec(dataset):
    return dict(config["data"]["datasets"][dataset])


def study_cells(study, output=None, dataset=None):
    if study not in STUDIES:
        raise WorkflowError(f"unknown study {study!r}")
    cells = sorted(STUDIES[study].values(), key=lambda c: c.id)
    return [c for c in cells if (output is None or output in c.outputs) and (dataset is None or c.dataset == dataset)]


def run_dirs(study, output=None, dataset=None):
    """Every run directory (cell x seed) of `study`, optionally only the cells feeding `output`."""
    return [run_dir(c.id, s) for c in study_cells(study, output, dataset) for s in sorted(c.seeds)]


def study_targets(study):
    return outputs.study_targets(study_cells(study), study, RESULTS, REPORTS)


# ------------------------------------------------------------------------- input functions
def output_runs(output):
    """Input function: the run directories of the cells of {study} that feed `output`."""
    return lambda w: run_dirs(w.study, output)


def dataset_output_runs(output):
    """Input function: as output_runs, restricted to the cells of dataset {dataset}."""
    return lambda w: run_dirs(w.study, output, w.dataset)


def snapshot_input(w):
    """Input function: the designated snapshot run of cell {cell}: its first seed."""
    return run_dir(w.cell, min(study_cell(w.study, w.cell).seeds))


def cell_runs(w):
    """Input function: the run directories of cell {cell} of {study}, one per seed."""
    return [run_dir(w.cell, s) for s in sorted(study_cell(w.study, w.cell).seeds)]
