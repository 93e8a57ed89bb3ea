"""The logic of the Snakemake pipeline, importable and tested without Snakemake.

- :mod:`robustfl.pipeline.study`: the config checked (schema, registry names, RunConfig's rules, the
  outputs each cell feeds, the data sources of a study) and its ``studies`` expanded into cells;
- :mod:`robustfl.pipeline.outputs`: the tables and figures a study builds, as files;
- :mod:`robustfl.pipeline.packs`: a study's runs dealt into pack jobs (GPU batch mode, ``pack: N``);
- :mod:`robustfl.pipeline.device`: the run jobs' GPU tokens and the ``device: cuda`` check;
- :mod:`robustfl.pipeline.card`: the runs of a defense report card (a study's ``card`` block).

Functions take the config dict and explicit arguments (results directory, ...) and raise
:class:`~robustfl.pipeline.study.StudyError` with a one-line message; ``rules/common.smk`` calls them
while Snakemake parses the workflow and turns that error into Snakemake's ``WorkflowError``.
"""
