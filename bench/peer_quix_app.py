"""The peer in bench/peer.py: a quix-streams application that stores a Kafka topic of JSON trades
in PostgreSQL with quix-streams' own PostgreSQLSink, default settings. Runs in the bench-only venv
that peer.py creates (.tradewatch/bench/quix-venv); never imported by TradeWatch."""
import os
import sys

from quixstreams import Application
from quixstreams.sinks.community.postgresql import PostgreSQLSink

broker, topic, group, host, port, dbname, user, table = sys.argv[1:]
password = os.environ["PGPASSWORD"]          # from the environment: a command line is visible in ps
app = Application(broker_address=broker, consumer_group=group, auto_offset_reset="earliest")
stream = app.dataframe(app.topic(topic, value_deserializer="json"))
stream.sink(PostgreSQLSink(host=host, port=int(port), dbname=dbname, user=user, password=password,
                           table_name=table, schema_auto_update=True))
app.run()
