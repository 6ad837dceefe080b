"""Which Kafka errors a one-off query (tradewatch/bus/admin.py group_lag) waits out rather than
reports. Right after a topic is created, the broker can answer a watermark read with "not leader
for partition" while the partition's leader is being settled; librdkafka does not mark that answer
retriable, so the query gave up at once (a red CI run: the quotes stage's test failed on it)."""
from __future__ import annotations

from confluent_kafka import KafkaError

from tradewatch.bus.admin import settling


def test_a_leader_or_coordinator_still_being_settled_is_waited_out():
    for code in (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR,
                 KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.COORDINATOR_LOAD_IN_PROGRESS):
        assert not KafkaError(code).retriable(), "librdkafka's own flag does not say it"
        assert settling(KafkaError(code)), KafkaError(code).str()
    assert settling(KafkaError(KafkaError._TRANSPORT, retriable=True))


def test_an_error_that_will_not_pass_by_itself_is_reported():
    for code in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
                 KafkaError.INVALID_REQUEST):
        assert not settling(KafkaError(code)), KafkaError(code).str()
