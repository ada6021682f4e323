"""Network helpers of the actors: rendezvous ports, a rendezvous store that listens on one
address only, and the loopback interface (a local run listens on 127.0.0.1 alone)."""

from __future__ import annotations

import socket

#: Rendezvous ports come from here: below the OS's ephemeral range (32768+, where other
#: processes' outgoing sockets land) and above Ray's worker ports (10002-19999), so the
#: check-then-use gap rarely meets a collision (a free port from bind(0) did, under load).
PORT_RANGE = (20000, 30000)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`, from PORT_RANGE."""
    import random

    rng = random.Random()  # independent of the seeded global RNG: concurrent runs must differ
    for _ in range(200):
        port = rng.randrange(*PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {PORT_RANGE} on {host or 'any address'}")


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def tcp_store(addr: str, port: int, world_size: int, rank: int, timeout):
    """The rendezvous store of a process group. torch's own store server listens on every
    interface; this one listens on `addr` alone (127.0.0.1 in a local run, rank 0's node
    address on a cluster): rank 0 binds the socket and hands it to the server."""
    from torch.distributed import TCPStore

    if rank != 0:
        return TCPStore(addr, port, world_size, False, timeout=timeout)
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(128)
    # The server owns the socket from here on (detached: Python's GC must not close it).
    return TCPStore(addr, port, world_size, True, timeout=timeout, master_listen_fd=sock.detach())


def loopback_interface() -> str | None:
    """The name of the network interface that holds 127.0.0.1 (lo on Linux)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addrs):
            return name
    return None
