"""MQTT fixtures: paho clients (3.1.1 and 5) on the module's standalone
process, and a raw-socket client for what paho will not send (QoS 2 resends,
malformed packets, limits)."""

import dataclasses
import queue
import socket
import struct
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5

#: Run a test at both protocol levels: `@LEVELS def test_x(level, ...)`.
LEVELS = pytest.mark.parametrize("level", [V311, V5], ids=["v311", "v5"])

#: How long a test waits to be sure something does *not* arrive.
QUIET = 0.7


def uid():
    return uuid.uuid4().hex[:10]


@pytest.fixture
def tag():
    """A fresh name part, so that the module's tests, which share one
    broker, never see each other's topics, sessions or groups."""
    return uid()


def props(packet_type, **values):
    """paho Properties for `packet_type` (PacketTypes.PUBLISH, CONNECT,
    SUBSCRIBE, WILLMESSAGE, ...) from keyword values."""
    p = Properties(packet_type)
    for k, v in values.items():
        setattr(p, k, v)
    return p


def prop(p, name, default=None):
    """A property of a received message/CONNACK, or `default`."""
    if p is None:
        return default
    return getattr(p, name, default)


@dataclasses.dataclass
class Msg:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int
    properties: object
    #: The topic came as an alias only (v5 outbound topic alias).
    via_alias: bool = False

    def prop(self, name, default=None):
        return prop(self.properties, name, default)


class Client:
    """A paho client on a loop thread whose callbacks feed queues, so that
    tests wait on what arrives with a timeout."""

    def __init__(self, port, level, client_id=None, clean=True, reconnect=False):
        self.port = port
        self.level = level
        self.client_id = client_id if client_id is not None else f"c-{uid()}"
        kw = {}
        if level != V5:
            kw["clean_session"] = clean
        self.clean = clean
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=level, reconnect_on_failure=reconnect, **kw)
        self.messages = queue.Queue()
        self.connacks = queue.Queue()
        self.disconnects = queue.Queue()
        self.subacks = {}
        self.unsubacks = {}
        self._acks = queue.Queue()
        self.aliases = {}
        self.dropped = False
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe

    # callbacks (loop thread)
    def _on_connect(self, c, u, flags, rc, properties):
        self.connacks.put((flags, rc, properties))

    def _on_disconnect(self, c, u, flags, rc, properties):
        self.disconnects.put((flags, rc, properties))

    def _on_message(self, c, u, m):
        topic = m.topic
        p = m.properties if self.level == V5 else None
        alias = prop(p, "TopicAlias")
        via_alias = False
        if alias is not None:
            if topic:
                self.aliases[alias] = topic
            else:
                topic = self.aliases.get(alias, f"<unknown alias {alias}>")
                via_alias = True
        self.messages.put(Msg(topic, m.payload, m.qos, bool(m.retain), bool(m.dup), m.mid, p,
                              via_alias))

    def _on_subscribe(self, c, u, mid, rcs, properties):
        self._acks.put(("sub", mid, [rc.value for rc in rcs]))

    def _on_unsubscribe(self, c, u, mid, rcs, properties):
        self._acks.put(("unsub", mid, [rc.value for rc in rcs] if rcs else []))

    # actions
    def connect(self, clean_start=True, properties=None, will=None, keepalive=60, timeout=10):
        """Connects and waits for CONNACK: (session_present, reason code
        value, CONNACK properties). `will`: (topic, payload, qos, retain,
        properties)."""
        if will is not None:
            t, payload, qos, retain, wp = will
            self.c.will_set(t, payload, qos, retain, properties=wp)
        kw = {}
        if self.level == V5:
            kw["clean_start"] = clean_start
            kw["properties"] = properties
        self.c.connect("127.0.0.1", self.port, keepalive=keepalive, **kw)
        self.c.loop_start()
        flags, rc, p = self.connacks.get(timeout=timeout)
        return flags.session_present, rc.value, p

    def _wait_ack(self, kind, mid, timeout):
        deadline = time.time() + timeout
        stash = []
        try:
            while True:
                k, m, rcs = self._acks.get(timeout=max(0.01, deadline - time.time()))
                if (k, m) == (kind, mid):
                    return rcs
                stash.append((k, m, rcs))
        finally:
            for s in stash:
                self._acks.put(s)

    def subscribe(self, topic, qos=1, options=None, properties=None, timeout=10):
        """Subscribes and waits for SUBACK; the reason code values. `topic`
        may be a list of (filter, qos-or-options)."""
        if options is not None:
            rc, mid = self.c.subscribe(topic, options=options, properties=properties)
        elif isinstance(topic, list):
            rc, mid = self.c.subscribe(topic, properties=properties)
        else:
            rc, mid = self.c.subscribe(topic, qos, properties=properties)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        return self._wait_ack("sub", mid, timeout)

    def unsubscribe(self, topic, timeout=10):
        rc, mid = self.c.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        return self._wait_ack("unsub", mid, timeout)

    def publish(self, topic, payload, qos=0, retain=False, properties=None, timeout=10):
        """Publishes and, for QoS 1 and 2, waits for the broker's PUBACK /
        PUBCOMP."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        info.wait_for_publish(timeout)
        assert info.is_published(), f"publish to {topic!r} not acknowledged in {timeout}s"
        return info

    def expect(self, n=1, timeout=10):
        """The next `n` messages; fails if they do not all arrive."""
        out = []
        deadline = time.time() + timeout
        while len(out) < n:
            left = deadline - time.time()
            try:
                out.append(self.messages.get(timeout=max(0.01, left)))
            except queue.Empty:
                raise AssertionError(
                    f"{self.client_id}: {len(out)} of {n} messages in {timeout}s: {out}") from None
        return out

    def expect_one(self, timeout=10):
        return self.expect(1, timeout)[0]

    def collect(self, within=QUIET):
        """Everything that arrives within `within` seconds."""
        out = []
        deadline = time.time() + within
        while True:
            left = deadline - time.time()
            if left <= 0:
                return out
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                return out

    def expect_none(self, within=QUIET):
        got = self.collect(within)
        assert got == [], f"{self.client_id}: expected nothing, got {got}"

    def disconnect(self, reasoncode=None, properties=None):
        """A clean DISCONNECT."""
        self.c.disconnect(reasoncode=reasoncode, properties=properties)
        self.c.loop_stop()

    def drop(self):
        """Closes the socket without DISCONNECT, as a crashed device would."""
        self.c.loop_stop()
        sock = self.c._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.dropped = True

    def wait_disconnected(self, timeout=10):
        """(from server?, reason code value) of the next on_disconnect."""
        flags, rc, p = self.disconnects.get(timeout=timeout)
        return flags.is_disconnect_packet_from_server, rc.value

    def close(self):
        try:
            if not self.dropped and self.c.is_connected():
                self.c.disconnect()
        except Exception:
            pass
        try:
            self.c.loop_stop()
        except Exception:
            pass
        if self.dropped:
            return
        try:
            if self.c._sock is not None:
                self.c._sock.close()
        except Exception:
            pass


@pytest.fixture
def client(standalone):
    """A factory of paho clients: `client(level, client_id=None,
    clean=True, connect=True, **connect_kw)`. With connect=True it returns
    a connected client (CONNACK checked); otherwise an unconnected one.
    All are disconnected when the test ends."""
    made = []

    def make(level, client_id=None, clean=True, connect=True, **kw):
        c = Client(standalone.mqtt_port, level, client_id=client_id, clean=clean)
        made.append(c)
        if connect:
            _, rc, _ = c.connect(clean_start=clean, **kw)
            assert rc == 0, f"CONNACK {rc:#x}"
        return c

    yield make
    for c in made:
        c.close()


def sub_opts(qos=1, no_local=False, rap=False, rh=0):
    return SubscribeOptions(qos=qos, noLocal=no_local, retainAsPublished=rap, retainHandling=rh)


def sub_id(n):
    return props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=n)


# ---------------------------------------------------------------------------
# A raw MQTT client: enough of an encoder and decoder to send exactly the
# bytes a test needs, valid or not.

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)
NAMES = {v: k for k, v in dict(
    CONNECT=1, CONNACK=2, PUBLISH=3, PUBACK=4, PUBREC=5, PUBREL=6, PUBCOMP=7, SUBSCRIBE=8,
    SUBACK=9, UNSUBSCRIBE=10, UNSUBACK=11, PINGREQ=12, PINGRESP=13, DISCONNECT=14,
    AUTH=15).items()}

# MQTT 5 property ids and their wire types.
PROPS = {
    "PayloadFormatIndicator": (0x01, "byte"), "MessageExpiryInterval": (0x02, "u32"),
    "ContentType": (0x03, "str"), "ResponseTopic": (0x08, "str"),
    "CorrelationData": (0x09, "bin"), "SubscriptionIdentifier": (0x0B, "var"),
    "SessionExpiryInterval": (0x11, "u32"), "AssignedClientIdentifier": (0x12, "str"),
    "ServerKeepAlive": (0x13, "u16"), "AuthenticationMethod": (0x15, "str"),
    "AuthenticationData": (0x16, "bin"), "RequestProblemInformation": (0x17, "byte"),
    "WillDelayInterval": (0x18, "u32"), "RequestResponseInformation": (0x19, "byte"),
    "ResponseInformation": (0x1A, "str"), "ServerReference": (0x1C, "str"),
    "ReasonString": (0x1F, "str"), "ReceiveMaximum": (0x21, "u16"),
    "TopicAliasMaximum": (0x22, "u16"), "TopicAlias": (0x23, "u16"),
    "MaximumQoS": (0x24, "byte"), "RetainAvailable": (0x25, "byte"),
    "UserProperty": (0x26, "pair"), "MaximumPacketSize": (0x27, "u32"),
    "WildcardSubscriptionAvailable": (0x28, "byte"),
    "SubscriptionIdentifierAvailable": (0x29, "byte"),
    "SharedSubscriptionAvailable": (0x2A, "byte"),
}
PROP_BY_ID = {i: (name, kind) for name, (i, kind) in PROPS.items()}


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(text):
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(b)) + b


def encode_props(values):
    out = bytearray()
    for name, v in (values or {}).items():
        i, kind = PROPS[name]
        vals = v if (kind == "pair" and isinstance(v, list)) else [v]
        for v in vals:
            out.append(i)
            out += {
                "byte": lambda x: bytes([x]),
                "u16": lambda x: struct.pack("!H", x),
                "u32": lambda x: struct.pack("!I", x),
                "var": varint,
                "str": s,
                "bin": s,
                "pair": lambda x: s(x[0]) + s(x[1]),
            }[kind](v)
    return varint(len(out)) + bytes(out)


def decode_props(body, pos):
    """(properties dict, position after them)."""
    n, pos = read_varint(body, pos)
    end = pos + n
    out = {}
    while pos < end:
        i = body[pos]
        pos += 1
        name, kind = PROP_BY_ID.get(i, (f"0x{i:02x}", "bin"))
        if kind == "byte":
            v, pos = body[pos], pos + 1
        elif kind == "u16":
            v, pos = struct.unpack_from("!H", body, pos)[0], pos + 2
        elif kind == "u32":
            v, pos = struct.unpack_from("!I", body, pos)[0], pos + 4
        elif kind == "var":
            v, pos = read_varint(body, pos)
        elif kind in ("str", "bin"):
            ln = struct.unpack_from("!H", body, pos)[0]
            v, pos = bytes(body[pos + 2:pos + 2 + ln]), pos + 2 + ln
            if kind == "str":
                v = v.decode()
        else:
            ln = struct.unpack_from("!H", body, pos)[0]
            k = bytes(body[pos + 2:pos + 2 + ln]).decode()
            pos += 2 + ln
            ln = struct.unpack_from("!H", body, pos)[0]
            v = (k, bytes(body[pos + 2:pos + 2 + ln]).decode())
            pos += 2 + ln
        if name in ("UserProperty", "SubscriptionIdentifier"):
            out.setdefault(name, []).append(v)
        else:
            out[name] = v
    return out, end


def read_varint(b, pos):
    n, mult = 0, 1
    while True:
        x = b[pos]
        pos += 1
        n += (x & 0x7F) * mult
        if not x & 0x80:
            return n, pos
        mult *= 128


def packet(ptype, flags, body):
    return bytes([(ptype << 4) | flags]) + varint(len(body)) + body


@dataclasses.dataclass
class Packet:
    type: int
    flags: int
    body: bytes

    @property
    def name(self):
        return NAMES.get(self.type, str(self.type))

    @property
    def packet_id(self):
        return struct.unpack_from("!H", self.body, 0)[0]

    def reason(self, v5):
        """The reason code of an ack or DISCONNECT (0 when left out)."""
        if self.type == DISCONNECT:
            return self.body[0] if self.body else 0
        if self.type == CONNACK:
            return self.body[1]
        if self.type in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            return self.body[2] if v5 and len(self.body) > 2 else 0
        raise ValueError(self.name)

    def __repr__(self):
        return f"<{self.name} flags={self.flags:#x} body={self.body[:40]!r}>"


class Raw:
    """One MQTT connection over a plain socket."""

    def __init__(self, port, level=4, timeout=10):
        self.level = level
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.connack_props = {}

    @property
    def v5(self):
        return self.level == 5

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        self.sock.sendall(data)

    def connect(self, client_id, clean=True, props=None, will=None, keepalive=60):
        """Sends CONNECT and reads CONNACK: (session_present, reason code).
        `will`: (topic, payload, qos, retain, will properties)."""
        flags = 0x02 if clean else 0
        payload = s(client_id)
        if will:
            topic, wpayload, wqos, wretain, wprops = will
            flags |= 0x04 | (wqos << 3) | (0x20 if wretain else 0)
            if self.v5:
                payload += encode_props(wprops)
            payload += s(topic) + s(wpayload)
        var = s("MQTT") + bytes([self.level, flags]) + struct.pack("!H", keepalive)
        if self.v5:
            var += encode_props(props)
        self.send(packet(CONNECT, 0, var + payload))
        ack = self.expect(CONNACK)
        if self.v5:
            self.connack_props, _ = decode_props(ack.body, 2)
        return bool(ack.body[0] & 1), ack.body[1]

    def publish(self, topic, payload=b"", qos=0, pid=None, dup=False, retain=False, props=None):
        self.send(self.publish_bytes(topic, payload, qos, pid, dup, retain, props))

    def publish_bytes(self, topic, payload=b"", qos=0, pid=None, dup=False, retain=False,
                      props=None):
        body = s(topic)
        if qos:
            body += struct.pack("!H", pid)
        if self.v5:
            body += encode_props(props)
        flags = (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
        return packet(PUBLISH, flags, body + payload)

    def ack(self, ptype, pid):
        self.send(packet(ptype, 0x02 if ptype == PUBREL else 0, struct.pack("!H", pid)))

    def subscribe(self, pid, filters, props=None):
        """`filters`: list of (filter, options byte)."""
        body = struct.pack("!H", pid)
        if self.v5:
            body += encode_props(props)
        for f, o in filters:
            body += s(f) + bytes([o])
        self.send(packet(SUBSCRIBE, 0x02, body))

    def disconnect(self, reason=0):
        self.send(packet(DISCONNECT, 0, bytes([reason]) + b"\x00" if self.v5 else b""))

    def recv(self, timeout=10):
        """The next packet; None when the server closed the connection.
        Raises socket.timeout when nothing comes."""
        deadline = time.time() + timeout
        while True:
            p = self._parse()
            if p is not None:
                return p
            left = deadline - time.time()
            if left <= 0:
                raise socket.timeout("no packet")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buf += chunk

    def _parse(self):
        b = self.buf
        if len(b) < 2:
            return None
        n, mult, pos = 0, 1, 1
        while True:
            if pos >= len(b):
                return None
            x = b[pos]
            pos += 1
            n += (x & 0x7F) * mult
            mult *= 128
            if not x & 0x80:
                break
        if len(b) < pos + n:
            return None
        self.buf = b[pos + n:]
        return Packet(b[0] >> 4, b[0] & 0x0F, b[pos:pos + n])

    def expect(self, ptype, timeout=10):
        """The next packet, which must be of `ptype`."""
        p = self.recv(timeout)
        assert p is not None, f"connection closed while waiting for {NAMES[ptype]}"
        assert p.type == ptype, f"expected {NAMES[ptype]}, got {p}"
        return p

    def until_closed(self, timeout=10):
        """The packets the server sends until it closes the connection;
        fails if it is still open after `timeout`."""
        out = []
        deadline = time.time() + timeout
        while True:
            try:
                p = self.recv(max(0.01, deadline - time.time()))
            except socket.timeout:
                raise AssertionError(f"still open after {timeout}s; got {summary(out)}") from None
            if p is None:
                return out
            out.append(p)


def summary(packets, tail=3):
    """A short description of many packets: counts by type, then the last few."""
    if len(packets) <= tail:
        return repr(packets)
    counts = {}
    for p in packets:
        counts[p.name] = counts.get(p.name, 0) + 1
    return f"{counts}, ending {packets[-tail:]!r}"


@pytest.fixture
def raw(standalone):
    """A factory of raw connections: `raw(level=4|5)`; closed at the end."""
    made = []

    def make(level=4):
        r = Raw(standalone.mqtt_port, level)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def level_num(level):
    """paho's protocol constant to the CONNECT protocol level byte."""
    return 5 if level == V5 else 4


def alive(port):
    """The server still serves: a new connection gets CONNACK and PINGRESP."""
    r = Raw(port, 4)
    try:
        _, rc = r.connect(f"alive-{uid()}")
        assert rc == 0
        r.send(packet(PINGREQ, 0, b""))
        r.expect(PINGRESP, timeout=5)
    finally:
        r.close()
