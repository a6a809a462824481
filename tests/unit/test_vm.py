"""`netlab vm`: kernel choice, the guest script and environment, the errors, and that the VM
it starts never outlives it (a fake vng that starts a fake qemu stands in for the real ones;
tests/vm is what runs in the real VM)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from netlab import vm
from netlab.errors import FeatureError


def _kernel(boot: Path, modules: Path, release: str, ipvs: bool) -> Path:
    image = boot / f"vmlinuz-{release}"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"kernel")
    d = modules / release
    d.mkdir(parents=True)
    dep = "kernel/net/netfilter/ipvs/ip_vs.ko: kernel/net/netfilter/nf_conntrack.ko\n" if ipvs else ""
    (d / "modules.dep").write_text(dep + "kernel/drivers/net/dummy.ko:\n")
    return image


def test_the_newest_kernel_with_ipvs_is_chosen(tmp_path: Path) -> None:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    _kernel(boot, mods, "6.1.0-9-amd64", ipvs=True)
    newest_with_ipvs = _kernel(boot, mods, "6.1.0-56-amd64", ipvs=True)  # 56 > 9: numbers compare as numbers
    _kernel(boot, mods, "6.18.0-custom", ipvs=False)  # newer, but no ip_vs (like the dev machines' kernel)
    assert vm.find_kernel(boot, mods) == newest_with_ipvs


def test_built_in_ipvs_counts(tmp_path: Path) -> None:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    image = _kernel(boot, mods, "6.8.0-1", ipvs=False)
    (mods / "6.8.0-1" / "modules.builtin").write_text("kernel/net/netfilter/ipvs/ip_vs.ko\n")
    assert vm.find_kernel(boot, mods) == image


def test_no_kernel_with_ipvs_is_one_sentence_with_the_fix(tmp_path: Path) -> None:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    _kernel(boot, mods, "6.18.0-custom", ipvs=False)
    with pytest.raises(FeatureError) as info:
        vm.find_kernel(boot, mods)
    assert str(info.value) == (
        f"netlab vm found no kernel to boot: it needs a {boot}/vmlinuz-<release> whose {mods}/<release> has the "
        "ip_vs module (found: vmlinuz-6.18.0-custom); run `sudo scripts/setup --vm` (it installs Debian's "
        "linux-image-amd64) or pass --kernel"
    )
    assert info.value.exit_code == 3


def spec(tmp_path: Path, **kw: object) -> vm.VmSpec:
    args: dict[str, object] = {
        "kernel": tmp_path / "vmlinuz-6.1.0-56-amd64",
        "command": ("netlab", "up", "topologies/my lab.yaml"),
        "cwd": Path("/src/netlab"),
        "venv_bin": Path("/src/netlab/.venv/bin"),
        "env": {"CI": "true", "NETLAB_DEBUG": "1", "TMPDIR": "/scratch", "XDG_RUNTIME_DIR": "/run/user/0"},
    }
    args.update(kw)
    return vm.VmSpec(**args)  # type: ignore[arg-type]


def test_guest_script(tmp_path: Path) -> None:
    mods = " ".join(vm.GUEST_MODULES)
    cached = (Path("/src/netlab"), Path("/opt/py 3.11"))
    assert vm.guest_script(spec(tmp_path, cached=cached)) == textwrap.dedent(
        f"""\
        # written by `netlab vm`, run by the guest's init as root
        export CI=true
        export NETLAB_DEBUG=1
        export PATH=/src/netlab/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        export PYTHONDONTWRITEBYTECODE=1
        export PYTHONUNBUFFERED=1
        export VIRTUAL_ENV=/src/netlab/.venv
        if ! mkdir -p /run/netlab /run/netns 2>/dev/null; then
          mount -t tmpfs -o mode=0755 netlab-run /run && mkdir -p /run/netlab /run/netns || exit 125
        fi
        if mkdir -p /run/netlab-vm/host && mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,ro,msize=512000,\
access=any netlab-host /run/netlab-vm/host 2>/dev/null; then
          for p in /src/netlab '/opt/py 3.11'; do
            [ -e "$p" ] && mount --bind "/run/netlab-vm/host$p" "$p"
          done
        fi
        if ! modprobe -a {mods} 2>/dev/null; then
          missing=; for m in {mods}; do modprobe -q $m 2>/dev/null || missing="$missing $m"; done
          echo "netlab vm: this kernel could not load:$missing" >&2
        fi
        cd /src/netlab || exit 125
        netlab_rc=$(mktemp) || exit 125
        {{ netlab up 'topologies/my lab.yaml'; echo $? > "$netlab_rc"; }} | dd bs=4096 status=none
        rc=$(cat "$netlab_rc" 2>/dev/null); rm -f "$netlab_rc"; exit "${{rc:-125}}"
        """
    )
    assert "9p" not in vm.guest_script(spec(tmp_path))  # nothing to serve from the cache: no second mount


def test_the_cached_trees_are_the_venv_python_and_the_system_programs_not_the_checkout() -> None:
    paths = vm.cached_paths(Path(sys.prefix) / "bin")
    checkout = Path(vm.__file__).resolve().parent.parent
    assert checkout not in paths  # edited while a VM runs: must stay live
    assert any(Path(sys.prefix).resolve().is_relative_to(p) for p in paths)  # the venv
    assert any(Path(sys.executable).resolve().is_relative_to(p) for p in paths)
    assert any(Path(textwrap.__file__).resolve().is_relative_to(p) for p in paths)  # the standard library
    assert Path("/usr/sbin") in paths
    assert not any(a != b and a.is_relative_to(b) for a in paths for b in paths)  # no tree twice


def test_every_module_a_lab_needs_is_loaded() -> None:
    need = {"ip_vs", "br_netfilter", "vxlan", "dummy", "nf_conntrack", "veth", "bridge"}
    need |= {f"ip_vs_{s}" for s in ("rr", "wrr", "lc", "wlc", "sh", "dh", "sed", "nq")}  # kube-proxy's --ipvs-scheduler
    assert need <= set(vm.GUEST_MODULES)


def test_guest_env_keeps_the_project_environment_and_drops_host_only_things() -> None:
    host = {"CI": "true", "PATH": "/usr/bin", "HOME": "/home/u", "TMPDIR": "/x", "BASH_FUNC_f%%": "() { :; }"}
    env = vm.guest_env(host, Path("/r/.venv/bin"))
    assert env["PATH"].split(":")[0] == "/r/.venv/bin"
    assert env["CI"] == "true" and env["VIRTUAL_ENV"] == "/r/.venv"
    assert not {"HOME", "TMPDIR", "BASH_FUNC_f%%"} & set(env)


def test_vng_command_line(tmp_path: Path) -> None:
    s = spec(tmp_path)
    argv = vm.vng_argv(Path("/v/bin/vng"), s, Path("/tmp/netlab-vm-x/guest.sh"))
    assert argv == [
        "/v/bin/vng",
        "--run",
        str(s.kernel),
        "--user",
        "root",
        "--memory",
        "2G",
        "--cpus",
        "2",
        "--force-9p",
        "--disable-kvm",
        "--",
        "sh /tmp/netlab-vm-x/guest.sh",
    ]
    cached = vm.vng_argv(Path("vng"), spec(tmp_path, cached=(Path("/src"),)), Path("g"))
    assert cached[-3] == (
        "--qemu-opts=-fsdev local,id=netlabhost,path=/,security_model=none,readonly=on,multidevs=remap "
        "-device virtio-9p-pci,fsdev=netlabhost,mount_tag=netlab-host"
    )
    assert "--disable-kvm" not in vm.vng_argv(Path("vng"), spec(tmp_path, kvm=True), Path("g"))


def _bin(d: Path, name: str, body: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def test_missing_virtme_ng_names_scripts_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FeatureError) as info:
        vm.check_tools(spec(tmp_path, venv_bin=tmp_path / "venv" / "bin"))
    assert str(info.value) == (
        f"netlab vm needs virtme-ng (`vng`), which is not installed in {tmp_path / 'venv'}; "
        "run `sudo scripts/setup --vm`"
    )


def test_missing_qemu_names_the_package_and_scripts_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv_bin = tmp_path / "venv" / "bin"
    _bin(venv_bin, "vng", "")
    _bin(venv_bin, "virtme-run", "")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    missing = r"qemu-system-x86_64 \(Debian package qemu-system-x86\).*sudo scripts/setup --vm"
    with pytest.raises(FeatureError, match=missing):
        vm.check_tools(spec(tmp_path, venv_bin=venv_bin))


def test_a_dynamic_busybox_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv_bin = tmp_path / "venv" / "bin"
    for name in ("vng", "virtme-run", "qemu-system-x86_64", "file"):
        _bin(venv_bin, name, "")
    (venv_bin / "busybox").symlink_to(Path(sys.executable).resolve())  # a dynamically linked ELF
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FeatureError, match=r"statically linked busybox \(Debian package busybox-static\)"):
        vm.check_tools(spec(tmp_path, venv_bin=venv_bin))
    assert not vm._is_static_elf(str(Path(sys.executable).resolve()))


# A fake vng: starts a fake qemu (comm "qemu-system-x86") that runs until killed, records
# both PIDs and its TMPDIR, and either waits or exits with the guest command's code.
FAKE_VNG = """\
{bin}/qemu-system-x86_64 600 &
echo "$! $$ $TMPDIR" > {state}
test -f "$(echo "$@" | sed 's/.* sh //')" || exit 99   # the guest script exists while the VM runs
[ "{mode}" = wait ] && wait
kill $!
exit 7
"""

RUN = """\
import sys
from pathlib import Path
from netlab import vm
vm.check_tools = lambda spec: Path({vng!r})
spec = vm.VmSpec(kernel=Path("/boot/vmlinuz-x"), command=("true",), cwd=Path.cwd(), venv_bin=Path({bin!r}))
try:
    sys.exit(vm.run(spec))
except KeyboardInterrupt:
    sys.exit(130)
"""


def _fake_run(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], Path]:
    state = tmp_path / "state"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "qemu-system-x86_64").symlink_to(shutil.which("sleep") or "/bin/sleep")
    vng = _bin(tmp_path / "bin", "vng", FAKE_VNG.format(state=state, mode=mode, bin=tmp_path / "bin"))
    code = RUN.format(vng=str(vng), bin=str(vng.parent))
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    return p, state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] != "Z"


def _wait_for(path: Path) -> list[str]:
    for _ in range(200):
        if path.exists() and path.read_text().strip():
            return path.read_text().split()
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


def test_the_command_exit_code_comes_back_and_no_file_is_left(tmp_path: Path) -> None:
    p, state = _fake_run(tmp_path, "exit")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 7, err
    qemu, _, tmpdir = state.read_text().split()
    assert not _alive(int(qemu))
    assert not Path(tmpdir).exists()
    assert "netlab vm: exit 7 after" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_qemu_it_started(tmp_path: Path, sig: signal.Signals) -> None:
    p, state = _fake_run(tmp_path, "wait")
    try:
        qemu, vng, tmpdir = _wait_for(state)
        comm = Path(f"/proc/{qemu}/comm")
        for _ in range(100):  # $! is known before the fork has exec'd qemu
            if comm.read_text().strip() == "qemu-system-x86":
                break
            time.sleep(0.05)
        assert comm.read_text().strip() == "qemu-system-x86"
        p.send_signal(sig)
        p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait()
    assert p.returncode == 130
    assert not _alive(int(qemu)) and not _alive(int(vng))
    assert not Path(tmpdir).exists()
