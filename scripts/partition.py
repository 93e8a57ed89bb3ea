"""Rule partition: build one client partition (robustfl.fl.experiment.build_partition)."""
from pathlib import Path

from _pipeline import setup

log = setup(snakemake)  # noqa: F821 - injected by Snakemake

from robustfl.config import RunConfig  # noqa: E402
from robustfl.fl.experiment import build_partition, partition_key  # noqa: E402

cfg = RunConfig.from_dict(snakemake.params.cfg)  # noqa: F821
if partition_key(cfg) != snakemake.wildcards.pkey:  # noqa: F821
    raise ValueError(f"partition key {partition_key(cfg)!r} of the params differs from the path's "
                     f"{snakemake.wildcards.pkey!r}")  # noqa: F821
build_partition(Path(snakemake.input.data), cfg, Path(snakemake.output.npz))  # noqa: F821
log.info("partition %s written", snakemake.output.npz)  # noqa: F821
