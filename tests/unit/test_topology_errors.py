"""Golden tests for topology error messages (in the style of ipspace/netlab's tests/errors).

`tests/errors/` holds one bad topology per file, `<case>.yaml`, and next to it `<case>.err`:
the exact `str()` of the `TopologyError` that `netlab.topology.load()` raises for it. The file
part of the message is the path relative to the repository root (the test loads from there).
A `<case>.err` whose name starts with `no-such-file` has no `.yaml` on purpose: it is the
message for a topology file that does not exist.

To accept new or changed messages, rewrite the `.err` files and review the diff:

    NETLAB_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_topology_errors.py

Every message must be one sentence naming the file, the key path, the bad value and the fix;
`test_message_style` checks the mechanical part of that (one line, file first, a fix clause,
no pydantic jargon). Messages known to fall short are marked xfail(strict=True) there, so
that improving one makes the test fail until it is taken off the list.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from netlab.errors import TopologyError
from netlab.plan import resolve
from netlab.topology import load, load_text

REPO = Path(__file__).resolve().parents[2]
ERRORS = Path("tests/errors")  # relative to REPO: it is the file part of every message
UPDATE = os.environ.get("NETLAB_UPDATE_GOLDEN") == "1"
MISSING_PREFIX = "no-such-file"


def _cases() -> list[str]:
    folder = REPO / ERRORS
    stems = {p.stem for p in folder.glob("*.yaml")} | {p.stem for p in folder.glob("*.err")}
    return sorted(stems)


CASES = _cases()


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def _error_for(case: str) -> str:
    path = ERRORS / f"{case}.yaml"
    if not path.exists() and not case.startswith(MISSING_PREFIX):
        pytest.fail(f"{ERRORS / case}.err has no {path.name}; add the topology or remove the .err")
    with pytest.raises(TopologyError) as info:
        load(str(path))
    return str(info.value)


def test_golden_cases_exist() -> None:
    assert len(CASES) >= 40, f"tests/errors/ looks incomplete: {CASES}"
    assert any(c.startswith(MISSING_PREFIX) for c in CASES)


@pytest.mark.parametrize("case", CASES)
def test_error_message(case: str) -> None:
    got = _error_for(case)
    golden = REPO / ERRORS / f"{case}.err"
    if UPDATE:
        golden.write_text(got + "\n")
        return
    assert golden.exists(), (
        f"{golden.relative_to(REPO)} is missing; run with NETLAB_UPDATE_GOLDEN=1 to create it. Got: {got}"
    )
    assert got == golden.read_text().rstrip("\n")


# --- message style ------------------------------------------------------------------------

# Pydantic's own wording leaking through `_message()`'s generic fallback.
JARGON = re.compile(
    r"input should be|instance of|Value error|validation error|Field required|"
    r"input is not a valid",
    re.IGNORECASE,
)

# Messages that are accurate but fall short of "value + fix in the user's terms".
POOR: dict[str, str] = {}


def _style(case: str) -> object:
    if case in POOR:
        return pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=POOR[case]))
    return case


@pytest.mark.parametrize("case", [_style(c) for c in CASES])
def test_message_style(case: str) -> None:
    msg = _error_for(case)
    assert "\n" not in msg
    assert msg.startswith(f"{ERRORS / case}.yaml: ")
    assert ";" in msg, "no fix clause ('...; do this')"
    assert not JARGON.search(msg), "pydantic jargon"


# --- direct checks that go with the golden files ------------------------------------------


def test_error_carries_file_path_and_message() -> None:
    with pytest.raises(TopologyError) as info:
        load(str(ERRORS / "pod-unknown-node.yaml"))
    e = info.value
    assert e.file == "tests/errors/pod-unknown-node.yaml"
    assert e.path == "pods[0].node"
    assert e.exit_code == 2
    assert "'node3'" in e.message and "node1, node2" in e.message


def test_same_pod_name_in_different_namespaces_is_fine() -> None:
    topo = load_text(
        """
name: lab1
nodes:
  - name: node1
pods:
  - {name: web, node: node1}
  - {name: web, namespace: prod, node: node1}
  - {name: web, namespace: dev, node: node1}
""",
        "ok.yaml",
    )
    assert [(p.namespace, p.name) for p in topo.pods] == [("default", "web"), ("prod", "web"), ("dev", "web")]


def test_capacity_limits_are_exact() -> None:
    """The largest valid files next to the too-many-* cases load (the limits are not off by one)."""
    pods = "\n".join(f"  - {{name: p{i}, node: node1}}" for i in range(13))
    topo = load_text(f"name: lab1\ncluster: {{nodeCIDRMaskSize: 28}}\nnodes: [{{name: node1}}]\npods:\n{pods}\n")
    assert len(resolve(topo).pods) == 13
    topo = load_text(
        "name: lab1\ncluster: {podCIDR: 10.244.0.0/23, nodeCIDRMaskSize: 24}\nnodes: [{name: node1}, {name: node2}]\n"
    )
    assert len(resolve(topo).nodes) == 2


def test_node_cidr_capacity_matches_ipam_at_the_limit() -> None:
    """nodeCIDR /29: .1 is kept for a gateway and .6 for `external`, so .2-.5 hold 4 nodes."""
    four = "\n".join(f"  - name: n{i}" for i in range(4))
    topo = load_text(f"name: lab1\ncluster: {{nodeCIDR: 172.18.0.0/29}}\nnodes:\n{four}\n")
    assert [str(n.ip) for n in resolve(topo).nodes] == [f"172.18.0.{i}/29" for i in range(2, 6)]


def test_node_cidr_one_node_too_many_is_a_topology_error() -> None:
    five = "\n".join(f"  - name: n{i}" for i in range(5))
    with pytest.raises(TopologyError, match=r"cluster\.nodeCIDR"):
        load_text(f"name: lab1\ncluster: {{nodeCIDR: 172.18.0.0/29}}\nnodes:\n{five}\n")


@pytest.mark.parametrize("name", ["br0", "lo"])
def test_node_name_that_clashes_with_underlay_links_is_rejected(name: str) -> None:
    with pytest.raises(TopologyError, match=r"nodes\[0\]\.name"):
        load_text(f"name: lab1\nnodes: [{{name: {name}}}]\n")


def test_empty_optional_keys_mean_none() -> None:
    """`pods:` or `labels:` with nothing after them (YAML null) mean no pods, no labels."""
    topo = load_text("name: lab1\ncluster:\nnodes:\n  - name: node1\n    labels:\npods:\n", "ok.yaml")
    assert topo.pods == [] and topo.nodes[0].labels == {}


@pytest.mark.parametrize(
    ("nodes", "pods", "where"),
    [
        (["underlay"], [], "nodes[0].name"),
        (["a-b", "a"], [("b", "a")], "pods[0].name"),
    ],
)
def test_netns_name_clash_inside_a_lab(nodes: list[str], pods: list[tuple[str, str]], where: str) -> None:
    text = "name: lab1\nnodes:\n" + "".join(f"  - name: {n}\n" for n in nodes)
    if pods:
        text += "pods:\n" + "".join(f"  - {{name: {p}, namespace: {ns}, node: {nodes[0]}}}\n" for p, ns in pods)
    with pytest.raises(TopologyError) as info:
        load_text(text, "x.yaml")
    assert info.value.path == where
    assert "network namespace name nl-lab1-" in info.value.message and "rename one" in info.value.message
