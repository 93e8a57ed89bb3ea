"""Rule cells_manifest: the study's cells (id, seeds, outputs, non-default RunConfig fields) as CSV."""
import pandas as pd
from _pipeline import setup

log = setup(snakemake)  # noqa: F821 - injected by Snakemake

from robustfl.reporting.results import write_csv  # noqa: E402

sm = snakemake  # noqa: F821
write_csv(pd.DataFrame(sm.params.cells, columns=["cell_id", "seeds", "outputs", "overrides"]), sm.output[0])
log.info("%d cells", len(sm.params.cells))
