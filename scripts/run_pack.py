"""Dynamic rule run_pack_*: several runs (cell x seed) trained together in one process
(robustfl.fl.experiment.run_cells). Glue only, like run_cell.py: RunConfigs from params and the top-level
config (_pipeline.run_config)."""
from pathlib import Path

from _pipeline import run_config, setup

log = setup(snakemake)  # noqa: F821 - injected by Snakemake

import torch  # noqa: E402

from robustfl.fl.experiment import run_cells  # noqa: E402

sm = snakemake  # noqa: F821
torch.set_num_threads(max(1, int(sm.threads)))
cfgs = [run_config(sm, cfg, seed) for cfg, seed in zip(sm.params.cfgs, sm.params.seeds)]
finals = run_cells(cfgs, Path(sm.input.data), [Path(p) for p in sm.input.partitions],
                   [Path(o) for o in sm.output], cells=[{"cell_id": c} for c in sm.params.cells])
for cell, seed, final in zip(sm.params.cells, sm.params.seeds, finals):
    log.info("final metrics of %s seed %s: %s", cell, seed, final)
