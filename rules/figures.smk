# Stage 6: the paper's figures (robustfl.reporting.figures), each fed by exactly the runs of its cells.


rule fig_confidence:
    input:
        runs=dataset_output_runs("fig_confidence"),
    output:
        report(
            f"{REPORTS}/{{study}}/figures/fig_confidence_{{dataset}}.png",
            caption="../reports/captions/fig_confidence.rst",
            category="Figures",
            subcategory="Figures 7-9: confidence on targeted inputs",
            labels={"figure": "Figures 7-9", "dataset": "{dataset}"},
        ),
    params:
        kind="confidence",
    log:
        f"{RESULTS}/logs/figures/{{study}}/fig_confidence_{{dataset}}.log",
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/fig_runs.py"


rule fig12:
    input:
        runs=dataset_output_runs("fig12"),
    output:
        report(
            f"{REPORTS}/{{study}}/figures/fig12_{{dataset}}.png",
            caption="../reports/captions/fig12.rst",
            category="Figures",
            subcategory="Figure 12: clients, attackers, auxiliary size",
            labels={"figure": "Figure 12", "dataset": "{dataset}"},
        ),
    params:
        kind="scaling",
    log:
        f"{RESULTS}/logs/figures/{{study}}/fig12_{{dataset}}.log",
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/fig_runs.py"


rule fig13:
    input:
        runs=dataset_output_runs("fig13"),
    output:
        report(
            f"{REPORTS}/{{study}}/figures/fig13_{{dataset}}.png",
            caption="../reports/captions/fig13.rst",
            category="Figures",
            subcategory="Figure 13: adaptive attack",
            labels={"figure": "Figure 13", "dataset": "{dataset}"},
        ),
    params:
        kind="adaptive",
    log:
        f"{RESULTS}/logs/figures/{{study}}/fig13_{{dataset}}.log",
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/fig_runs.py"


rule fig_attack:
    input:
        runs=cell_runs,
    output:
        report(
            f"{REPORTS}/{{study}}/figures/fig_attack/{{cell}}.png",
            caption="../reports/captions/fig_attack.rst",
            category="Attack diagnostics",
            subcategory="Attackers' distance, Krum rank and selection per round",
            labels={"figure": "attack diagnostics", "cell": "{cell}"},
        ),
    params:
        kind="attack",
    log:
        f"{RESULTS}/logs/figures/{{study}}/fig_attack/{{cell}}.log",
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/fig_runs.py"


rule fig_plr:
    input:
        run=snapshot_input,
    output:
        report(
            f"{REPORTS}/{{study}}/figures/fig_plr/{{cell}}.png",
            caption="../reports/captions/fig_plr.rst",
            category="PLR figures",
            subcategory="Figures 1a, 6, 10, 11: PLR projection",
            labels={"figure": "PLR projection", "cell": "{cell}"},
        ),
    params:
        kind="plr",
    log:
        f"{RESULTS}/logs/figures/{{study}}/fig_plr/{{cell}}.log",
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/fig_snapshot.py"


rule fig_mmd:
    input:
        run=snapshot_input,
    output:
        report(
            f"{REPORTS}/{{study}}/figures/fig_mmd/{{cell}}.png",
            caption="../reports/captions/fig_mmd.rst",
            category="PLR figures",
            subcategory="Figure 1b: mean MMD per model",
            labels={"figure": "mean MMD", "cell": "{cell}"},
        ),
    params:
        kind="mmd",
    log:
        f"{RESULTS}/logs/figures/{{study}}/fig_mmd/{{cell}}.log",
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/fig_snapshot.py"


rule fig4:
    input:
        run=snapshot_input,
    output:
        report(
            f"{REPORTS}/{{study}}/figures/fig4/{{cell}}.png",
            caption="../reports/captions/fig4.rst",
            category="PLR figures",
            subcategory="Figure 4: PLRs of single inputs",
            labels={"figure": "Figure 4", "cell": "{cell}"},
        ),
    params:
        kind="plr_single",
    log:
        f"{RESULTS}/logs/figures/{{study}}/fig4/{{cell}}.log",
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/fig_snapshot.py"


rule cost:
    input:
        runs=output_runs("cost"),
    output:
        csv=report(
            f"{REPORTS}/{{study}}/tables/cost.csv",
            caption="../reports/captions/cost.rst",
            category="Figures",
            subcategory="Section 7.4: FLARE cost",
            labels={"figure": "FLARE cost", "file": "table"},
        ),
        png=report(
            f"{REPORTS}/{{study}}/figures/cost.png",
            caption="../reports/captions/cost.rst",
            category="Figures",
            subcategory="Section 7.4: FLARE cost",
            labels={"figure": "FLARE cost", "file": "figure"},
        ),
    log:
        f"{RESULTS}/logs/figures/{{study}}/cost.log",
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/cost.py"
