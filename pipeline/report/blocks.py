"""What a report is made of: sections holding figures, tables, text, captioned examples and samples.

Plain data only (PNG bytes, strings, numbers): the HTML template escapes every string it is given.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any


@dataclasses.dataclass
class Figure:
    """A PNG image with a caption (its alt text too)."""

    caption: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    kind = "figure"


@dataclasses.dataclass
class Table:
    """Rows of cells under a header; numbers are formatted by the template."""

    caption: str
    columns: list[str]
    rows: list[list[Any]]

    kind = "table"


@dataclasses.dataclass
class Text:
    """A paragraph of plain text (a note, or why a part is missing)."""

    text: str
    note: bool = False  # shown as a notice: something the reader should act on

    kind = "text"


@dataclasses.dataclass
class Example:
    """One test image: its generated caption beside the references, and an attention strip if any."""

    title: str
    image: Figure
    generated: str
    references: list[str]
    attention: Figure | None = None

    kind = "example"


@dataclasses.dataclass
class Sample:
    """Generated text under a label (e.g. one temperature)."""

    label: str
    text: str

    kind = "sample"


Block = Figure | Table | Text | Example | Sample


@dataclasses.dataclass
class Section:
    """A titled part of the report with an anchor id."""

    id: str
    title: str
    blocks: list[Block] = dataclasses.field(default_factory=list)
    missing: bool = False  # nothing to show yet (the note in blocks says why)

    def figures(self) -> list[Figure]:
        """Every figure, including those inside examples."""
        out: list[Figure] = []
        for block in self.blocks:
            if isinstance(block, Figure):
                out.append(block)
            elif isinstance(block, Example):
                out.extend(f for f in (block.image, block.attention) if f is not None)
        return out


def missing(section_id: str, title: str, why: str) -> Section:
    """A section that says what is missing and how to produce it, instead of failing."""
    return Section(section_id, title, [Text(why, note=True)], missing=True)
