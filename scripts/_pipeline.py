"""Shared glue of the pipeline scripts: import path and logging. No experiment logic lives here."""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup(snakemake) -> logging.Logger:  # noqa: ANN001 - the object Snakemake injects
    """Make the repository's ``robustfl`` importable and send logging, warnings and stderr (so also
    tracebacks) to the job's log file. Returns the "robustfl" logger."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if snakemake.log:
        log_path = Path(str(snakemake.log[0]))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_path, "w", buffering=1)  # noqa: SIM115 - kept open for the job's lifetime
        sys.stderr = stream
        handler: logging.Handler = logging.StreamHandler(stream)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    log = logging.getLogger("robustfl")
    log.info("rule %s, wildcards %s", snakemake.rule, dict(snakemake.wildcards.items()))
    return log


def run_config(snakemake, cell_cfg: dict, seed: int):  # noqa: ANN001, ANN201 - Snakemake's object; a RunConfig
    """A run's RunConfig: the cell's fields (rule params; a change reruns the run), the seed, and the
    top-level ``device`` and ``checkpoint_every`` (not cell fields: switching them reruns nothing)."""
    from robustfl.config import RunConfig

    return RunConfig.from_dict({**cell_cfg, "seed": int(seed), "device": snakemake.config.get("device", "auto"),
                                "checkpoint_every": int(snakemake.config.get("checkpoint_every", 5))})
