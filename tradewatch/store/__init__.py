"""PostgreSQL: the schema (schema.sql), connections (db.py), writes (writer.py), reads (queries.py)."""
