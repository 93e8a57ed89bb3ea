"""Rule run_cell: run one cell x seed (robustfl.experiment.run_cell).

The cell's RunConfig comes from params (a change reruns the cell); seed from the path; device and
checkpoint cadence from the top-level config (not params: switching them must not rerun anything)."""
from pathlib import Path

from _pipeline import setup

log = setup(snakemake)  # noqa: F821 - injected by Snakemake

import torch  # noqa: E402

from robustfl.config import RunConfig  # noqa: E402
from robustfl.experiment import run_cell  # noqa: E402

sm = snakemake  # noqa: F821
torch.set_num_threads(max(1, int(sm.threads)))
cfg = RunConfig.from_dict({
    **sm.params.cfg,
    "seed": int(sm.wildcards.seed),
    "device": sm.config.get("device", "auto"),
    "checkpoint_every": int(sm.config.get("checkpoint_every", 5)),
})
final = run_cell(cfg, Path(sm.input.data), Path(sm.input.partition), Path(sm.output[0]),
                 cell={"cell_id": sm.wildcards.cell})
log.info("final metrics: %s", final)
