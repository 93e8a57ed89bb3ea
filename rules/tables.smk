# Stage 5: the paper's tables (robustfl.reporting.tables), one rule per table, each fed by exactly the runs of the
# cells tagged with it (so a changed cell rebuilds only the tables it appears in). Written as
# <name>.{csv,md,tex} (paper layout, ours beside the paper's value) and <name>_long.{csv,md,tex} (tidy).
# ASR: config `table_asr` (rounds = the paper's, default; final = the last round's); captions say which.

for _table in outputs.TABLES:

    rule:
        name:
            _table
        input:
            runs=output_runs(_table),
        output:
            csv=report(
                f"{REPORTS}/{{study}}/tables/{_table}.csv",
                caption=f"../reports/captions/{_table}.rst",
                category="Tables",
                subcategory=outputs.TABLE_TITLES[_table],
                labels={"table": outputs.TABLE_TITLES[_table], "layout": "paper"},
            ),
            md=f"{REPORTS}/{{study}}/tables/{_table}.md",
            tex=f"{REPORTS}/{{study}}/tables/{_table}.tex",
            long_csv=report(
                f"{REPORTS}/{{study}}/tables/{_table}_long.csv",
                caption=f"../reports/captions/{_table}.rst",
                category="Tables",
                subcategory=outputs.TABLE_TITLES[_table],
                labels={"table": outputs.TABLE_TITLES[_table], "layout": "long (one row per cell and metric)"},
            ),
            long_md=f"{REPORTS}/{{study}}/tables/{_table}_long.md",
            long_tex=f"{REPORTS}/{{study}}/tables/{_table}_long.tex",
        params:
            table=_table,
            asr=TABLE_ASR,
        log:
            f"{RESULTS}/logs/tables/{{study}}/{_table}.log",
        conda:
            "../envs/robustfl.yaml"
        script:
            "../scripts/make_table.py"


rule attack_sweep:
    input:
        runs=output_runs("attack_sweep"),
    output:
        csv=report(
            f"{REPORTS}/{{study}}/tables/attack_sweep.csv",
            caption="../reports/captions/attack_sweep.rst",
            category="Tables",
            subcategory="Attack sweep: each attack against its own target rule",
            labels={"table": "attack sweep", "file": "csv"},
        ),
        md=f"{REPORTS}/{{study}}/tables/attack_sweep.md",
    log:
        f"{RESULTS}/logs/tables/{{study}}/attack_sweep.log",
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/attack_sweep.py"
