"""Loopback ports for Magnetar's Python tests and bench scripts, by the rule
of the Rust test kit (tests/kit/src/ports.rs): below the kernel's ephemeral
range, so that no outgoing connection takes the port as its source port
before the server binds it, and never the same port twice in a process.

    from free_port import free_port      # in Python
    python3 tests/kit/free_port.py [N]    # from bash: N ports, one a line
"""

import random
import socket
import sys

LOW = 10000
_GIVEN = set()


def ephemeral_start():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
    return high if high > LOW + 1000 else 32768


def free_port():
    high = ephemeral_start()
    start = random.randrange(LOW, high)
    for i in range(high - LOW):
        port = LOW + (start - LOW + i) % (high - LOW)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port below {high}")


if __name__ == "__main__":
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 1):
        print(free_port())
