# Stage 5b: the defense report card (robustfl.reporting.report_card) of a study with a `card` block: the
# runs reduced to one row each and summarised per defense x setting, then each defense's table and heatmap
# and the ranking across defenses.


rule card_frames:
    input:
        runs=output_runs("report_card"),
    output:
        runs=report(
            f"{REPORTS}/{{study}}/report_card/card_runs.csv",
            caption="../reports/captions/report_card_runs.rst",
            category="Report card",
            subcategory="Tidy frames",
            labels={"file": "one row per run"},
        ),
        summary=report(
            f"{REPORTS}/{{study}}/report_card/card_summary.csv",
            caption="../reports/captions/report_card_runs.rst",
            category="Report card",
            subcategory="Tidy frames",
            labels={"file": "one row per defense and setting"},
        ),
    log:
        f"{RESULTS}/logs/report_card/{{study}}/frames.log",
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/report_card.py"


rule card_defense:
    input:
        runs=f"{REPORTS}/{{study}}/report_card/card_runs.csv",
        summary=f"{REPORTS}/{{study}}/report_card/card_summary.csv",
    output:
        csv=report(
            f"{REPORTS}/{{study}}/report_card/card_{{defense}}.csv",
            caption="../reports/captions/report_card.rst",
            category="Report card",
            subcategory="{defense}",
            labels={"defense": "{defense}", "file": "table"},
        ),
        md=f"{REPORTS}/{{study}}/report_card/card_{{defense}}.md",
        tex=f"{REPORTS}/{{study}}/report_card/card_{{defense}}.tex",
        heatmap=report(
            f"{REPORTS}/{{study}}/report_card/heatmap_{{defense}}.png",
            caption="../reports/captions/report_card_heatmap.rst",
            category="Report card",
            subcategory="{defense}",
            labels={"defense": "{defense}", "file": "heatmap"},
        ),
    log:
        f"{RESULTS}/logs/report_card/{{study}}/{{defense}}.log",
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/report_card.py"


rule card_ranking:
    input:
        summary=f"{REPORTS}/{{study}}/report_card/card_summary.csv",
    output:
        png=report(
            f"{REPORTS}/{{study}}/report_card/ranking.png",
            caption="../reports/captions/report_card_ranking.rst",
            category="Report card",
            subcategory="Ranking",
            labels={"figure": "ranking across defenses"},
        ),
    log:
        f"{RESULTS}/logs/report_card/{{study}}/ranking.log",
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/report_card.py"
