"""Rules fig_plr, fig_mmd, fig4: a figure from the snapshot.npz of a designated run (robustfl.reporting.figures)."""
from pathlib import Path

from _pipeline import setup

log = setup(snakemake)  # noqa: F821 - injected by Snakemake

from robustfl.reporting import figures  # noqa: E402

sm = snakemake  # noqa: F821
snapshot = Path(sm.input.run) / "snapshot.npz"
if not snapshot.is_file():
    raise FileNotFoundError(f"{snapshot} is missing: the run was made with snapshot_round: null")
out = sm.output[0]
kind = sm.params.kind
if kind == "plr":  # Figures 1a, 6, 10, 11
    figures.fig_plr(snapshot, out)
elif kind == "plr_single":  # Figure 4: one input per class
    figures.fig_plr(snapshot, out, per_class=1)
elif kind == "mmd":  # Figure 1b
    figures.fig_mmd(snapshot, out)
else:
    raise ValueError(f"unknown figure kind {kind!r}")
log.info("wrote %s", out)
