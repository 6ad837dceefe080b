"""flink_job.py fills flink_job.sql with the settings and splits it into statements. A generated
PostgreSQL password is `secrets.token_urlsafe` text: it may hold `--` (about one stack in 130),
and a password set by hand may hold a quote or a semicolon. The statements must keep every value
whole; a comment outside the literals must still go."""
from __future__ import annotations

import re

import pytest

from flink_job import render, statements
from tradewatch.config import Settings

PASSWORDS = ["Ab--cd_-Ef", "a'b", "x;y", "--", "it's -- a ';' test"]


def literal(statement: str, key: str) -> str:
    """The value of `'key' = '…'` in a WITH clause, its doubled quotes undone."""
    match = re.search(r"'" + re.escape(key) + r"'\s*=\s*'((?:[^']|'')*)'", statement)
    assert match, statement
    return match.group(1).replace("''", "'")


@pytest.mark.parametrize("password", PASSWORDS)
def test_every_value_stays_whole_in_its_statement(password):
    found = statements(render(Settings(postgres_password=password, flink_group="g--1")))
    sink = next(s for s in found if s.startswith("CREATE TABLE flink_metrics_sink"))
    source = next(s for s in found if s.startswith("CREATE TABLE trades_source"))
    assert literal(sink, "password") == password
    assert literal(sink, "sink.buffer-flush.max-rows") == "1000"
    assert literal(source, "properties.group.id") == "g--1"
    # the same statements whatever the password: it never ends one or starts a comment
    assert [s.split("(")[0] for s in found] == \
        [s.split("(")[0] for s in statements(render(Settings(postgres_password="plain")))]


def test_comments_go_and_statements_are_split_outside_literals():
    sql = ("-- a heading\nSET 'a' = 'x -- y';  -- a note\nCREATE TABLE t (\n  c STRING  -- why\n)"
           " WITH ('k' = 'v;w', `col--x` = 'it''s');\n-- the end\n")
    assert statements(sql) == ["SET 'a' = 'x -- y'", "CREATE TABLE t (\n  c STRING  \n) WITH ('k' = 'v;w', "
                               "`col--x` = 'it''s')"]
