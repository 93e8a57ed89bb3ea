"""Rules card_frames, card_defense, card_ranking: the defense report card (robustfl.reporting.report_card)."""
from _pipeline import setup

log = setup(snakemake)  # noqa: F821 - injected by Snakemake

import pandas as pd  # noqa: E402

from robustfl.reporting import report_card as rc  # noqa: E402
from robustfl.reporting.results import collect_runs, write_csv  # noqa: E402

sm = snakemake  # noqa: F821
if sm.rule == "card_frames":
    runs = rc.card_runs(*collect_runs(sm.input.runs))
    write_csv(runs, sm.output.runs)
    write_csv(rc.card_summary(runs), sm.output.summary)
    log.info("%d runs summarised", len(runs))
elif sm.rule == "card_defense":
    runs, summary = pd.read_csv(sm.input.runs), pd.read_csv(sm.input.summary)
    rc.write_card_tables(summary, sm.wildcards.defense, sm.output.csv[: -len(".csv")])
    rc.heatmap(runs, sm.wildcards.defense, sm.output.heatmap)
else:
    rc.ranking(pd.read_csv(sm.input.summary), sm.output.png)
