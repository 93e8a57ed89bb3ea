"""Rules table2 ... aux_ablation: one table from the runs of its cells (robustfl.reporting.tables), showing the ASR
of config `table_asr`."""
from pathlib import Path

from _pipeline import setup

log = setup(snakemake)  # noqa: F821 - injected by Snakemake

from robustfl.reporting.results import collect_runs, summarise  # noqa: E402
from robustfl.reporting.tables import write_paper_table  # noqa: E402

sm = snakemake  # noqa: F821
rounds, _ = collect_runs(sm.input.runs)
rounds["study"] = sm.wildcards.study
written = write_paper_table(summarise(rounds), sm.params.table, Path(sm.output.csv).parent, asr=sm.params.asr)
missing = sorted(set(map(str, sm.output)) - {str(p) for p in written})
if missing:
    raise RuntimeError(f"robustfl.reporting.tables.write_paper_table did not write {missing}")
log.info("wrote %s", [str(p) for p in written])
