"""The lab's life: idempotent and incremental `up`, exact `down` (also after kill -9 and with
the file gone), rollback of a failed or interrupted `up`, labs side by side, `exec`, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

import pytest
from conftest import NETLAB, REPO, Lab, netlab_netns, responder_pids, two_nodes

from netlab.kernel import netns as kns

pytestmark = pytest.mark.root


def _inodes(lab: Lab) -> dict[str, tuple[int, int] | None]:
    return {ns: kns.inode(ns) for ns in lab.netns()}


def test_second_up_changes_nothing(make_lab: Any) -> None:
    lab = make_lab(two_nodes())
    lab.up()
    st = lab.status()
    assert sorted(p["name"] for p in st["pods"]) == ["a1", "a2", "b1"]  # the external client is not a pod
    assert st["external"]["ip"] == "172.18.0.254/24"
    before = _inodes(lab)
    r = lab.up()
    assert "no change" in r.stdout
    r = lab.netlab("up", str(lab.file), "-o", "json")
    assert json.loads(r.stdout)["changed"] is False
    assert _inodes(lab) == before


def test_incremental_add_and_remove(make_lab: Any) -> None:
    spec = two_nodes()
    lab = make_lab(spec)
    lab.up()
    before = _inodes(lab)
    b1_ip = lab.pod_ip("b1")

    # add a node and a pod on it: only those are created, and every node learns the new one
    spec["nodes"].append({"name": "node3"})
    spec["pods"].append({"name": "c1", "node": "node3", "serve": [8080]})
    lab.write(spec)
    plan = json.loads(lab.netlab("plan", str(lab.file), "-o", "json").stdout)
    kinds = sorted(s["kind"] for s in plan["steps"])
    assert kinds == ["AddPeer"] * 4 + ["CreateNode", "CreatePod", "StartResponder", "SyncRules"]
    lab.up()
    after = _inodes(lab)
    assert {k: v for k, v in after.items() if k in before} == before, "existing namespaces were rebuilt"
    assert set(after) - set(before) == {f"nl-{lab.name}-node3", f"nl-{lab.name}-default-c1"}
    assert lab.pod_ip("b1") == b1_ip, "an existing pod was renumbered"
    c1 = lab.pod_ip("c1")
    assert lab.exec("a1", "nc", "-w", "2", c1, "8080", input="").stdout.strip() == "c1"
    assert lab.exec("c1", "nc", "-w", "2", b1_ip, "8080", input="").stdout.strip() == "b1"

    # remove the first pod and node1 entirely: node2/node3 keep their subnets and lose the peer
    spec["nodes"] = [n for n in spec["nodes"] if n["name"] != "node1"]
    spec["pods"] = [p for p in spec["pods"] if p["node"] != "node1"]
    lab.write(spec)
    lab.up()
    left = _inodes(lab)
    assert set(left) == {ns for ns in after if "node1" not in ns and "-a1" not in ns and "-a2" not in ns}
    assert all(left[ns] == after[ns] for ns in left), "a surviving namespace was rebuilt"
    routes = lab.exec("node2", "ip", "route").stdout
    assert "10.244.0.0/24" not in routes and "10.244.2.0/24" in routes
    assert lab.exec("c1", "nc", "-w", "2", b1_ip, "8080", input="").stdout.strip() == "b1"
    assert "no change" in lab.up().stdout


def test_responder_restarted_when_it_dies(make_lab: Any) -> None:
    lab = make_lab(two_nodes())
    lab.up()
    b1 = next(p for p in lab.status()["pods"] if p["name"] == "b1")
    (pid,) = b1["processes"]
    os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z":
            break
        time.sleep(0.05)
    plan = json.loads(lab.netlab("plan", str(lab.file), "-o", "json").stdout)
    assert [s["kind"] for s in plan["steps"]] == ["StartResponder"]
    lab.up()
    assert lab.exec("a1", "nc", "-w", "2", lab.pod_ip("b1"), "8080", input="").stdout.strip() == "b1"


@pytest.mark.parametrize("after_step", [1, 2, 4, 6, 8])
def test_down_after_kill_9_mid_up(make_lab: Any, after_step: int) -> None:
    """SIGKILL gives `up` no chance to clean up; `down` must still find everything by its marks."""
    lab = make_lab(two_nodes())
    r = lab.up(check=False, env={"NETLAB_FAULT_KILL_AFTER": str(after_step)})
    assert r.returncode == -signal.SIGKILL
    assert lab.netns(), "the kill came before anything was built"
    lab.down()
    assert not lab.netns()
    assert not [p for p in responder_pids() if _netns_of(p).startswith(f"nl-{lab.name}-")]
    assert not os.path.exists(f"/run/netlab/{lab.name}")
    # and `up` after a crash converges to a working lab
    lab.up(check=False, env={"NETLAB_FAULT_KILL_AFTER": str(after_step)})
    lab.up()
    assert lab.exec("a1", "nc", "-w", "2", lab.pod_ip("b1"), "8080", input="").stdout.strip() == "b1"


def _netns_of(pid: int) -> str:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return ""
    for ns in kns.list_names():
        if kns.inode(ns) == (st.st_dev, st.st_ino):
            return ns
    return ""


def test_failed_up_rolls_back(make_lab: Any) -> None:
    lab = make_lab(two_nodes())
    r = lab.up(check=False, env={"NETLAB_FAULT_FAIL_AFTER": "5"})
    assert r.returncode == 1 and "injected fault" in r.stderr
    assert not lab.netns(), "a failed first `up` must leave nothing"

    # on a running lab, a failed change removes only what that run created
    lab.up()
    before = _inodes(lab)
    spec = lab.spec
    spec["pods"].append({"name": "late", "node": "node2", "serve": [9090]})
    lab.write(spec)
    r = lab.up(check=False, env={"NETLAB_FAULT_FAIL_AFTER": "1"})
    assert r.returncode == 1
    assert _inodes(lab) == before
    assert lab.exec("a1", "nc", "-w", "2", lab.pod_ip("b1"), "8080", input="").stdout.strip() == "b1"


@pytest.mark.parametrize("after_netns", [1, 3, 30, 100])
def test_ctrl_c_mid_up_leaves_nothing(make_lab: Any, after_netns: int) -> None:
    """Ctrl-C while the underlay, the nodes, or the pods are being built."""
    spec = {
        "nodes": [{"name": f"n{i}"} for i in range(4)],
        "pods": [{"name": f"p{i}", "node": f"n{i % 4}"} for i in range(120)],
    }
    lab = make_lab(spec)
    proc = subprocess.Popen(
        [*NETLAB, "up", str(lab.file)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(kns.list_names(f"nl-{lab.name}-")) < after_netns:
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not kns.list_names(f"nl-{lab.name}-"), "Ctrl-C left namespaces behind"


def test_down_without_the_topology_file(make_lab: Any) -> None:
    lab = make_lab(two_nodes())
    lab.up()
    lab.file.unlink()
    r = lab.netlab("down", lab.name, "-o", "json")
    assert len(json.loads(r.stdout)["netns"]) == 7  # underlay, external, 2 nodes, 3 pods
    assert not lab.netns()
    assert "nothing to remove" in lab.netlab("down", lab.name).stdout


def test_two_labs_side_by_side(make_lab: Any) -> None:
    one, two = make_lab(two_nodes()), make_lab(two_nodes("host-gw"))
    one.up()
    two.up()
    # identical addresses in both labs: each is sealed in its own namespaces
    assert one.pod_ip("b1") == two.pod_ip("b1")
    for lab in (one, two):
        assert lab.exec("a1", "nc", "-w", "2", lab.pod_ip("b1"), "8080", input="").stdout.strip() == "b1"
    r = one.netlab("status", "-o", "json")
    assert {one.name, two.name} <= {d["name"] for d in json.loads(r.stdout)["labs"]}
    # commands that act on one lab refuse to guess when several are up
    r = one.netlab("exec", "a1", "--", "true", check=False)
    if len({lab for lab in netlab_netns().values()}) > 1:
        assert r.returncode != 0 and "--lab" in r.stderr
    one.down()
    assert not one.netns() and two.netns()
    assert two.exec("a1", "nc", "-w", "2", two.pod_ip("b1"), "8080", input="").stdout.strip() == "b1"


def test_netns_name_owned_by_another_lab(make_lab: Any) -> None:
    base = "t" + os.urandom(3).hex()
    first = make_lab({"name": base, "nodes": [{"name": "x-y"}]})
    first.up()
    # lab "<base>-x" with node "y" would need nl-<base>-x-y, which lab <base> owns
    second = make_lab({"name": f"{base}-x", "nodes": [{"name": "y"}]})
    r = second.up(check=False)
    assert r.returncode == 1
    assert f"nl-{base}-x-y already belongs to lab '{base}'" in r.stderr
    assert not second.netns()
    assert first.netns()


def test_exec_passes_stdin_stdout_and_exit_code(make_lab: Any) -> None:
    lab = make_lab(two_nodes())
    lab.up()
    r = lab.exec("a1", "sh", "-c", "cat; ip -o -4 addr show eth0 | wc -l; exit 7", check=False, input="hello\n")
    assert r.returncode == 7
    assert r.stdout.splitlines() == ["hello", "1"]
    assert "cni0" in lab.exec("node1", "ip", "-o", "link", "show").stdout
    assert "br0" in lab.exec("underlay", "ip", "-o", "link", "show").stdout
    r = lab.exec("nosuchpod", "true", check=False)
    assert r.returncode != 0 and "has no pod or node 'nosuchpod'" in r.stderr


def test_bad_topology_builds_nothing(make_lab: Any) -> None:
    spec = two_nodes()
    spec["pods"].append({"name": "lost", "node": "node9"})
    lab = make_lab(spec)
    r = lab.up(check=False)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, "one sentence"
    assert f"{lab.file}: pods[3].node: 'node9' is not a node of this lab" in r.stderr
    assert not lab.netns()


def test_not_root_is_refused(make_lab: Any) -> None:
    lab = make_lab(two_nodes())
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *NETLAB, "up", str(lab.file)],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert r.returncode == 4, r.stderr
    assert "needs root" in r.stderr and "sudo" in r.stderr
    assert not lab.netns()
    # planning needs no root
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *NETLAB, "plan", "-"],
        capture_output=True,
        text=True,
        cwd="/",
        input=lab.file.read_text(),
    )
    assert r.returncode == 0 and "create node node1" in r.stdout


def test_changed_pod_and_overlay_are_replaced_in_place(make_lab: Any) -> None:
    """A replacement reuses kernel names (the host veth, the node's underlay port) at once:
    the kernel frees a deleted namespace's veths asynchronously, so netlab must not race it."""
    spec = two_nodes()
    lab = make_lab(spec)
    lab.up()
    b1 = lab.pod_ip("b1")
    spec["pods"][2]["serve"] = [8081]
    lab.write(spec)
    plan = json.loads(lab.netlab("plan", str(lab.file), "-o", "json").stdout)
    assert sorted(s["kind"] for s in plan["steps"]) == ["CreatePod", "DeleteNetns", "StartResponder"]
    lab.up()
    assert lab.pod_ip("b1") == b1
    assert lab.exec("a1", "nc", "-w", "2", b1, "8081", input="").stdout.strip() == "b1"

    spec["cluster"]["overlay"] = "host-gw"
    lab.write(spec)
    lab.up()
    assert "flannel.1" not in lab.exec("node1", "ip", "-o", "link").stdout
    assert f"via {next(n['ip'] for n in lab.status()['nodes'] if n['name'] == 'node2').split('/')[0]} dev eth0" in (
        lab.exec("node1", "ip", "route").stdout
    )
    assert lab.exec("a1", "nc", "-w", "2", lab.pod_ip("b1"), "8081", input="").stdout.strip() == "b1"
    assert "no change" in lab.up().stdout


def test_ipvs_mode_is_refused_before_anything_is_built(make_lab: Any) -> None:
    spec = two_nodes()
    spec["cluster"]["proxyMode"] = "ipvs"
    lab = make_lab(spec)
    r = lab.up(check=False)
    assert r.returncode == 3 and "cluster.proxyMode: ipvs" in r.stderr and "use iptables or nftables" in r.stderr
    assert not lab.netns()
