"""What an inspection page shows, as plain data: text already formatted, pictures as paths
relative to the page. ``components.report.html`` turns it into HTML."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Picture:
    """An image beside the page (``src`` relative to index.html)."""

    src: str
    alt: str


@dataclass(frozen=True)
class Figure:
    """A plot with its caption."""

    picture: Picture
    caption: str


@dataclass(frozen=True)
class Table:
    """A titled table; ``note`` says what produced the figures (the protocol label)."""

    title: str
    note: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Card:
    """One scored image: its pictures and what the detector said about it."""

    name: str
    score: float  # normalised (validation min-max)
    raw_score: float
    flagged: bool
    pictures: tuple[Picture, ...]
    label: str | None = None  # the true label, when known
    verdict: str | None = None  # e.g. "false positive", when the truth is known


@dataclass(frozen=True)
class Gallery:
    """A group of cards, highest score first; ``total`` counts the group's images, of
    which the first ``len(cards)`` are shown."""

    key: str  # css class and anchor: fp, fn, tp, tn, flagged, passed
    title: str
    note: str
    cards: tuple[Card, ...]
    total: int


@dataclass(frozen=True)
class InspectionPage:
    """Everything ``render`` draws, in page order."""

    title: str
    summary: str
    versions: tuple[tuple[str, str], ...]
    tables: tuple[Table, ...] = ()
    figures: tuple[Figure, ...] = ()
    type_tables: tuple[Table, ...] = ()
    galleries: tuple[Gallery, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
