# robustfl: reproduce every table and figure of FLARE (Wang et al., ASIA CCS '22).
#
#   snakemake --cores all                                   # the `quick` study (offline, digits)
#   snakemake --profile profiles/local --config study=full # the paper (needs the datasets)
#   snakemake --report reports/quick/report.html            # HTML report of the built study
#
# See docs/pipeline.md. Stages: data -> partition -> run -> aggregate -> tables / figures -> report.

configfile: "config.yaml"


include: "rules/common.smk"


report: "reports/captions/workflow.rst"


wildcard_constraints:
    study=r"[A-Za-z0-9_-]+",
    dataset=r"[A-Za-z0-9_]+",
    cell=r"[^/]+",
    defense=r"[A-Za-z0-9_]+",
    pkey=r"[^/]+",
    seed=r"\d+",


localrules:
    all,
    aggregate,
    cells_manifest,
    table2,
    table3,
    table3_multiple,
    table3_trojan,
    table4,
    table5,
    aux_ablation,
    fig_confidence,
    fig12,
    fig13,
    fig_attack,
    fig_plr,
    fig_mmd,
    fig4,
    cost,
    attack_sweep,
    card_frames,
    card_defense,
    card_ranking,


rule all:
    input:
        study_targets(STUDY),
    default_target: True


include: "rules/data.smk"
include: "rules/partition.smk"
include: "rules/run.smk"
include: "rules/aggregate.smk"
include: "rules/tables.smk"
include: "rules/report_card.smk"
include: "rules/figures.smk"
include: "rules/report.smk"
