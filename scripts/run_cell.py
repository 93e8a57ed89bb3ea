"""Rule run_cell: run one cell x seed (robustfl.fl.experiment.run_cell).

The cell's RunConfig comes from params (a change reruns the cell); seed from the path; device and
checkpoint cadence from the top-level config (_pipeline.run_config)."""
from pathlib import Path

from _pipeline import run_config, setup

log = setup(snakemake)  # noqa: F821 - injected by Snakemake

import torch  # noqa: E402

from robustfl.fl.experiment import run_cell  # noqa: E402

sm = snakemake  # noqa: F821
torch.set_num_threads(max(1, int(sm.threads)))
cfg = run_config(sm, sm.params.cfg, sm.wildcards.seed)
final = run_cell(cfg, Path(sm.input.data), Path(sm.input.partition), Path(sm.output[0]),
                 cell={"cell_id": sm.wildcards.cell})
log.info("final metrics: %s", final)
