"""`netlab vm -- COMMAND`: run COMMAND as root on a real distro kernel, in a throwaway VM.

The development machines run a kernel without IPVS, dummy, ipip or netem and cannot load
modules. A stock distro kernel has them all, so netlab boots one (Debian's linux-image-amd64,
found under /boot with its modules in /lib/modules/<release>) with virtme-ng under qemu:

  host: netlab vm ──> vng (virtme-ng) ──> virtme-run ──> qemu-system-x86_64 -kernel /boot/vmlinuz-<release>
  guest: the host's / over 9p, read-only, with writable RAM overlays on /etc /usr /var /tmp ...;
         /run is a tmpfs; the command runs as root in the same directory, with this
         checkout's .venv/bin first on PATH, and its output streams back live.

virtme-ng mounts the host's / without a cache: every stat, open and page fault of every
Python process is a 9p round trip through qemu, and under emulation a bare `netlab
--version` took 14 s each time (80-120 s with another VM running on the same two cores).
So netlab exports / a second time, mounts that with cache=loose, and bind-mounts from it
the venv, the interpreter's prefix and standard library, and the system's programs and
shared libraries: read once, then served from guest RAM (`netlab --version`: 12.5 s the
first time, then 7.6-8 s). The price: those trees are read-only in the guest (not
RAM-writable like the rest of /usr), and what the host changes in them while the VM runs
may be seen stale (don't pip install meanwhile). The checkout itself stays uncached:
other people's edits must show up, not vanish.

Nothing outlives the command: the guest's writes are in its RAM, the qemu started here is
stopped by PID (also on Ctrl-C or SIGTERM of `netlab vm`), and the one scratch directory
(the guest script, vng's exit-code file) is removed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess  # noqa: TID251 - the VM tier drives vng/qemu as processes
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

from netlab.errors import FeatureError

__all__ = [
    "GUEST_MODULES",
    "VmSpec",
    "cached_paths",
    "check_tools",
    "find_kernel",
    "guest_env",
    "guest_script",
    "kernel_release",
    "run",
    "vng_argv",
]

# Loaded in the guest before the command. Most netfilter modules load on demand when a rule
# needs them; these do not (br_netfilter, the IPVS schedulers kube-proxy may name, xt_ipvs
# for its masquerade rule), or are loaded up front so a lab never waits on them. Not ipip
# (nor sit, gre, ip6_tunnel): loaded, it puts a fallback tunl0 into every new namespace, and
# netlab's pod build expects a new namespace to hold only lo (eth0 = ifindex 2); creating an
# ipip link loads it on demand anyway.
GUEST_MODULES = (
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_lc",
    "ip_vs_wlc",
    "ip_vs_sh",
    "ip_vs_dh",
    "ip_vs_sed",
    "ip_vs_nq",
    "xt_ipvs",
    "nf_conntrack",
    "br_netfilter",
    "bridge",
    "veth",
    "vxlan",
    "dummy",
    "ip_set",
    "xt_set",
    "sch_netem",
)

# The host environment goes into the guest except what would point at host-only things
# (sockets, a display, a TMPDIR the guest cannot write) or what the guest sets itself.
_ENV_DROP = re.compile(
    r"^(PATH|PWD|OLDPWD|SHLVL|_|HOME|TMPDIR|TMP|TEMP|XDG_RUNTIME_DIR|DBUS_SESSION_BUS_ADDRESS|DISPLAY|"
    r"WAYLAND_DISPLAY|SSH_AUTH_SOCK|SSH_AGENT_PID|GPG_AGENT_INFO|LS_COLORS|MAIL|INVOCATION_ID|JOURNAL_STREAM)$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The second, cached export of the host's / (see the module docstring).
_CACHED_TAG = "netlab-host"
_CACHED_MNT = "/run/netlab-vm/host"
_CACHED_OPTS = "trans=virtio,version=9p2000.L,cache=loose,ro,msize=512000,access=any"
_CACHED_QEMU = (
    f"-fsdev local,id=netlabhost,path=/,security_model=none,readonly=on,multidevs=remap "
    f"-device virtio-9p-pci,fsdev=netlabhost,mount_tag={_CACHED_TAG}"
)
# The guest's own PATH (virtme-ng-init sets a short one), after the venv's bin.
_GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SETUP = "sudo scripts/setup --vm"


@dataclass(frozen=True)
class VmSpec:
    """One `netlab vm` run: which kernel, how big a VM, what to run where."""

    kernel: Path
    command: tuple[str, ...]
    cwd: Path
    venv_bin: Path
    memory: str = "2G"
    cpus: int = 2
    kvm: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    cached: tuple[Path, ...] = ()  # served from the cached 9p view of / (see the module docstring)


def cached_paths(venv_bin: Path) -> tuple[Path, ...]:
    """What the processes a lab test starts read again and again and nobody edits during a
    run: the venv, the interpreter and its standard library (the whole prefix when it is a
    tree of its own, like pyenv's), the system's programs (ip, nft, iptables) and shared
    libraries. Not the checkout: its sources stay live (an edit on the host replaces a file,
    and a cached directory would go on naming the old one: "No module named ...")."""
    import platform
    import sysconfig

    paths = [venv_bin.parent, Path(sys.executable).resolve()]
    base = Path(sys.base_prefix)
    paths.append(base if str(base) not in ("/", "/usr", "/usr/local") else Path(sysconfig.get_paths()["stdlib"]))
    paths += [Path("/usr/bin"), Path("/usr/sbin"), Path(f"/usr/lib/{platform.machine()}-linux-gnu")]
    out: list[Path] = []
    for p in sorted({p.resolve() for p in paths if p.exists()}):
        if not any(p.is_relative_to(q) for q in out):  # sorted: a parent comes before its children
            out.append(p)
    return tuple(out)


def _version_key(name: str) -> tuple[tuple[int, str], ...]:
    # "6.1.0-56-amd64" > "6.1.0-9-amd64": compare the numbers as numbers
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", name) if p)


def kernel_release(kernel: Path) -> str:
    """The release a /boot/vmlinuz-<release> image is named after."""
    name = kernel.name
    return name.split("-", 1)[1] if name.startswith(("vmlinuz-", "vmlinux-", "bzImage-")) else name


def has_ipvs_modules(release: str, modules: Path = Path("/lib/modules")) -> bool:
    """Whether /lib/modules/<release> has ip_vs, as a module (modules.dep) or built in."""
    d = modules / release
    for index in ("modules.dep", "modules.builtin"):
        try:
            text = (d / index).read_text(errors="replace")
        except OSError:
            continue
        if re.search(r"(^|/)ip_vs\.ko", text, re.MULTILINE):
            return True
    return False


def find_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> Path:
    """The newest /boot/vmlinuz-* whose /lib/modules/<release> has ip_vs."""
    images = sorted(boot.glob("vmlinuz-*"), key=lambda p: _version_key(kernel_release(p)), reverse=True)
    for image in images:
        if has_ipvs_modules(kernel_release(image), modules):
            return image
    seen = ", ".join(p.name for p in images) or "none"
    raise FeatureError(
        f"netlab vm found no kernel to boot: it needs a {boot}/vmlinuz-<release> whose {modules}/<release> "
        f"has the ip_vs module (found: {seen}); run `{_SETUP}` (it installs Debian's linux-image-amd64) "
        f"or pass --kernel"
    )


def _is_static_elf(path: str) -> bool:
    """An ELF executable without a PT_INTERP program header (no dynamic loader)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # ELFCLASS64
                return False
            order: Literal["little", "big"] = "little" if head[5] == 1 else "big"
            phoff = int.from_bytes(head[0x20:0x28], order)
            phentsize = int.from_bytes(head[0x36:0x38], order)
            phnum = int.from_bytes(head[0x38:0x3A], order)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(int.from_bytes(table[i : i + 4], order) != 3 for i in range(0, len(table), phentsize))  # PT_INTERP


def check_tools(spec: VmSpec) -> Path:
    """Everything vng needs on the host, or one sentence naming what is missing; returns vng."""
    path = f"{spec.venv_bin}{os.pathsep}{os.environ.get('PATH', _GUEST_PATH)}"
    vng = shutil.which("vng", path=path)
    if vng is None or shutil.which("virtme-run", path=path) is None:
        raise FeatureError(
            f"netlab vm needs virtme-ng (`vng`), which is not installed in {spec.venv_bin.parent}; run `{_SETUP}`"
        )
    if shutil.which("qemu-system-x86_64", path=path) is None:
        raise FeatureError(
            f"netlab vm needs qemu-system-x86_64 (Debian package qemu-system-x86), which is not installed; "
            f"run `{_SETUP}`"
        )
    # virtme-run packs a busybox into the guest's initramfs; it must not need shared libraries,
    # and virtme checks that with `file`.
    found = (shutil.which(n, path=path) for n in ("busybox-static", "busybox.static", "busybox"))
    busybox = next((b for b in found if b), None)  # the one virtme-run picks: the first found
    if busybox is None or not _is_static_elf(busybox) or shutil.which("file", path=path) is None:
        raise FeatureError(
            "netlab vm needs a statically linked busybox (Debian package busybox-static) and `file` for "
            f"virtme-ng's initramfs; run `{_SETUP}`"
        )
    if not spec.kernel.is_file():
        raise FeatureError(f"netlab vm: no kernel image at {spec.kernel}; run `{_SETUP}` or pass another --kernel")
    if not os.access(spec.kernel, os.R_OK):
        raise FeatureError(
            f"netlab vm cannot read {spec.kernel} (some distributions make kernel images readable by root "
            f"only); run netlab vm with sudo"
        )
    if re.search(r"\s", str(spec.kernel)):
        # vng passes the path through a shell unquoted
        raise FeatureError(f"netlab vm: the kernel path {str(spec.kernel)!r} has a space; copy or link it elsewhere")
    return Path(vng)


def guest_env(host: Mapping[str, str], venv_bin: Path) -> dict[str, str]:
    """The environment the command gets in the guest: the host's, with the venv's bin first."""
    env = {k: v for k, v in host.items() if _ENV_NAME.match(k) and not _ENV_DROP.match(k)}
    env["PATH"] = f"{venv_bin}:{_GUEST_PATH}"
    env["VIRTUAL_ENV"] = str(venv_bin.parent)
    # the checkout is read-only in the guest: don't let every import try to write __pycache__
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # stdout is a pipe in the guest (see guest_script): keep Python's output line by line, live
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def guest_script(spec: VmSpec) -> str:
    """The POSIX sh script the guest runs: environment, /run, the cached Python trees,
    modules, then the command in its directory, its stdout in 4 KiB writes, its exit status."""
    q = shlex.quote
    mods = " ".join(GUEST_MODULES)
    lines = [
        "# written by `netlab vm`, run by the guest's init as root",
        *(f"export {k}={q(v)}" for k, v in sorted(guest_env(spec.env, spec.venv_bin).items())),
        # netlab keeps lab state in /run/netlab and `ip netns` mounts in /run/netns
        "if ! mkdir -p /run/netlab /run/netns 2>/dev/null; then",
        "  mount -t tmpfs -o mode=0755 netlab-run /run && mkdir -p /run/netlab /run/netns || exit 125",
        "fi",
    ]
    if spec.cached:
        # without the cached view (a mount error) everything still works, only slower
        mount = f"mount -t 9p -o {_CACHED_OPTS} {_CACHED_TAG} {_CACHED_MNT}"
        lines += [
            f"if mkdir -p {_CACHED_MNT} && {mount} 2>/dev/null; then",
            f"  for p in {' '.join(q(str(p)) for p in spec.cached)}; do",
            f'    [ -e "$p" ] && mount --bind "{_CACHED_MNT}$p" "$p"',
            "  done",
            "fi",
        ]
    lines += [
        # `modprobe -a`: one process for all (module loading is slow under TCG); on failure,
        # name the ones that are missing and go on: the command may not need them.
        f"if ! modprobe -a {mods} 2>/dev/null; then",
        f'  missing=; for m in {mods}; do modprobe -q $m 2>/dev/null || missing="$missing $m"; done',
        '  echo "netlab vm: this kernel could not load:$missing" >&2',
        "fi",
        # after the bind mounts, so that the directory is the cached one
        f"cd {q(str(spec.cwd))} || exit 125",
        # The command's stdout goes through `dd bs=4096`: a single large write to the guest's
        # stdout loses everything past its first 32 KiB on the way out of the VM (a 573 KB JSON
        # line printed at once arrived as 32 KiB), written in 4 KiB pieces it all arrives. Its
        # exit status is kept in a file (POSIX sh has no pipefail).
        "netlab_rc=$(mktemp) || exit 125",
        f'{{ {shlex.join(spec.command)}; echo $? > "$netlab_rc"; }} | dd bs=4096 status=none',
        'rc=$(cat "$netlab_rc" 2>/dev/null); rm -f "$netlab_rc"; exit "${rc:-125}"',
    ]
    return "\n".join(lines) + "\n"


def vng_argv(vng: Path, spec: VmSpec, script: Path) -> list[str]:
    argv = [str(vng), "--run", str(spec.kernel), "--user", "root", "--memory", spec.memory, "--cpus", str(spec.cpus)]
    # --force-9p: without a Rust virtiofsd (Debian 12 has none) virtme waits ~3 s for one
    # before it falls back to 9p anyway. KVM hangs on the development machines: TCG by default.
    argv += ["--force-9p"]
    if not spec.kvm:
        argv += ["--disable-kvm"]
    if spec.cached:
        argv += [f"--qemu-opts={_CACHED_QEMU}"]
    return [*argv, "--", f"sh {shlex.quote(str(script))}"]


def _group(pgid: int) -> list[int]:
    """The processes of one process group (the session `run` started for vng)."""
    pids = []
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            stat = Path(f"/proc/{e}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            pids.append(int(e))
    return pids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop the VM that `proc` (vng, leader of its own session) started: SIGTERM to qemu
    first (it exits cleanly and restores the terminal), then to the rest; SIGKILL by PID to
    whatever is left after `grace`."""
    pgid = proc.pid
    members = _group(pgid)
    qemus = [p for p in members if _comm(p).startswith("qemu-system")]
    for pid in qemus + [p for p in members if p not in qemus]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group(pgid):
            return
        time.sleep(0.1)
    for pid in _group(pgid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


class _Interrupts:
    """Ctrl-C, SIGTERM and SIGHUP end `netlab vm` the same way: the VM is stopped, then
    KeyboardInterrupt. While not `armed` (starting vng, stopping the VM) a signal is only
    noted, so that no moment exists in which one could leave a qemu running."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.pending = False
        self.armed = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.pending = True
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt

    def arm(self) -> None:
        self.armed = True
        if self.pending:
            self.armed = False
            raise KeyboardInterrupt

    def __enter__(self) -> _Interrupts:
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@contextmanager
def _terminal_restored() -> Iterator[None]:
    """qemu puts a terminal on stdin into raw mode; whatever happens, put it back."""
    try:
        import termios

        saved = termios.tcgetattr(0) if os.isatty(0) else None
    except (ImportError, OSError):
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _pump(src: IO[bytes], dst: IO[bytes]) -> None:
    """Copy the VM's output to ours as it comes. A reader that went away (`| head`) stops
    the copying, not the draining: qemu must never block on a full pipe."""
    ok = True
    while chunk := os.read(src.fileno(), 65536):
        if ok:
            try:
                dst.write(chunk)
                dst.flush()
            except (BrokenPipeError, ValueError):
                ok = False


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def run(spec: VmSpec, *, log: bool = True) -> int:
    """Boot spec.kernel, run spec.command in it, return the command's exit code.

    Raises FeatureError (before booting) when the host lacks vng, qemu, busybox-static or
    the kernel, and KeyboardInterrupt after stopping the VM on Ctrl-C, SIGTERM or SIGHUP."""
    vng = check_tools(spec)
    t0 = time.monotonic()
    if log:
        accel = "KVM" if spec.kvm else "TCG, no KVM"
        print(
            f"netlab vm: booting {spec.kernel} (qemu {accel}, {spec.cpus} CPUs, {spec.memory}); "
            f"running {shlex.join(spec.command)}",
            file=sys.stderr,
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="netlab-vm-") as tmp:
        script = Path(tmp) / "guest.sh"
        script.write_text(guest_script(spec))
        # vng and virtme-run find each other on PATH; their scratch files go to our directory
        env = {**os.environ, "PATH": f"{spec.venv_bin}{os.pathsep}{os.environ.get('PATH', _GUEST_PATH)}"}
        env["TMPDIR"] = tmp
        with _terminal_restored(), _Interrupts() as interrupts:
            # Output goes through pipes that we copy: qemu opens /proc/self/fd/1 anew, twice
            # (the command's stdout and the guest's /dev/stdout), which on a regular file
            # (`netlab vm ... > log`, CI logs) means two offsets that overwrite each other.
            proc = subprocess.Popen(
                vng_argv(vng, spec, script),
                env=env,
                cwd=spec.cwd,
                start_new_session=True,
                stdin=None if _fd_open(0) else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert proc.stdout is not None and proc.stderr is not None
            pumps = [
                threading.Thread(target=_pump, args=(proc.stdout, sys.stdout.buffer), daemon=True),
                threading.Thread(target=_pump, args=(proc.stderr, sys.stderr.buffer), daemon=True),
            ]
            try:
                for t in pumps:
                    t.start()
                interrupts.arm()
                rc = proc.wait()
            finally:
                interrupts.armed = False
                if proc.returncode is None or _group(proc.pid):
                    _stop(proc)
                for t in pumps:
                    t.join(timeout=5)
                proc.stdout.close()
                proc.stderr.close()
            if interrupts.pending:  # arrived after the command ended: still an interruption
                raise KeyboardInterrupt
    if log:
        print(f"netlab vm: exit {rc} after {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    return rc
