"""The interop matrix across regions: written in east through Kafka
(confluent-kafka), AMQP (pika, to `amq.topic`), MQTT (paho) and the
WebSocket API, read in west through all four. Topics replicate as they
are; what enters an exchange in east is routed through west's exchange
of the same name (exchange federation), so west's queues and MQTT
sessions get each message once."""

from geo_tests.regions import regions, replicate_default
from interop_tests.test_matrix import Matrix, run_matrix


def test_sixteen_of_sixteen_from_east_to_west(capsys):
    with regions(["east", "west"], kafka_ns="public/default") as r:
        east, west = r["east"], r["west"]
        replicate_default([east, west])
        run_matrix(Matrix(east, sink=west), capsys, title="east -> west")
