"""Every query of the Grafana dashboards under `dashboards/` names a
metric the processes export, scraped after traffic from real clients:
a renamed metric breaks this test rather than a panel."""

import glob
import json
import os
import re
import time
import uuid

import paho.mqtt.client as mqtt
import pika
from confluent_kafka import Consumer, Producer

from metrics_tests.test_metrics import families, get, scrape  # noqa: F401

DASHBOARDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "dashboards")

# PromQL words that look like metric names.
PROMQL = {"sum", "rate", "irate", "max", "min", "avg", "by", "without", "histogram_quantile",
          "label_values", "count", "increase", "on", "ignoring", "group_left", "group_right"}


def boards():
    files = sorted(glob.glob(os.path.join(DASHBOARDS, "*.json")))
    assert len(files) >= 5, files
    return {os.path.basename(f): json.load(open(f)) for f in files}


def metric_names(expr):
    # Drop label matchers and template variables, then take identifiers
    # that are not functions or keywords (a name before `(` is a function).
    bare = re.sub(r'\{[^}]*\}', "", expr)
    bare = re.sub(r'"[^"]*"', "", bare)
    bare = re.sub(r'\[[^\]]*\]', "", bare)
    bare = re.sub(r'\b(by|without|on|ignoring)\s*\([^)]*\)', "", bare)
    names = set()
    for m in re.finditer(r'[a-zA-Z_:][a-zA-Z0-9_:]*', bare):
        word = m.group(0)
        after = bare[m.end():].lstrip()
        if word in PROMQL or after.startswith("(") or word == "le" or word == "instance":
            continue
        if re.fullmatch(r'\d+[smhd]?', word):
            continue
        names.add(word)
    return names


def test_the_dashboards_are_grafana_dashboards():
    for name, d in boards().items():
        assert d["title"] and d["uid"] and d["schemaVersion"] >= 30, name
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), name
        for p in d["panels"]:
            assert p["type"] in ("timeseries", "stat", "gauge", "table"), (name, p["title"])
            assert p["targets"] and all(t["expr"] for t in p["targets"]), (name, p["title"])
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, (name, p["title"])


def test_every_query_names_an_exported_metric(standalone):
    s = standalone
    # Traffic that brings every family to life: Kafka with a committing
    # group (lag), MQTT with a persistent session and a retained message.
    topic = f"dash-{uuid.uuid4().hex[:8]}"
    p = Producer({"bootstrap.servers": s.kafka})
    for i in range(20):
        p.produce(topic, b"x%d" % i)
    assert p.flush(30) == 0
    c = Consumer({"bootstrap.servers": s.kafka, "group.id": f"g-{topic}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    got = 0
    deadline = time.time() + 30
    while got < 5 and time.time() < deadline:
        m = c.poll(1)
        if m is not None and not m.error():
            got += 1
    c.commit(asynchronous=False)
    c.close()
    m = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dash-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv5)
    props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    m.connect("127.0.0.1", s.mqtt_port, clean_start=False, properties=props)
    m.loop_start()
    m.subscribe("dash/#", qos=1)
    m.publish("dash/retained", b"r", qos=1, retain=True).wait_for_publish(10)
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", s.amqp_port))
    conn.channel().queue_declare(f"dash-{topic}", durable=True)
    conn.close()
    time.sleep(0.5)
    fams = families(f"{s.http}/metrics")
    # A family without samples yet (nothing offloaded so far) is exported
    # by its `# TYPE` line.
    exported = {line.split()[2] for line in get(f"{s.http}/metrics")[2].splitlines()
                if line.startswith("# TYPE ")}
    for f in fams.values():
        exported.add(f.name)
        for smp in f.samples:
            exported.add(smp.name)
    missing = {}
    for name, d in boards().items():
        for p in d["panels"]:
            for t in p["targets"]:
                for n in metric_names(t["expr"]):
                    family = re.sub(r'_(total|bucket|sum|count)$', "", n)
                    if n not in exported and family not in exported:
                        missing.setdefault(name, set()).add(n)
    m.loop_stop()
    m.disconnect()
    assert not missing, missing
