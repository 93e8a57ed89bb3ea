"""Rule attack_sweep: per cell, how often the rule selected the attackers, per-round ASR and the accuracy
cost against the attack-free cell of the same rule (robustfl.reporting.sweep)."""
from _pipeline import setup

log = setup(snakemake)  # noqa: F821 - injected by Snakemake

from robustfl.reporting import sweep  # noqa: E402
from robustfl.io import atomic_write_text  # noqa: E402
from robustfl.reporting.results import collect_runs, write_csv  # noqa: E402

sm = snakemake  # noqa: F821
rounds, clients = collect_runs(sm.input.runs)
table = sweep.sweep_table(rounds, clients)
write_csv(table, sm.output.csv)
atomic_write_text(sm.output.md, sweep.sweep_markdown(table))
log.info("wrote %s, %s (%d cells)", sm.output.csv, sm.output.md, len(table))
