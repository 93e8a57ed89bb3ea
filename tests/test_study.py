"""robustfl.pipeline.study, .outputs and .device: a config's studies expanded into cells (grid product,
include, seeds, one cell per id), every message of the checks, the files a study builds, the GPU tokens,
and the cell ids and pack names of every committed study, unchanged (run directories are named by them)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config

from robustfl.config import RunConfig
from robustfl.fl.experiment import cell_id
from robustfl.pipeline.device import run_gpus
from robustfl.pipeline.outputs import OUTPUTS, TABLES, run_dir, run_done, study_targets, table_files
from robustfl.pipeline.packs import plan_packs
from robustfl.pipeline.study import (
    CELL_FIELDS,
    DEFAULT_SEEDS,
    StudyError,
    all_cells,
    check_data,
    check_outputs,
    check_schema,
    expand_studies,
    expand_study,
    make_cell,
    manifest,
    partitions,
)

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
BASE = {"dataset": "digits", "rounds": 2}
BACKDOOR = {"attack": ["krum_backdoor"], "n_attackers": [1]}


def config(**studies) -> dict:
    """config.yaml's top level and data with these studies, the first one selected."""
    return {**copy.deepcopy(CONFIG), "study": next(iter(studies)), "studies": studies}


def error(fn, *args) -> str:
    with pytest.raises(StudyError) as exc:
        fn(*args)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------- expansion
def test_a_block_is_the_product_of_its_lists_over_the_base():
    cells = expand_study({"s": {"base": BASE, "grid": [{"outputs": ["table2"], "defense": ["fedavg", "flare"],
                                                         "n_clients": [10, 20]}]}}, "s")
    expected = {cell_id(RunConfig(**BASE, defense=d, n_clients=n)) for d in ("fedavg", "flare") for n in (10, 20)}
    assert set(cells) == expected and len(expected) == 4
    for cid, c in cells.items():
        assert c.id == cid and c.dataset == "digits" and c.cfg["rounds"] == 2
        assert c.seeds == set(DEFAULT_SEEDS) and c.outputs == {"table2"} and c.where == ["studies.s.grid[0]"]
        assert list(c.cfg) == list(CELL_FIELDS)
        assert cell_id(c.run_config(7)) == cid and c.run_config(7).seed == 7


def test_blocks_are_united_and_one_id_is_one_cell():
    grid = [{"outputs": ["table2"], "defense": ["fedavg", "flare"]},
            {"outputs": ["fig12"], "defense": ["flare", "median"]}]
    cells = expand_study({"s": {"base": BASE, "seeds": [3], "grid": grid}}, "s")
    assert len(cells) == 3
    flare = cells[cell_id(RunConfig(**BASE, defense="flare"))]
    assert flare.outputs == {"table2", "fig12"} and flare.seeds == {3}
    assert flare.where == ["studies.s.grid[0]", "studies.s.grid[1]"]


def test_include_keeps_the_included_seeds_and_outputs_and_merges_equal_cells():
    studies = {
        "a": {"base": BASE, "seeds": [0], "grid": [{"outputs": ["table2"], "defense": ["fedavg", "flare"]}]},
        "b": {"base": BASE, "seeds": [1, 2], "include": ["a"], "grid": [{"outputs": ["table4"], "defense": ["flare"]}]},
    }
    cells = expand_study(studies, "b")
    fedavg = cells[cell_id(RunConfig(**BASE, defense="fedavg"))]
    flare = cells[cell_id(RunConfig(**BASE, defense="flare"))]
    assert (fedavg.seeds, fedavg.outputs) == ({0}, {"table2"})
    assert (flare.seeds, flare.outputs) == ({0, 1, 2}, {"table2", "table4"})
    assert flare.where == ["studies.a.grid[0]", "studies.b.grid[0]"]
    # expanding b leaves a's own cells as they were
    assert expand_study(studies, "a")[flare.id].seeds == {0}


def test_the_same_cell_in_two_studies_is_one_cell():
    studies = expand_studies(config(a={"base": BASE, "seeds": [0], "grid": [{"defense": ["flare"]}]},
                                    b={"base": BASE, "grid": [{"defense": ["flare", "median"]}]}))
    cells = all_cells(studies)
    assert set(cells) == set(studies["a"]) | set(studies["b"]) and len(cells) == 2
    (cid,) = studies["a"]
    assert cells[cid] is studies["a"][cid]  # the first study's


def test_cell_fields_are_canonical_json():
    """Nested dicts in sorted key order, every CELL_FIELDS value, seed/device/checkpoint cadence left out."""
    a = make_cell({**BASE, "attack": "krum_backdoor", "n_attackers": 1,
                   "attack_params": {"epsilon": 0.5, "boost": 2}}, "x")
    b = make_cell({**BASE, "attack": "krum_backdoor", "n_attackers": 1,
                   "attack_params": {"boost": 2, "epsilon": 0.5}}, "x")
    assert a == b and list(a[1]["attack_params"]) == ["boost", "epsilon"]
    assert set(a[1]) == set(CELL_FIELDS) and not {"seed", "device", "checkpoint_every"} & set(a[1])
    assert json.loads(json.dumps(a[1])) == a[1]


def test_partitions_hold_every_run_of_every_study():
    studies = expand_studies(config(a={"base": BASE, "seeds": [0], "grid": [{"defense": ["fedavg", "flare"]}]},
                                    b={"base": BASE, "seeds": [1], "grid": [{"defense": ["flare"],
                                                                             "n_clients": [20]}]}))
    parts = partitions(studies)
    assert len(parts) == 2  # every defense of a setting and seed shares its partition
    for c in all_cells(studies).values():
        for s in c.seeds:
            assert parts[(c.dataset, c.partition_key(s))]["seed"] == s


def test_manifest_lists_each_cell_with_its_non_default_fields():
    cells = expand_study({"s": {"base": BASE, "seeds": [2, 0], "grid": [{"outputs": ["table2", "fig12"],
                                                                          "defense": ["flare"]}]}}, "s")
    (row,) = manifest(cells.values())
    assert row == {"cell_id": next(iter(cells)), "seeds": "0 2", "outputs": "fig12 table2",
                   "overrides": json.dumps({"defense": "flare", "rounds": 2}, sort_keys=True)}  # digits: the default


# ------------------------------------------------------------------------------------ validation
def test_schema_messages_name_the_key():
    assert error(check_schema, {**CONFIG, "studdy": 1}, SCHEMA).startswith(
        "unknown key 'studdy' at <top level> (allowed:")
    assert error(check_schema, {k: v for k, v in CONFIG.items() if k != "data"}, SCHEMA) == \
        "<top level>: 'data' is a required property"
    bad = config(s={"base": {"rounds": "three"}, "grid": [{"defense": ["flare"]}]})
    assert error(check_schema, bad, SCHEMA).startswith("bad value at studies.s.base.rounds: 'three'")
    check_schema(CONFIG, SCHEMA)


@pytest.mark.parametrize("study, message", [
    ({"base": {"dataset": "fmnst"}, "grid": [{"defense": ["flare"]}]},
     "unknown dataset 'fmnst' at studies.s.base.dataset (known: "),
    ({"grid": [{"defense": ["fedavg", "flair"]}]}, "unknown defense 'flair' at studies.s.grid[0].defense (known: "),
    ({"grid": [{"attack": ["krum_backdor"], "n_attackers": [1]}]},
     "unknown attack 'krum_backdor' at studies.s.grid[0].attack (known: none, "),
    ({"grid": [{"model": ["resnet"]}]}, "unknown model 'resnet' at studies.s.grid[0].model (known: "),
    ({"grid": [{"defense": []}]}, "studies.s.grid[0].defense is an empty list, so this grid block has zero cells"),
    ({"grid": []}, "study 's' has zero cells: give it a non-empty `grid`, `card` or `include`"),
    ({"base": BASE, "grid": [{"attack": ["krum_untargeted"], "n_attackers": [5]}]},
     "studies.s.grid[0] cell (dataset=digits, rounds=2, attack=krum_untargeted, n_attackers=5): "),
    ({"include": ["t"]}, "unknown study 't' included by 's' (known: s)"),
    ({"include": ["s"]}, "studies include each other in a cycle: s -> s"),
    ({"base": BASE, "grid": [{**BACKDOOR, "attack_params": [{"epsilon": 0.5}]},
                             {**BACKDOOR, "attack_params": [{"epsilon": "0.5"}]}]},
     "studies.s.grid[1]: two different cells share the id 'n_attackers=1,attack=krumbackdoor,"
     "attack_params=epsilon0.5,rounds=2'; make them differ in a readable field"),
    ({"base": BASE, "grid": [{"outputs": ["fig_plr"], **BACKDOOR, "snapshot_round": [None]}]},
     "studies.s.grid[0]: cell 'n_attackers=1,attack=krumbackdoor,rounds=2,snapshot_round=None' "
     "feeds ['fig_plr'] but has snapshot_round: null (no snapshot.npz)"),
    ({"base": BASE, "grid": [{"outputs": ["fig_attack"], "attack": ["krum_untargeted"], "n_attackers": [1]}]},
     "studies.s.grid[0]: `fig_attack` draws a backdoor cell's attackers, but cell "
     "'n_attackers=1,attack=krumuntargeted,rounds=2' has attack 'krum_untargeted' (not a targeted attack)"),
    ({"base": BASE, "grid": [{"outputs": ["fig_attack"], "defense": ["flare"]}]},
     "has attack 'none' (not a targeted attack)"),
    ({"base": BASE, "grid": [{"outputs": ["cost"], "defense": ["median"]}]},
     "studies.s.grid[0]: `cost` measures FLARE's aggregation time, but cell 'defense=median,rounds=2' "
     "uses defense 'median'"),
    ({"base": BASE, "grid": [{"attack": ["dba"], "n_attackers": [2]}]},
     "studies.s.grid[0]: attack 'dba' needs backdoor: trojan, but cell 'n_attackers=2,attack=dba,rounds=2' "
     "has backdoor: semantic"),
])
def test_each_study_mistake_has_its_message(study, message):
    assert message in error(expand_studies, config(s=study))


def test_config_level_mistakes_have_their_messages():
    cfg = config(s={"grid": [{"defense": ["flare"]}]})
    assert error(expand_studies, {**cfg, "study": "quik"}) == "study 'quik' is not defined under `studies` (known: s)"
    cfg["data"]["datasets"]["mnist"] = {"download": True}
    assert error(expand_studies, cfg).startswith("unknown dataset 'mnist' at data.datasets.dataset (known: ")
    # the same id in two studies must be the same cell
    a = {"base": BASE, **{"grid": [{**BACKDOOR, "attack_params": [{"epsilon": 0.5}]}]}}
    b = {"base": BASE, **{"grid": [{**BACKDOOR, "attack_params": [{"epsilon": "0.5"}]}]}}
    studies = expand_studies(config(a=a, b=b))
    assert error(all_cells, studies).startswith("studies.b.grid[0]: two different cells share the id ")


def test_outputs_are_checked_in_every_study_not_only_the_selected_one():
    good = {"base": BASE, "grid": [{"defense": ["flare"]}]}
    bad = {"base": BASE, "grid": [{"outputs": ["cost"], "defense": ["median"]}]}
    assert "`cost` measures FLARE's" in error(expand_studies, config(good=good, bad=bad))
    studies = {"s": expand_study({"s": bad}, "s")}
    assert "`cost` measures FLARE's" in error(check_outputs, studies)


def test_data_sources(tmp_path):
    cfg = copy.deepcopy(CONFIG)
    datasets = cfg["data"]["datasets"]
    cifar = expand_study({"s": {"base": {"dataset": "cifar10"}, "grid": [{"defense": ["flare"]}]}}, "s").values()
    digits = expand_study({"s": {"base": BASE, "grid": [{"defense": ["flare"]}]}}, "s").values()
    check_data(cfg, "s", cifar)  # download: true
    datasets["cifar10"] = {"mirror": None, "download": False}
    assert error(check_data, cfg, "s", cifar) == \
        "data.datasets.cifar10: no mirror and download: false, so study 's' has no source for 'cifar10'"
    datasets["cifar10"] = {"mirror": str(tmp_path / "no.tar.gz"), "download": False}
    missing = str(tmp_path / "no.tar.gz")
    assert error(check_data, cfg, "s", cifar) == \
        f"data.datasets.cifar10.mirror: {missing!r} does not exist (resolved: {missing})"
    (tmp_path / "no.tar.gz").write_bytes(b"")
    check_data(cfg, "s", cifar)
    datasets["digits"] = {"mirror": None, "download": False}
    check_data(cfg, "s", digits)  # ships with scikit-learn
    del datasets["cifar10"]
    assert error(check_data, cfg, "s", cifar) == \
        "study 's' uses dataset 'cifar10', which has no entry under data.datasets"


# ------------------------------------------------------------------------------- outputs, device
def test_output_names_are_the_schemas():
    assert set(OUTPUTS) == set(SCHEMA["$defs"]["output_name"]["enum"]) and len(OUTPUTS) == len(set(OUTPUTS))


def test_study_targets(tmp_path):
    grid = [{"outputs": ["table2", "fig12"], "defense": ["flare", "median"]},
            {"outputs": ["fig_plr", "fig_attack"], **BACKDOOR, "defense": ["flare"]},
            {"outputs": ["cost"], "defense": ["flare"], "n_clients": [20]}]
    cells = expand_study({"s": {"base": BASE, "grid": grid}}, "s")
    targets = study_targets(cells.values(), "s", "R", "P")
    (snap,) = [c.id for c in cells.values() if "fig_plr" in c.outputs]
    assert targets == ["R/studies/s/all_rounds.csv", "R/studies/s/all_clients.csv", "R/studies/s/summary.csv",
                       "P/s/cells.csv", *table_files("P", "s", "table2"), "P/s/figures/fig12_digits.png",
                       f"P/s/figures/fig_plr/{snap}.png", f"P/s/figures/fig_attack/{snap}.png",
                       "P/s/tables/cost.csv", "P/s/figures/cost.png"]
    assert len(table_files("P", "s", TABLES[0])) == 6
    assert run_dir(str(tmp_path), snap, 1) == f"{tmp_path}/runs/{snap}/seed1"
    assert not run_done(str(tmp_path), snap, 1)
    Path(run_dir(str(tmp_path), snap, 1)).mkdir(parents=True)
    assert not run_done(str(tmp_path), snap, 1)  # a directory without run.json: interrupted
    (Path(run_dir(str(tmp_path), snap, 1)) / "run.json").write_text("{}")
    assert run_done(str(tmp_path), snap, 1)


@pytest.mark.parametrize("device, gpu_check, seen, tokens", [
    ("cpu", True, False, 0), ("auto", True, False, 0), ("auto", True, True, 2), ("cuda", True, True, 2),
    ("cuda:1", False, False, 2), ("cuda", False, True, 2),
])
def test_gpu_tokens(device, gpu_check, seen, tokens):
    cfg = {**CONFIG, "device": device, "gpu_check": gpu_check, "resources": {"run": {"gpu": 2}}}
    assert run_gpus(cfg, lambda: seen) == tokens
    assert run_gpus({**cfg, "resources": {}}, lambda: seen) == min(tokens, 1)
    assert run_gpus({**cfg, "resources": {"run": {"gpu": 0}}}, lambda: seen) == 0


def test_cuda_without_a_gpu_is_an_error_unless_unchecked():
    def never():
        raise AssertionError("device: cpu needs no probe")

    assert run_gpus({**CONFIG, "device": "cpu"}, never) == 0
    assert error(run_gpus, {**CONFIG, "device": "cuda:0"}, lambda: False).startswith(
        "device: cuda:0 requested but torch.cuda.is_available() is False on this machine (use device: cpu or auto;")


# ------------------------------------------------------------------------- the committed studies
FIXTURE = json.loads((REPO / "tests" / "fixtures" / "study_cells.json").read_text())


@pytest.fixture(scope="module")
def committed():
    """config.yaml with config/reproduction.yaml merged over it: every committed study, expanded."""
    cfg = copy.deepcopy(CONFIG)
    update_config(cfg, yaml.safe_load((REPO / "config" / "reproduction.yaml").read_text()))
    check_schema(cfg, SCHEMA)
    studies = expand_studies(cfg)
    all_cells(studies)
    return studies


def test_cell_ids_of_the_committed_studies_are_unchanged(committed):
    assert set(FIXTURE["studies"]) <= set(committed)  # studies and cells may be added; no id may change or vanish
    for name, fixed in FIXTURE["studies"].items():
        assert set(fixed["cells"]) <= set(committed[name]), (name, sorted(set(fixed["cells"]) - set(committed[name])))


def test_pack_names_of_the_committed_studies_are_unchanged(committed, tmp_path):
    for name, fixed in FIXTURE["studies"].items():
        if sorted(committed[name]) != fixed["cells"]:
            continue  # a study that gained cells packs them anew
        for size, names in fixed["packs"].items():
            assert [p.name for p in plan_packs(committed[name].values(), int(size), str(tmp_path))] == names, (name, size)


# ------------------------------------------------------------------------------------- report cards
CARD = {"dataset": "digits", "defenses": ["krum", "flare"], "attacks": ["krum_backdoor", "krum_untargeted"],
        "fractions": [0.2], "partitions": ["iid"]}


def test_a_card_block_expands_into_report_card_cells_with_their_seeds():
    cells = expand_study({"c": {"seeds": [0, 1], "base": {"rounds": 2}, "card": CARD}}, "c")
    # per seed: fedavg clean + fedavg x 2 attacks + 2 defenses x (clean + 2 attacks)
    assert len(cells) == 1 + 2 + 2 * 3
    for c in cells.values():
        assert c.outputs == {"report_card"} and c.seeds == {0, 1} and c.cfg["rounds"] == 2
        assert c.where == ["studies.c.card"]
    assert {c.cfg["defense"] for c in cells.values()} == {"fedavg", "krum", "flare"}
    assert {c.cfg["n_attackers"] for c in cells.values() if c.cfg["attack"] != "none"} == {2}


def test_a_card_gives_an_attack_the_backdoor_set_it_needs():
    """DBA splits the trojan trigger: its card cells get ``backdoor: trojan``, the other backdoor attacks the
    card's default (semantic)."""
    card = {**CARD, "attacks": ["dba", "krum_backdoor"]}
    cells = expand_studies(config(c={"seeds": [0], "base": {"rounds": 2}, "card": card}))["c"]
    kinds = {(c.cfg["attack"], c.cfg["backdoor"]) for c in cells.values() if c.cfg["attack"] != "none"}
    assert kinds == {("dba", "trojan"), ("krum_backdoor", "semantic")}


def test_the_top_level_defenses_replace_the_selected_cards():
    cfg = config(c={"seeds": [0], "card": CARD}, other={"seeds": [0], "card": CARD})
    cfg["defenses"] = ["median"]
    studies = expand_studies(cfg)
    assert {c.cfg["defense"] for c in studies["c"].values()} == {"fedavg", "median"}
    assert {c.cfg["defense"] for c in studies["other"].values()} == {"fedavg", "krum", "flare"}
    cfg["defenses"] = "[median, flare]"  # as a string from the command line
    assert {c.cfg["defense"] for c in expand_studies(cfg)["c"].values()} == {"fedavg", "median", "flare"}


@pytest.mark.parametrize("card, defenses, expected", [
    ({**CARD, "defenses": ["krum", "rfa"]}, None, "unknown defense 'rfa'"),
    ({**CARD, "attacks": ["alie_typo"]}, None, "unknown attack 'alie_typo'"),
    ({**CARD, "fractions": [0.5]}, None, "f = 5 >= n/2"),
    ({**CARD, "partitions": []}, None, "zero cells"),
    (CARD, [], "zero cells"),
])
def test_bad_cards_stop_with_one_line_naming_the_problem(card, defenses, expected):
    cfg = config(c={"seeds": [0], "card": card})
    if defenses is not None:
        cfg["defenses"] = defenses
    assert expected in error(expand_studies, cfg)


def test_defenses_need_a_card():
    cfg = config(q={"seeds": [0], "base": BASE, "grid": [{"defense": ["krum"]}]})
    cfg["defenses"] = ["flare"]
    assert "has no `card` block" in error(expand_studies, cfg)


def test_a_card_builds_every_defense_table_heatmap_and_the_ranking():
    cells = expand_study({"c": {"seeds": [0], "card": CARD}}, "c").values()
    targets = study_targets(cells, "c", "res", "rep")
    for d in ("fedavg", "krum", "flare"):
        assert {f"rep/c/report_card/card_{d}.{e}" for e in ("csv", "md", "tex")} <= set(targets)
        assert f"rep/c/report_card/heatmap_{d}.png" in targets
    assert {"rep/c/report_card/card_runs.csv", "rep/c/report_card/card_summary.csv",
            "rep/c/report_card/ranking.png"} <= set(targets)


def test_the_committed_cards_are_valid():
    check_schema(CONFIG, SCHEMA)
    studies = expand_studies({**CONFIG, "study": "report_card"})
    assert {c.cfg["dataset"] for c in studies["report_card"].values()} == {"cifar10"}
    assert {c.cfg["dataset"] for c in studies["report_card_quick"].values()} == {"digits"}


def test_tiny_exercises_every_attack_and_defense_and_suite_crosses_them_all(committed):
    """CI runs the tiny study: every registered attack and defense name appears in it; the `suite` study runs
    every attack against every defense on CIFAR-10."""
    from robustfl.aggregation.defenses import DEFENSES
    from robustfl.attacks import ATTACKS

    tiny = committed["tiny"].values()
    assert set(ATTACKS.names()) <= {c.cfg["attack"] for c in tiny}
    assert set(DEFENSES.names()) <= {c.cfg["defense"] for c in tiny}
    suite = committed["suite"].values()
    assert {c.cfg["dataset"] for c in suite} == {"cifar10"}
    pairs = {(c.cfg["attack"], c.cfg["defense"]) for c in suite}
    assert {(a, d) for a in ATTACKS.names() for d in DEFENSES.names()} <= pairs
