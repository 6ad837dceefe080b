"""Report periods and file names, and the layout's two renderings agreeing (no database)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd

from tradewatch.report import Report, period_name, sections
from tradewatch.report.render import file_stem, html_page, markdown
from tradewatch.report.schedule import floor

DAY = datetime(2013, 10, 7, tzinfo=timezone.utc)


def test_periods_and_file_names():
    assert (period_name(DAY, DAY + timedelta(days=1)), file_stem(DAY, DAY + timedelta(days=1))) == \
        ("2013-10-07", "report-2013-10-07")
    hour = DAY.replace(hour=14)
    assert (period_name(hour, hour + timedelta(hours=1)), file_stem(hour, hour + timedelta(hours=1))) == \
        ("2013-10-07 14:00", "report-2013-10-07T14")
    odd = DAY.replace(hour=13, minute=30)
    assert file_stem(odd, odd + timedelta(hours=1)) == "report-20131007T133000--20131007T143000"
    assert "→" in period_name(odd, odd + timedelta(hours=1))
    assert floor(DAY.replace(hour=14, minute=59, second=59), timedelta(hours=1)) == DAY.replace(hour=14)
    assert floor(DAY.replace(hour=23), timedelta(days=1)) == DAY


def test_an_empty_report_says_so_in_both_files():
    report = Report(DAY, DAY + timedelta(days=1), None, "USD", 1, pd.DataFrame())
    layout = sections(report)
    assert "There were no trades in this period." in markdown(report, layout)
    page = html_page(report, layout)
    assert "There were no trades in this period." in page and "<script" not in page and "http" not in page
