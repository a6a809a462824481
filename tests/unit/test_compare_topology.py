"""netlab.compare.topology: what a compare adds to the user's topology (pure, no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from netlab.compare import topology as ct
from netlab.errors import TopologyError
from netlab.topology import load

REPO = Path(__file__).resolve().parents[2]
SERVICES = REPO / "topologies" / "services.yaml"


def test_prepare_picks_the_first_measurable_service() -> None:
    s = ct.prepare(SERVICES, "cmp-services")
    assert (s.namespace, s.service, s.port, s.target_port) == ("default", "web", 80, 8080)
    assert s.backends == ("web-0", "web-1", "web-2")
    assert (s.client_node, s.far_node) == ("node1", "node2")
    assert s.user_services == 5


def test_compose_scales_to_n_services_and_loads(tmp_path: Path) -> None:
    s = ct.prepare(SERVICES, "cmp-services", schedulers=("rr", "sh"))
    topo = ct.compose(s, 100, "nftables")
    names = [x["name"] for x in topo["services"]]
    assert len(names) == 100 == s.total(100)
    assert {ct.FIRST, ct.LAST, ct.NOEP, ct.LOCAL, ct.NODEPORT, "zz-cmp-sched-rr", "zz-cmp-sched-sh"} <= set(names)
    assert topo["name"] == "cmp-services" and topo["cluster"]["proxyMode"] == "nftables"
    loaded = load(ct.write(topo, tmp_path / "t.yaml"))  # the composed file is a valid topology
    order = sorted((x.namespace, x.name) for x in loaded.services)
    assert order[0][1] == ct.FIRST and order[-1][1] == ct.LAST  # kube-proxy writes services in name order
    pods = {p.name: p for p in loaded.pods}
    assert pods[ct.CLIENT].node == pods[ct.ECHO].node == "node1" and pods[ct.FAR].node == "node2"


def test_a_small_n_keeps_every_real_service() -> None:
    s = ct.prepare(SERVICES, "cmp-services")
    assert s.fillers(3) == 0 and s.total(3) == s.base_count == 10


def test_one_node_has_no_local_row(tmp_path: Path) -> None:
    f = tmp_path / "one.yaml"
    f.write_text(
        "name: one\nnodes: [{name: n1}]\n"
        "deployments: [{name: web, replicas: 2, serve: [8080]}]\n"
        "services: [{name: web, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}]\n"
    )
    s = ct.prepare(f, "cmp-one")
    assert s.far_node is None and ct.LOCAL not in s.added_services
    topo = ct.compose(s, 20, "iptables")
    assert ct.FAR not in {p["name"] for p in topo["pods"]}
    assert load(ct.write(topo, tmp_path / "t.yaml")).name == "cmp-one"


def test_no_measurable_service_is_refused_with_the_fix(tmp_path: Path) -> None:
    f = tmp_path / "bare.yaml"
    f.write_text("name: bare\nnodes: [{name: n1}]\npods: [{name: a, node: n1}]\n")
    with pytest.raises(TopologyError, match="no service to measure.*topologies/services.yaml"):
        ct.prepare(f, "cmp-bare")


def test_a_named_service_that_cannot_be_measured_is_refused() -> None:
    with pytest.raises(TopologyError, match="'nothing' cannot be measured"):
        ct.prepare(SERVICES, "cmp-services", service="nothing")
    assert ct.prepare(SERVICES, "cmp-services", service="default/web-np").service == "web-np"


def test_a_clashing_name_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "clash.yaml"
    f.write_text(
        "name: clash\nnodes: [{name: n1}]\npods: [{name: cmp-client, node: n1}]\n"
        "deployments: [{name: web, serve: [8080]}]\n"
        "services: [{name: web, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}]\n"
    )
    with pytest.raises(TopologyError, match="cmp-client is one compare adds"):
        ct.prepare(f, "cmp-clash")
