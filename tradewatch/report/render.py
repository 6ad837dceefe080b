"""A report's sections as Markdown and as one self-contained HTML file, written atomically, and the
`index.html` that lists every report of a folder."""
from __future__ import annotations

import html
import os
from datetime import datetime, timezone
from pathlib import Path

from tradewatch.report import Report, Section, sections, whole_period

STYLE = """body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1b1b1b}h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;display:block;overflow-x:auto;max-width:100%}th,td{padding:.25em .6em;border-bottom:1px solid #eee;
text-align:right;white-space:nowrap}th:first-child,td:first-child{text-align:left}th{background:#f5f5f5}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}svg{max-width:100%;height:auto}"""


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: Report, layout: list[Section] | None = None) -> str:
    lines = [f"# {report.title}", ""]
    for title, blocks in layout or sections(report):
        lines += [f"## {title}", ""]
        for block in blocks:
            if block[0] == "p":
                lines += [block[1], ""]
            elif block[0] == "table":
                _, headers, rows = block
                lines.append("| " + " | ".join(map(_md_cell, headers)) + " |")
                lines.append("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
                lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
                lines.append("")
            elif block[0] == "svg":
                lines += [f"*Chart in the HTML report: {block[2]}.*", ""]
    return "\n".join(lines)


def html_page(report: Report, layout: list[Section] | None = None) -> str:
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(report.title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(report.title)}</h1>"]
    for title, blocks in layout or sections(report):
        parts.append(f"<section><h2>{html.escape(title)}</h2>")
        for block in blocks:
            if block[0] == "p":
                parts.append(f"<p>{html.escape(block[1])}</p>")
            elif block[0] == "table":
                _, headers, rows = block
                parts.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers)
                             + "</tr></thead><tbody>")
                parts += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows]
                parts.append("</tbody></table>")
            elif block[0] == "svg":
                parts.append(f"<figure class=chart>{block[1]}<figcaption>{html.escape(block[2])}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


STEM_FORMATS = {"day": "report-%Y-%m-%d", "hour": "report-%Y-%m-%dT%H"}


def file_stem(since: datetime, until: datetime) -> str:
    """'report-2013-10-07' (a day), 'report-2013-10-07T14' (an hour), else 'report-<since>--<until>'."""
    kind = whole_period(since, until)
    return since.strftime(STEM_FORMATS[kind]) if kind else f"report-{since:%Y%m%dT%H%M%S}--{until:%Y%m%dT%H%M%S}"


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write(report: Report, out: Path, index: bool = True) -> tuple[Path, Path]:
    """`<stem>.md` and `<stem>.html` in `out` (each appears whole or not at all), then the index
    (unless the caller writes it once after several reports)."""
    out.mkdir(parents=True, exist_ok=True)
    layout = sections(report)
    stem = file_stem(report.since, report.until)
    md, page = out / f"{stem}.md", out / f"{stem}.html"
    _atomic_write(md, markdown(report, layout))
    _atomic_write(page, html_page(report, layout))
    if index:
        write_index(out)
    return md, page


def write_index(out: Path) -> Path:
    reports = sorted(out.glob("report-*.html"), reverse=True)
    rows = "".join(f"<li><a href=\"{html.escape(p.name)}\">{html.escape(p.stem[7:])}</a>"
                   f" (<a href=\"{html.escape(p.stem)}.md\">Markdown</a>)</li>" for p in reports)
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    index = out / "index.html"
    _atomic_write(index, f"<!doctype html><html lang=en><head><meta charset=utf-8><title>TradeWatch reports</title>"
                         f"<style>{STYLE}</style></head><body><h1>TradeWatch reports</h1><p>{len(reports)} reports,"
                         f" newest first (updated {made}).</p><ul>{rows}</ul></body></html>")
    return index
