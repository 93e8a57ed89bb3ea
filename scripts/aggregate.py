"""Rule aggregate: every run of a study -> all_rounds.csv, all_clients.csv, summary.csv (robustfl.reporting.results)."""
from _pipeline import setup

log = setup(snakemake)  # noqa: F821 - injected by Snakemake

from robustfl.reporting.results import collect_runs, summarise, write_csv  # noqa: E402

sm = snakemake  # noqa: F821
rounds, clients = collect_runs(sm.input.runs)
# runs are shared between studies (a run belongs to its cell, not to a study): label them here
rounds["study"] = sm.wildcards.study
clients["study"] = sm.wildcards.study
summary = summarise(rounds)
write_csv(rounds, sm.output.rounds)
write_csv(clients, sm.output.clients)
write_csv(summary, sm.output.summary)
log.info("%d runs, %d cells", rounds["run_dir"].nunique(), len(summary))
