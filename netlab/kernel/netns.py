"""Network namespaces, entered per thread.

setns(2) moves only the calling thread, and a socket stays bound to the namespace it was
created in. So netlab enters a namespace, opens its netlink socket there, and returns: this
costs ~0.3 ms, where pyroute2's `IPRoute(netns=...)` forks a helper per open (~17 ms).

A named netns is a bind mount of /proc/thread-self/ns/net on /run/netns/<name>, exactly as
`ip netns add` makes it, so `ip netns exec` and every other tool see netlab's namespaces.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "RUN_DIR",
    "create",
    "delete",
    "exists",
    "inode",
    "inside",
    "list_names",
]

RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(ret: int, what: str, target: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", target)


def path(name: str) -> str:
    return os.path.join(RUN_DIR, name)


def _setns(fd: int, target: str) -> None:
    _check(_libc.setns(fd, CLONE_NEWNET), "setns", target)


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the body with the calling thread in netns `name`; always switch back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        fd = os.open(path(name), os.O_RDONLY)
        try:
            _setns(fd, name)
        finally:
            os.close(fd)
        try:
            yield
        finally:
            _setns(home, "the caller's namespace")
    finally:
        os.close(home)


_run_dir_ready = False


def _ensure_run_dir() -> None:
    global _run_dir_ready
    if _run_dir_ready and os.path.isdir(RUN_DIR):
        return
    _run_dir_ready = True
    # iproute2 makes /run/netns a shared mount point so that namespace mounts propagate to
    # every mount namespace (ip netns exec makes a private one); do the same, once.
    os.makedirs(RUN_DIR, exist_ok=True)
    d = RUN_DIR.encode()
    if _libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    _check(_libc.mount(d, d, b"none", MS_BIND | MS_REC, None), "bind mount", RUN_DIR)
    _check(_libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None), "make shared", RUN_DIR)


@contextmanager
def create(name: str) -> Iterator[None]:
    """Create netns `name` and run the body inside it *before* the name is published.

    The body configures the namespace (sysctls, the ownership mark on `lo`); only then is the
    namespace bind-mounted under its name. If the process dies before that, the kernel frees
    the unnamed namespace with the thread: no unmarked lab namespace can ever exist.
    """
    _ensure_run_dir()
    target = path(name)
    if os.path.exists(target):
        raise FileExistsError(errno.EEXIST, "netns exists", name)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare", name)
        try:
            yield
            fd = os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0)
            os.close(fd)
            try:
                _check(
                    _libc.mount(b"/proc/thread-self/ns/net", target.encode(), b"none", MS_BIND, None),
                    "bind mount",
                    name,
                )
            except BaseException:
                os.unlink(target)
                raise
        finally:
            _setns(home, "the caller's namespace")
    finally:
        os.close(home)


@contextmanager
def anonymous() -> Iterator[int]:
    """Run the body in a new, unnamed netns; yield an fd that keeps the netns alive.

    Sockets opened in the body stay in the new netns. Closing the fd (and those sockets)
    frees the namespace and everything in it, veth peers included: that is what makes a pod
    built this way crash-safe until `publish` names it.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare", "a new namespace")
        try:
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                yield fd
            except BaseException:
                os.close(fd)
                raise
        finally:
            _setns(home, "the caller's namespace")
    finally:
        os.close(home)


def publish(fd: int, name: str) -> None:
    """Give the netns behind `fd` its name (/run/netns/<name>), as `ip netns attach` does."""
    _ensure_run_dir()
    target = path(name)
    os.close(os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    try:
        _check(_libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), b"none", MS_BIND, None), "bind mount", name)
    except BaseException:
        os.unlink(target)
        raise


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the body is done.

    Creating a kernel object and recording how to undo it must happen as one step: a Ctrl-C
    between the two would leave an object the rollback does not know about.
    """
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def delete(name: str) -> None:
    """Unpublish netns `name`. The kernel frees it (and its links) once no process holds it."""
    target = path(name)
    _libc.umount2(target.encode(), MNT_DETACH)  # EINVAL if it was never mounted: fine
    try:
        os.unlink(target)
    except FileNotFoundError:
        pass


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def list_names(prefix: str = "") -> list[str]:
    try:
        return sorted(n for n in os.listdir(RUN_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def inode(name: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the namespace behind the name; None if it is not a mounted netns."""
    try:
        st = os.stat(path(name))
    except FileNotFoundError:
        return None
    if st.st_size != 0 or not Path("/proc/self/ns/net").exists():
        return None
    home = os.stat("/proc/self/ns/net")
    if st.st_dev != home.st_dev:  # a plain file on tmpfs, not an nsfs mount
        return None
    return st.st_dev, st.st_ino


def write_sysctl(key: str, value: str | int) -> bool:
    """Write a per-netns sysctl from inside the namespace; False if the kernel lacks the key."""
    try:
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(str(value))
        return True
    except FileNotFoundError:
        return False
