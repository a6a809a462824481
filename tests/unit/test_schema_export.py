"""The exported JSON schema (for editors) is current and accepts every shipped topology."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from netlab.topology import load
from netlab.topology.schema import Topology

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "schema" / "topology.schema.json"


def test_schema_file_is_current() -> None:
    assert json.loads(SCHEMA.read_text()) == Topology.model_json_schema(by_alias=True), (
        "schema/topology.schema.json is stale: run `netlab schema > schema/topology.schema.json`"
    )


@pytest.mark.parametrize("path", sorted((REPO / "topologies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_topologies_validate(path: Path) -> None:
    load(path)  # netlab's own validation
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(SCHEMA.read_text()))


def test_schema_rejects_what_netlab_rejects() -> None:
    schema = json.loads(SCHEMA.read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "x", "nodes": [{"name": "n1", "color": "red"}]}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "x", "nodes": [{"name": "n1"}], "cluster": {"overlay": "geneve"}}, schema)
