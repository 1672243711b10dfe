"""Malformed input gets an error response or a clean close, and the broker
keeps serving: random bytes, oversized and negative lengths, unknown API
keys and versions, a truncated record batch."""

import os
import random
import socket
import struct

from confluent_kafka.admin import AdminClient


def connect(standalone):
    host, port = standalone.kafka.split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def header(api_key, version, correlation, client=b"raw"):
    return struct.pack(">hhih", api_key, version, correlation, len(client)) + client


def frame(body):
    return struct.pack(">i", len(body)) + body


def read_frame(s):
    """A response frame, or None when the broker closed the connection."""
    data = b""
    while len(data) < 4:
        chunk = s.recv(4 - len(data))
        if not chunk:
            return None
        data += chunk
    (n,) = struct.unpack(">i", data)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            return None
        body += chunk
    return body


def closed(s):
    try:
        return read_frame(s) is None
    except (ConnectionResetError, socket.timeout):
        return True


def still_serving(standalone):
    md = AdminClient({"bootstrap.servers": standalone.kafka}).list_topics(timeout=10)
    assert len(md.brokers) == 1


def test_random_bytes_are_answered_or_closed(standalone):
    rnd = random.Random(7)
    for i in range(300):
        s = connect(standalone)
        body = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 200)))
        if i % 2:
            # A valid API key and version in front makes the body decoder work.
            key, version = rnd.choice([(0, 3), (1, 11), (3, 9), (11, 5), (19, 5), (32, 2)])
            body = header(key, version, i) + body
        s.sendall(frame(body))
        s.settimeout(5)
        # Either a response or a close; never a hang past the timeout.
        try:
            read_frame(s)
        except (ConnectionResetError, socket.timeout):
            pass
        s.close()
    still_serving(standalone)


def test_oversized_and_negative_lengths_close_the_connection(standalone):
    for n in (0x7FFFFFFF, 200 * 1024 * 1024, -1, -100):
        s = connect(standalone)
        s.sendall(struct.pack(">i", n) + b"\0" * 64)
        assert closed(s), n
        s.close()
    still_serving(standalone)


def test_unknown_api_key_and_version(standalone):
    s = connect(standalone)
    s.sendall(frame(header(999, 0, 1)))
    assert closed(s)
    s.close()

    s = connect(standalone)
    s.sendall(frame(header(3, 99, 2) + struct.pack(">i", -1)))
    assert closed(s)
    s.close()

    # ApiVersions of an unknown version is answered at version 0 with
    # UNSUPPORTED_VERSION and the served ranges.
    s = connect(standalone)
    s.sendall(frame(header(18, 99, 3)))
    resp = read_frame(s)
    correlation, error, count = struct.unpack(">ihi", resp[:10])
    assert (correlation, error) == (3, 35)
    keys = {struct.unpack(">hhh", resp[10 + 6 * i:16 + 6 * i])[0] for i in range(count)}
    assert {0, 1, 3, 18} <= keys
    s.close()
    still_serving(standalone)


def produce_v3(correlation, topic, records):
    t = topic.encode()
    body = header(0, 3, correlation)
    body += struct.pack(">hhi", -1, 1, 30000)  # transactional id, acks, timeout
    body += struct.pack(">ih", 1, len(t)) + t
    body += struct.pack(">ii", 1, 0) + struct.pack(">i", len(records)) + records
    return frame(body)


def test_truncated_record_batch_gets_corrupt_message(standalone):
    AdminClient({"bootstrap.servers": standalone.kafka}).list_topics("raw-topic", timeout=10)
    # A batch header claiming 1,000 bytes, cut short after 70.
    batch = struct.pack(">qi", 0, 1000 - 12) + struct.pack(">ib", -1, 2) + os.urandom(61)
    s = connect(standalone)
    s.sendall(produce_v3(9, "raw-topic", batch))
    resp = read_frame(s)
    assert resp is not None
    (correlation,) = struct.unpack(">i", resp[:4])
    assert correlation == 9
    # responses[1]: name, partitions[1]: index, error_code
    name_len = struct.unpack(">h", resp[8:10])[0]
    at = 10 + name_len + 4
    index, error = struct.unpack(">ih", resp[at:at + 6])
    assert (index, error) == (0, 2), "CORRUPT_MESSAGE"
    s.close()
    still_serving(standalone)
