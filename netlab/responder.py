"""A pod's small server: answers with the pod's name on TCP and UDP ports (stdlib only).

Started by `netlab up` for pods with `serve:`; it enters the pod's namespace itself, binds,
prints "ready", then serves until SIGTERM. TCP: an HTTP request gets an HTTP/1.0 reply whose
body is the name; any other client gets the name and a newline. UDP: each datagram is answered
with the name.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import selectors
import signal
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")


def _enter(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns {ns}")
    os.close(fd)


def _tcp_client(conn: socket.socket, name: bytes) -> None:
    with conn:
        try:
            conn.settimeout(0.1)  # clients that speak first (HTTP) do so at once
            try:
                data = conn.recv(4096)
            except TimeoutError:
                data = b""
            body = name + b"\n"
            if data.startswith(HTTP_METHODS):
                head = (
                    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\nConnection: close\r\n\r\n"
                )
                conn.sendall(head + (b"" if data.startswith(b"HEAD ") else body))
            else:
                conn.sendall(body)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netlab-responder")
    ap.add_argument("--netns", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--listen", action="append", default=[], help="PORT/tcp or PORT/udp")
    args = ap.parse_args(argv)
    _enter(args.netns)
    name = args.name.encode()
    sel = selectors.DefaultSelector()
    for spec in args.listen:
        port_s, _, proto = spec.partition("/")
        if proto == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", int(port_s)))
        if proto != "udp":
            s.listen(512)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, proto)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    # started while `netlab up` held SIGINT/SIGTERM blocked; the mask is inherited
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        os.close(1)
    except OSError:
        pass
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if not isinstance(sock, socket.socket):  # only sockets are registered
                continue
            try:
                if key.data == "udp":
                    _, peer = sock.recvfrom(65535)
                    sock.sendto(name + b"\n", peer)
                else:
                    conn, _ = sock.accept()
                    conn.setblocking(True)
                    threading.Thread(target=_tcp_client, args=(conn, name), daemon=True).start()
            except (BlockingIOError, InterruptedError):
                continue


if __name__ == "__main__":
    sys.exit(main())
