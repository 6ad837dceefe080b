from tradewatch.formatting import compact, exact


def test_exact_keeps_every_digit_and_separates_thousands():
    assert exact(95002.79) == "95,002.79"
    assert exact(230.1) == "230.10"
    assert exact(0.00012345) == "0.00012345"
    assert exact(1234567.125, min_decimals=0) == "1,234,567.125"
    assert exact(100.0, min_decimals=0) == "100"
    assert exact(None) == "—"


def test_compact_units():
    assert compact(95_752_123.4, "$") == "$95.75M"
    assert compact(1_500, "$") == "$1.50K"
    assert compact(2.5e9) == "2.50B"
    assert compact(999) == "999"
    assert compact(-3_000_000) == "-3.00M"
