"""Config fuzz (hypothesis): every invalid config is rejected with a message naming the offending key, every
valid one is accepted, by the pipeline's own validation code (robustfl.pipeline.study, as rules/common.smk
calls it while Snakemake parses the workflow: the JSON schema first, then the registry names, the cells'
RunConfig and the outputs they feed).
Configs are made by mutating config.yaml: unknown keys at every closed level, wrong types and out-of-range
values for known keys (invalid by construction, double-checked against the key's own sub-schema), and
in-range values (valid by construction).
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from robustfl.attacks import ATTACKS, required_backdoor
from robustfl.data.datasets import DATASETS
from robustfl.aggregation.defenses import DEFENSES
from robustfl.config import RunConfig
from robustfl.models import MODELS
from robustfl.pipeline.study import StudyError, check_schema, dotted, expand_studies

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
FULL_CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
# config.yaml with fewer cells (~10 ms per validation): its top level, data, and two studies holding every
# study key (description, base with run settings, seeds, include, grid blocks with outputs and lists)
CONFIG = copy.deepcopy(FULL_CONFIG)
_quick = FULL_CONFIG["studies"]["quick"]
CONFIG["studies"] = {
    "quick": {**_quick, "base": {**_quick["base"], "rounds": 3, "local_epochs": 1}, "grid": _quick["grid"][:3]},
    "tiny": {"description": "includes quick", "include": ["quick"], "seeds": [0],
             "grid": FULL_CONFIG["studies"]["tiny"]["grid"][:1]},
}
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------- the pipeline's validation code
def rejection(cfg: dict) -> str | None:
    """The pipeline's one-line message for ``cfg``, or None if it is accepted."""
    try:
        check_schema(cfg, SCHEMA)
        expand_studies(cfg)
    except StudyError as exc:
        assert "\n" not in str(exc)  # one line
        return str(exc)
    return None


def test_unmutated_configs_are_accepted():
    assert rejection(copy.deepcopy(FULL_CONFIG)) is None
    assert rejection(copy.deepcopy(CONFIG)) is None


# -------------------------------------------------------------------------- walking config + schema
def resolve(node: dict) -> dict:
    while "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].split("/")[-1]]
    return node


def child_schema(node: dict, key) -> dict | None:
    node = resolve(node)
    if isinstance(key, int):
        return node.get("items")
    props = node.get("properties", {})
    if key in props:
        return props[key]
    extra = node.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def walk(value, schema, path=()):
    """(path, sub-schema, value) of every node of the config below the root."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for k, v in items:
        sub = child_schema(schema, k)
        if sub is None:
            continue
        yield (*path, k), sub, v
        yield from walk(v, sub, (*path, k))


NODES = list(walk(CONFIG, SCHEMA))
CLOSED = [((), SCHEMA)] + [(p, s) for p, s, v in NODES
                           if isinstance(v, dict) and resolve(s).get("additionalProperties") is False]
# one closed object per distinct schema (every grid block has the same schema, ...)
KINDS = list({json.dumps(resolve(s), sort_keys=True): (p, s) for p, s in reversed(CLOSED)}.values())
# every key a closed object may hold (present in config.yaml or not), and the items of present lists
SLOTS = [((*p, k), sub) for p, s in CLOSED for k, sub in resolve(s).get("properties", {}).items()]
SLOTS += [(p, s) for p, s, v in NODES if isinstance(p[-1], int)]
SLOTS = sorted({repr(p): (p, s) for p, s in SLOTS}.values(), key=lambda x: repr(x[0]))


def leaf_validator(sub: dict):
    return jsonschema.validators.validator_for(SCHEMA)({"$defs": SCHEMA["$defs"], **sub})


def get(cfg, path):
    for p in path:
        cfg = cfg[p]
    return cfg


def put(cfg, path, value):
    out = copy.deepcopy(cfg)
    get(out, path[:-1])[path[-1]] = value
    return out


def last_key(path) -> str:
    return next(str(p) for p in reversed(path) if isinstance(p, str))


def names_path(msg: str, path) -> bool:
    """The message names the key: its dotted location (with [i] for list items), or the key itself quoted
    (unknown or missing keys)."""
    where = dotted(list(path))
    return where in msg or repr(last_key(path)) in msg


def test_the_fuzz_covers_every_kind_of_object():
    kinds = {json.dumps(resolve(s), sort_keys=True) for p, s in KINDS}
    assert len(kinds) == len(KINDS) >= 8  # top, resources, job, data, dataset, study, base, grid block
    assert len(SLOTS) > 100


# ---------------------------------------------------------------------------------- invalid configs
KEY = st.from_regex(r"[a-z][a-z_]{1,12}", fullmatch=True)
ANY = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(-2, 2, allow_nan=False),
                st.text(max_size=5), st.lists(st.integers(0, 3), max_size=2),
                st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))


@pytest.mark.parametrize("loc", KINDS, ids=[dotted(list(p)) for p, _ in KINDS])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=KEY, value=ANY)
def test_unknown_key_is_rejected_naming_it(loc, key, value):
    path, sub = loc
    assume(key not in resolve(sub).get("properties", {}))
    cfg = copy.deepcopy(CONFIG)
    get(cfg, path)[key] = value
    msg = rejection(cfg)
    assert msg is not None, f"accepted unknown key {key!r} at {path}"
    assert f"unknown key {key!r}" in msg, msg


BAD_VALUES = ["has space/", -1, -100, 0, 1.5, True, None, [], [0, 0], {"a": 1}, "", "table9", 10**9, 1e-9]


def violations(sub: dict) -> st.SearchStrategy:
    """Values likely to violate ``sub``: other JSON types, and out-of-range values of its own type."""
    s = resolve(sub)
    cands = [ANY, st.sampled_from(BAD_VALUES)]
    if "minimum" in s:
        cands.append(st.integers(-100, int(s["minimum"]) - 1))
    if "exclusiveMinimum" in s:
        cands.append(st.sampled_from([s["exclusiveMinimum"], s["exclusiveMinimum"] - 1e-3, -1]))
    if "maximum" in s or "exclusiveMaximum" in s:
        cands.append(st.sampled_from([s.get("maximum", s.get("exclusiveMaximum")) + 1, 10.0, 1e9]))
    if "enum" in s:
        cands.append(st.sampled_from([f"{e}x" for e in s["enum"]]))
    if "pattern" in s:
        cands.append(st.sampled_from(["has space", "a/b", "", "ümlaut", "9" * 31]))
    if s.get("type") == "array" and isinstance(s.get("items"), dict):
        cands.append(violations(s["items"]).map(lambda x: [x]))
    return st.one_of(cands)


@st.composite
def invalid_mutation(draw):
    path, sub = draw(st.sampled_from(SLOTS))
    value = draw(violations(sub))
    assume(not leaf_validator(sub).is_valid(value))  # invalid for its own key's schema, by construction
    return path, value


def check_rejected(path, value) -> None:
    msg = rejection(put(CONFIG, path, value))
    assert msg is not None, f"accepted {value!r} at {path}"
    assert names_path(msg, path), (path, value, msg)


@FUZZ
@given(invalid_mutation())
def test_wrong_type_or_out_of_range_is_rejected_naming_the_key(mutation):
    check_rejected(*mutation)


@pytest.mark.parametrize("path, sub", SLOTS, ids=[dotted(list(p)) for p, _ in SLOTS])
def test_every_key_rejects_an_invalid_value(path, sub):
    """Deterministic sweep: every key the schema knows, one value invalid for it."""
    value = next(v for v in BAD_VALUES if not leaf_validator(sub).is_valid(v))
    check_rejected(path, value)


def test_missing_required_keys_are_named():
    for path in (("study",), ("data",), ("studies",), ("data", "datasets"), ("data", "datasets", "digits", "mirror")):
        cfg = copy.deepcopy(CONFIG)
        del get(cfg, path[:-1])[path[-1]]
        msg = rejection(cfg)
        assert msg is not None and repr(path[-1]) in msg, (path, msg)


def test_empty_grid_axis_is_rejected_naming_it():
    """Schema-valid but zero cells: the pipeline's own check names the key."""
    msg = rejection(put(CONFIG, ("studies", "quick", "grid", 0, "defense"), []))
    assert msg is not None and "studies.quick.grid[0].defense is an empty list" in msg, msg


# ------------------------------------------------------------------------------------ valid configs
GOOD_STRINGS = ["abc", "cpu", "cuda:1", "0" * 32, "0" * 64, "x/y.z"]


def in_range(sub: dict) -> st.SearchStrategy | None:
    """Values valid for ``sub`` (None where the fuzz does not generate, e.g. nested objects)."""
    s = resolve(sub)
    t = s.get("type")
    if "enum" in s:
        return st.sampled_from(s["enum"])
    if t == "boolean":
        return st.booleans()
    if t == "integer":
        return st.integers(int(s.get("minimum", -3)), int(s.get("minimum", -3)) + 50)
    if t == ["integer", "null"]:
        return st.one_of(st.none(), st.integers(int(s.get("minimum", 0)), 50))
    if t == ["string", "null"]:
        return st.one_of(st.none(), st.text(alphabet="abc_/.-", max_size=8))
    if t == "number":
        lo = float(s.get("exclusiveMinimum", 0.0))
        hi = float(s.get("exclusiveMaximum", 1.0))
        return st.floats(lo, hi, exclude_min=True, exclude_max=True)
    if t == "string" and "pattern" in s:
        return st.sampled_from([g for g in GOOD_STRINGS if re.search(s["pattern"], g)])
    if t == "string":
        return st.text(alphabet="abc_/.-", min_size=max(int(s.get("minLength", 0)), 1), max_size=8)
    if t == "array" and isinstance(s.get("items"), dict) and in_range(s["items"]) is not None:
        return st.lists(in_range(s["items"]), min_size=max(1, int(s.get("minItems", 1))),
                        max_size=max(int(s.get("maxItems", 3)), 1), unique=bool(s.get("uniqueItems")))
    return None


# keys whose valid values depend on more than their own schema (a study name, a registry name, RunConfig's
# cross-field rules): exercised by the cell fuzz below, not here
# keys whose validity depends on other keys (checked by RunConfig / the registries, not the schema);
# snapshot_round must lie within 1..rounds (or be -1 / null); a block's outputs must suit its cells (`cost`
# measures FLARE, so a block with other defenses cannot feed it)
SEMANTIC = {"study", "dataset", "model", "attack", "defense", "n_clients", "n_attackers", "include", "snapshot_round",
            "outputs"}
UNIQUE_LISTS = {p for p, s, v in NODES if isinstance(v, list) and resolve(s).get("uniqueItems")}
VALID_SLOTS = [(p, s) for p, s in SLOTS if last_key(p) not in SEMANTIC and in_range(s) is not None
               and not (isinstance(p[-1], int) and p[:-1] in UNIQUE_LISTS)]


@FUZZ
@given(data=st.data())
def test_in_range_values_are_accepted(data):
    cfg = copy.deepcopy(CONFIG)
    changed = []
    for path, sub in data.draw(st.lists(st.sampled_from(VALID_SLOTS), min_size=1, max_size=5, unique_by=repr)):
        value = data.draw(in_range(sub))
        assert leaf_validator(sub).is_valid(value)
        get(cfg, path[:-1])[path[-1]] = value
        changed.append((path, value))
    assert rejection(cfg) is None, changed


# RunConfig's documented domains (robustfl/config.py), independent of the schema: a schema stricter than the
# library would reject these
RUNCONFIG_DOMAINS = {
    "rounds": st.integers(1, 200), "local_epochs": st.integers(1, 20), "lr": st.floats(1e-7, 1.0),
    "batch_size": st.one_of(st.none(), st.integers(1, 512)), "aux_size": st.integers(2, 500),
    "aux_class": st.integers(0, 9), "root_size": st.integers(1, 1000), "eval_every": st.integers(1, 10),
    "partition": st.sampled_from(["iid", "classes", "dirichlet"]), "aux_source": st.sampled_from(["train", "test"]),
    "backdoor": st.sampled_from(["semantic", "trojan"]), "backdoor_mode": st.sampled_from(["single", "multiple"]),
    "engine": st.fixed_dictionaries({}, optional={
        "kind": st.sampled_from(["auto", "vectorised", "sequential"]),
        "conv": st.sampled_from(["auto", "vmap", "grouped", "channels_last", "triton"]),
        # true is valid only with a stacked layout (a cross-key rule EngineOptions checks, not the schema)
        "cuda_graph": st.sampled_from([None, False])}),
    "precision": st.sampled_from(["fp32", "tf32", "bf16"]), "deterministic": st.booleans(),
    "snapshot_round": st.one_of(st.none(), st.just(-1), st.integers(1, 3)),
    "attack_params": st.dictionaries(st.sampled_from(["epsilon", "boost"]), st.floats(0, 10), max_size=2),
    "model_params": st.fixed_dictionaries({}, optional={"dropout": st.booleans()}),
    "partition_params": st.fixed_dictionaries({}, optional={"alpha": st.floats(0.01, 10), "c_sel": st.integers(1, 10)}),
}


def test_runconfig_domains_cover_the_cell_fields():
    assert set(RUNCONFIG_DOMAINS) | SEMANTIC | {"defense_params"} >= set(
        SCHEMA["$defs"]["cell_overrides"]["properties"])


@FUZZ
@given(st.fixed_dictionaries({}, optional=RUNCONFIG_DOMAINS), st.booleans())
def test_runconfig_domain_values_are_accepted(values, as_grid):
    # a snapshot round must lie within the run (RunConfig rejects a later one, naming snapshot_round)
    snap = values.get("snapshot_round")
    assume(snap in (None, -1) or snap <= values.get("rounds", CONFIG["studies"]["quick"]["base"].get("rounds", 20)))
    cfg = copy.deepcopy(CONFIG)
    if as_grid:
        cfg["studies"]["quick"]["grid"][0].update({k: [v] for k, v in values.items()})
    else:
        cfg["studies"]["quick"]["base"].update(values)
    assert rejection(cfg) is None, values


# -------------------------------------------------------------------- cells: names and RunConfig rules
DEFAULT_BACKDOOR = RunConfig.__dataclass_fields__["backdoor"].default
NAME = {"dataset": DATASETS.names(), "attack": ["none", *ATTACKS.names()], "defense": DEFENSES.names(),
        "model": [None, *MODELS.names()]}


@st.composite
def cell_overrides(draw):
    base = {}
    junk = set()
    for key, names in NAME.items():
        if draw(st.booleans()):
            continue
        if draw(st.integers(0, 4)) == 0:
            base[key] = draw(st.from_regex(r"[a-z]{3,8}", fullmatch=True).filter(lambda x: x not in names))
            junk.add(key)
        else:
            base[key] = draw(st.sampled_from(names))
    base["n_clients"] = draw(st.integers(1, 12))
    base["n_attackers"] = draw(st.integers(0, 6))
    return base, junk


@FUZZ
@given(cell_overrides(), st.booleans())
@example(({"attack": "dba", "defense": "bulyan", "n_clients": 7, "n_attackers": 1}, set()), False)
def test_cells_are_checked_by_name_and_runconfig(ov, in_grid):
    base, junk = ov
    study = {"seeds": [0], "grid": [{"outputs": ["table2"], **{k: [v] for k, v in base.items()}}]} if in_grid \
        else {"base": base, "grid": [{"outputs": ["table2"], "rounds": [2]}]}
    cfg = copy.deepcopy(CONFIG)
    cfg["studies"] = {"fz": study}
    cfg["study"] = "fz"
    msg = rejection(cfg)
    n, f = base["n_clients"], base["n_attackers"]
    if junk:
        assert msg is not None and any(f"unknown {k} {base[k]!r}" in msg for k in junk), (base, msg)
    elif f > 0 and 2 * f >= n:
        assert msg is not None and "'n_attackers'" in msg and "f < n/2" in msg, (base, msg)
    elif base.get("attack", "none") != "none" and f == 0:
        assert msg is not None and "'n_attackers'" in msg, (base, msg)
    elif base.get("defense") == "bulyan" and n < 4 * max(f, 1) + 3:
        assert msg is not None and "Bulyan needs n >= 4f + 3" in msg, (base, msg)
    elif base.get("attack", "none") != "none" and required_backdoor(base["attack"]) not in (None, DEFAULT_BACKDOOR):
        # DBA splits the trojan trigger: a cell on the default (semantic) backdoor is refused by name
        assert msg is not None and f"needs backdoor: {required_backdoor(base['attack'])}" in msg, (base, msg)
    else:
        assert msg is None, (base, msg)


# --------------------------------------------------------------------------- snakemake's own validate
@pytest.mark.parametrize("path, value", [(("checkpoint_every",), -1), (("studies", "quick", "base", "rounds"), "3"),
                                         (("resources", "run", "gpus"), 1)])
def test_snakemake_validate_agrees(path, value):
    """common.smk then calls snakemake.utils.validate (same schema, fills defaults): it rejects the same."""
    from snakemake.utils import validate

    validate(copy.deepcopy(CONFIG), str(REPO / "schemas" / "config.schema.yaml"))
    bad = put(CONFIG, path, value)
    assert rejection(bad) is not None
    with pytest.raises(Exception, match=re.escape(str(path[-1])) + "|" + re.escape(repr(value))):
        validate(bad, str(REPO / "schemas" / "config.schema.yaml"))
