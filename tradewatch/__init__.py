"""TradeWatch: real-time market-trade surveillance on Kafka, PostgreSQL and Flink."""
