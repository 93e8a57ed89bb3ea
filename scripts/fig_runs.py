"""Rules fig_confidence, fig12, fig13, fig_attack: a figure from the runs of its cells (robustfl.reporting.figures)."""
from _pipeline import setup

log = setup(snakemake)  # noqa: F821 - injected by Snakemake

from robustfl.reporting import figures  # noqa: E402
from robustfl.reporting.results import collect_runs, summarise  # noqa: E402

sm = snakemake  # noqa: F821
rounds, clients = collect_runs(sm.input.runs)
out = sm.output[0]
kind = sm.params.kind
if kind == "confidence":  # Figures 7-9
    figures.fig_confidence(rounds, out)
elif kind == "scaling":  # Figure 12
    figures.fig_scaling(summarise(rounds), out, dataset=sm.wildcards.dataset)
elif kind == "adaptive":  # Figure 13
    figures.fig_adaptive(rounds, clients, out)
elif kind == "attack":  # per-round attack diagnostics of one cell (all its seeds)
    figures.fig_attack(rounds, clients, out)
else:
    raise ValueError(f"unknown figure kind {kind!r}")
log.info("wrote %s", out)
