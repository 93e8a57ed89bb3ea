"""schemas/config.schema.yaml: accepts config.yaml (every study, every extra config) and rejects unknown
keys and bad values, naming the key."""
from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from robustfl.pipeline.study import CELL_FIELDS

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


def errors(cfg: dict) -> list[jsonschema.ValidationError]:
    cls = jsonschema.validators.validator_for(SCHEMA)
    return list(cls(SCHEMA).iter_errors(cfg))


def best(cfg: dict) -> jsonschema.ValidationError:
    err = jsonschema.exceptions.best_match(errors(cfg))
    assert err is not None, "the schema accepted a bad config"
    return err


def names_key(err: jsonschema.ValidationError, key: str) -> bool:
    """The error names `key`: in its path (bad value) or its message (unknown / missing key)."""
    return key in [str(p) for p in err.absolute_path] or repr(key) in err.message


def test_schema_is_valid_json_schema():
    jsonschema.validators.validator_for(SCHEMA).check_schema(SCHEMA)


def test_config_yaml_is_valid():
    assert errors(CONFIG) == []


@pytest.mark.parametrize("study", sorted(CONFIG["studies"]))
def test_every_study_is_valid_as_the_selected_one(study):
    cfg = copy.deepcopy(CONFIG)
    cfg["study"] = study
    cfg["studies"] = {study: CONFIG["studies"][study]}
    assert errors(cfg) == []


@pytest.mark.parametrize("extra", sorted((REPO / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_extra_configs_are_valid_when_merged(extra):
    from snakemake.utils import update_config

    cfg = copy.deepcopy(CONFIG)
    update_config(cfg, yaml.safe_load(extra.read_text()))
    assert errors(cfg) == []


def test_schema_fields_match_runconfig():
    """The schema lists exactly RunConfig's cell fields, for `base` and for grid blocks."""
    fields = set(CELL_FIELDS)
    assert set(SCHEMA["$defs"]["cell_overrides"]["properties"]) == fields
    assert set(SCHEMA["$defs"]["grid_block"]["properties"]) == fields | {"outputs"}


def test_every_object_is_closed():
    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object" and "additionalProperties" not in node:
                pytest.fail(f"{where}: object schema without additionalProperties")
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    # free-form parameter dicts handed to the library are the only open objects
    schema = copy.deepcopy(SCHEMA)
    for name in ("f_attack_params", "f_defense_params", "f_partition_params"):
        schema["$defs"].pop(name)
    walk(schema, "schema")


def _mutate(path: list, value=None, delete: bool = False) -> dict:
    cfg = copy.deepcopy(CONFIG)
    node = cfg
    for p in path[:-1]:
        node = node[p]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return cfg


@pytest.mark.parametrize("path, key", [
    (["studdy"], "studdy"),
    (["data", "datasets", "cifar10", "mirorr"], "mirorr"),
    (["studies", "quick", "base", "roundz"], "roundz"),
    (["studies", "quick", "grid", 0, "defence"], "defence"),
    (["studies", "quick", "seed"], "seed"),
    (["resources", "run", "gpus"], "gpus"),
    (["data", "cache"], "cache"),
])
def test_unknown_key_is_rejected_by_name(path, key):
    err = best(_mutate(path, 1))
    assert err.validator == "additionalProperties"
    assert names_key(err, key), err.message


@pytest.mark.parametrize("path, value, key", [
    (["studies", "quick", "base", "rounds"], "three", "rounds"),
    (["studies", "quick", "base", "rounds"], 0, "rounds"),
    (["studies", "quick", "base", "lr"], 0, "lr"),
    (["studies", "quick", "base", "partition"], "nonid", "partition"),
    (["studies", "quick", "base", "backdoor"], "semantics", "backdoor"),
    (["studies", "quick", "base", "aux_size"], 1, "aux_size"),
    (["studies", "quick", "grid", 0, "defense"], "flare", "defense"),  # a value, not a list
    (["studies", "quick", "grid", 0, "outputs"], ["table9"], "outputs"),
    (["studies", "quick", "seeds"], [0, 0], "seeds"),
    (["device"], "gpu", "device"),
    (["checkpoint_every"], -1, "checkpoint_every"),
    (["data", "datasets", "cifar10", "download"], "yes", "download"),
    (["study"], 3, "study"),
])
def test_bad_value_is_rejected_naming_the_key(path, value, key):
    err = best(_mutate(path, value))
    assert names_key(err, key), (list(err.absolute_path), err.message)


def test_missing_required_key_is_named():
    err = best(_mutate(["data", "datasets", "cifar10", "download"], delete=True))
    assert err.validator == "required" and "download" in err.message
