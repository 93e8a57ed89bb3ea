"""The run jobs' GPU tokens (Snakemake resource ``gpu``) and the ``device: cuda`` check.

Asked once there are jobs (the run rules' ``gpu`` resource; ``onstart`` before the first job runs), not
while Snakemake parses the workflow: linting, reports and studies with nothing left to run never
initialise CUDA."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from robustfl.pipeline.study import StudyError


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU on this machine (torch imported here, on the first call)."""
    import torch

    return torch.cuda.is_available()


def run_gpus(config: Mapping[str, Any], probe: Callable[[], bool] = cuda_available) -> int:
    """GPU tokens of a run job: ``resources.run.gpu`` (default 1) when ``device`` is ``cuda``/``cuda:N``,
    or ``auto`` and ``probe()`` sees a GPU; else 0. ``device: cuda`` where ``probe()`` sees none is a
    StudyError unless ``gpu_check: false`` (jobs running on other machines, e.g. SLURM)."""
    device = config.get("device", "auto")
    if device.startswith("cuda") and config.get("gpu_check", True) and not probe():
        raise StudyError(f"device: {device} requested but torch.cuda.is_available() is False on this machine "
                         "(use device: cpu or auto; if the jobs run on other machines, e.g. SLURM, set gpu_check: "
                         "false, on the command line --config gpu_check=False)")
    gpus = config.get("resources", {}).get("run", {}).get("gpu", 1)
    return gpus if gpus and (device.startswith("cuda") or (device == "auto" and probe())) else 0
