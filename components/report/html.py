"""An ``InspectionPage`` as one static HTML file: inline CSS, no script, no external
resource; every text escaped, every picture a relative link (percent-encoded)."""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from components.report.page import Card, Figure, Gallery, InspectionPage, Picture, Table

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5em 2em; color: #1b1b1b;
       background: #fafafa; }
h1 { font-size: 1.5em; margin: 0.8em 0 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.3em; }
nav a { margin-right: 1em; }
.summary { color: #444; }
.note { color: #555; font-size: 0.9em; max-width: 70em; margin: 0.2em 0 0.5em; }
table { border-collapse: collapse; margin: 0.3em 0 0.8em; background: #fff; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.versions { display: grid; grid-template-columns: max-content auto; gap: 0.1em 1em; }
dl.versions dt { font-weight: 600; }
dl.versions dd { margin: 0; font-family: ui-monospace, monospace; word-break: break-all; }
figure.plot { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figure.plot img { max-width: 100%; border: 1px solid #ddd; background: #fff; }
.cards { display: flex; flex-wrap: wrap; gap: 0.6em; }
.card { background: #fff; border: 2px solid #ccc; border-radius: 4px; padding: 0.3em;
        width: 262px; }
.card img { width: 128px; height: 128px; image-rendering: pixelated; object-fit: contain;
            background: #000; }
.card .name { font-family: ui-monospace, monospace; font-size: 0.8em; word-break: break-all; }
.card.fp, .card.fn { border-color: #d33; }
.card.tp, .card.flagged { border-color: #e90; }
.card.tn, .card.passed { border-color: #8b8; }
.verdict { font-weight: 600; }
"""


def _text(value: object) -> str:
    return escape(str(value), quote=True)


def _src(picture: Picture) -> str:
    return _text(quote(picture.src, safe="/"))


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _table(table: Table, level: int = 3) -> str:
    head = "".join(f"<th>{_text(h)}</th>" for h in table.header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_text(c)}</td>' if _is_number(c) else
                         f"<td>{_text(c)}</td>" for c in row) + "</tr>"
        for row in table.rows
    )
    note = f'<p class="note">{_text(table.note)}</p>' if table.note else ""
    return (f"<h{level}>{_text(table.title)}</h{level}>{note}"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _figure(figure: Figure) -> str:
    return (f'<figure class="plot"><img src="{_src(figure.picture)}" '
            f'alt="{_text(figure.picture.alt)}"><figcaption class="note">'
            f"{_text(figure.caption)}</figcaption></figure>")


def _card(card: Card, key: str) -> str:
    pictures = "".join(f'<img src="{_src(p)}" alt="{_text(p.alt)}" width="128" height="128">'
                       for p in card.pictures)
    lines = [f'<div class="name" title="{_text(card.name)}">{_text(card.name)}</div>']
    if card.label is not None:
        lines.append(f"<div>label: {_text(card.label)}</div>")
    lines.append(f"<div>score {card.score:.3f} (raw {card.raw_score:.4g}) · "
                 f"{'flagged' if card.flagged else 'not flagged'}</div>")
    if card.verdict:
        lines.append(f'<div class="verdict">{_text(card.verdict)}</div>')
    return f'<div class="card {_text(key)}">{pictures}{"".join(lines)}</div>'


def _gallery(gallery: Gallery) -> str:
    shown = len(gallery.cards)
    count = (f"{gallery.total} image{'s' if gallery.total != 1 else ''}" if shown == gallery.total
             else f"the {shown} highest-scoring of {gallery.total} images")
    note = f"{gallery.note} ({count})" if gallery.note else count
    cards = "".join(_card(c, gallery.key) for c in gallery.cards)
    return (f'<h3 id="{_text(gallery.key)}">{_text(gallery.title)}</h3>'
            f'<p class="note">{_text(note)}</p><div class="cards">{cards}</div>')


def render(page: InspectionPage) -> str:
    """The page as an HTML document (UTF-8 text)."""
    versions = "".join(f"<dt>{_text(k)}</dt><dd>{_text(v)}</dd>" for k, v in page.versions)
    sections = [("versions", "Model and data", f'<dl class="versions">{versions}</dl>')]
    if page.tables:
        sections.append(("metrics", "Metrics", "".join(_table(t) for t in page.tables)))
    if page.figures:
        sections.append(("figures", "Scores", "".join(_figure(f) for f in page.figures)))
    if page.type_tables:
        sections.append(("types", "Per defect type", "".join(_table(t) for t in page.type_tables)))
    if page.galleries:
        sections.append(("images", "Images, sorted by score",
                         "".join(_gallery(g) for g in page.galleries)))
    nav = "".join(f'<a href="#{key}">{_text(title)}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{_text(title)}</h2>{html}</section>'
                   for key, title, html in sections)
    notes = "".join(f'<p class="note">{_text(n)}</p>' for n in page.notes)
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="icon" href="data:,">'  # no favicon request: nothing fails to load
            f"<title>{_text(page.title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_text(page.title)}</h1><p class=\"summary\">{_text(page.summary)}</p>"
            f"{notes}<nav>{nav}</nav>{body}</body></html>\n")
