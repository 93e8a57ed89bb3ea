"""Rule cost: FLARE's aggregation time per round at each n (Section 7.4), from the cost-tagged runs.

The time is the `agg_s` column the simulator measures in every round of a FLARE run (PLRs of the n
local models on the auxiliary set + MMD + trust + aggregation), averaged over rounds and seeds."""
from _pipeline import setup

log = setup(snakemake)  # noqa: F821 - injected by Snakemake

from robustfl.reporting import figures  # noqa: E402
from robustfl.reporting.results import collect_runs, summarise, write_csv  # noqa: E402

sm = snakemake  # noqa: F821
rounds, _ = collect_runs(sm.input.runs)
summary = summarise(rounds)
write_csv(figures.cost_frame(summary), sm.output.csv)
figures.fig_cost(summary, sm.output.png)
log.info("wrote %s, %s", sm.output.csv, sm.output.png)
