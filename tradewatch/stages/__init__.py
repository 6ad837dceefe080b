"""The Kafka-reading stages, one module each, named like the scripts that run them (consumer.py,
aggregator.py, anomaly_detector.py run): what each decodes, folds and writes. The loop, commits
and rebalances are tradewatch/runtime.py's."""
