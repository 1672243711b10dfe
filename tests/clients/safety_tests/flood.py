"""Opens idle TCP connections that never send a byte, then reports how
many the server has closed. Run as a helper process, so that the test's
own descriptors are not the limit:

    python flood.py PORT COUNT WAIT_S

prints `connected N` once connected, then `closed N` after WAIT_S seconds.
"""

import errno
import resource
import select
import socket
import sys
import time


def main():
    port, count, wait_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks = []
    refused = 0
    for _ in range(count):
        s = socket.socket()
        s.settimeout(10)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            refused += 1
            s.close()
            continue
        s.setblocking(False)
        socks.append(s)
    print(f"connected {len(socks)} refused {refused}", flush=True)
    deadline = time.time() + wait_s
    poll = select.poll()
    by_fd = {}
    for s in socks:
        poll.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
        by_fd[s.fileno()] = s
    closed = 0
    while by_fd and time.time() < deadline:
        for fd, _ in poll.poll(500):
            s = by_fd.get(fd)
            if s is None:
                continue
            try:
                data = s.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno not in (errno.ECONNRESET, errno.EPIPE):
                    raise
                data = b""
            if not data:
                poll.unregister(fd)
                del by_fd[fd]
                s.close()
                closed += 1
    print(f"closed {closed + refused} of {count}", flush=True)


if __name__ == "__main__":
    main()
