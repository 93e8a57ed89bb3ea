"""Rule prepare_data: decode one dataset into the .npy cache (robustfl.data.datasets.prepare)."""
from _pipeline import setup

log = setup(snakemake)  # noqa: F821 - injected by Snakemake

from robustfl.data.datasets import prepare  # noqa: E402

out = prepare(snakemake.wildcards.dataset, snakemake.params.spec, snakemake.output[0],  # noqa: F821
              raw_dir=snakemake.params.raw_dir, force=True)  # noqa: F821
log.info("prepared %s", out)
