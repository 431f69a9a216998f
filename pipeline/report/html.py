"""The report as one self-contained HTML page (images as data URIs, inline CSS, no scripts).

Rendered with jinja2 with autoescaping on: every caption, word and sample is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jinja2

from pipeline.report.blocks import Section

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em 2em; color: #222; }
nav a { margin-right: 1em; }
section { border-top: 1px solid #ccc; margin-top: 1.5em; }
section.missing h2 { color: #888; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
caption { text-align: left; font-weight: 600; padding: 0.3em 0; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
section#metrics table { display: inline-table; vertical-align: top; margin-right: 1.5em; }
figure { margin: 0.8em 0; }
figure img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; }
p.note { background: #fff6d5; border-left: 4px solid #e0b000; padding: 0.4em 0.8em; }
div.example { display: flex; gap: 1.2em; align-items: flex-start; margin: 1em 0; flex-wrap: wrap; }
div.example figure { margin: 0; }
p.generated { font-size: 1.1em; margin: 0.2em 0; }
ul.references { margin: 0.2em 0; padding-left: 1.2em; color: #444; }
pre.sample { background: #f6f6f6; padding: 0.6em; white-space: pre-wrap; max-width: 100%; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<nav>{% for s in sections %}<a href="#{{ s.id }}">{{ s.title }}</a>{% endfor %}</nav>
{% for s in sections %}
<section id="{{ s.id }}"{% if s.missing %} class="missing"{% endif %}>
<h2>{{ s.title }}</h2>
{% for b in s.blocks %}
{% if b.kind == "figure" %}
<figure><img src="{{ b.data_uri }}" alt="{{ b.caption }}"><figcaption>{{ b.caption }}</figcaption></figure>
{% elif b.kind == "table" %}
<table><caption>{{ b.caption }}</caption>
<thead><tr>{% for c in b.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in b.rows %}<tr>
{%- for v in row %}<td{% if v is number %} class="num"{% endif %}>{{ v | fmt }}</td>{% endfor -%}
</tr>{% endfor %}</tbody>
</table>
{% elif b.kind == "text" %}
<p{% if b.note %} class="note"{% endif %}>{{ b.text }}</p>
{% elif b.kind == "example" %}
<div class="example">
<figure><img src="{{ b.image.data_uri }}" alt="{{ b.image.caption }}"><figcaption>{{ b.title }}</figcaption></figure>
<div>
<p class="generated"><strong>generated:</strong> {{ b.generated }}</p>
<strong>references:</strong>
<ul class="references">{% for r in b.references %}<li>{{ r }}</li>{% endfor %}</ul>
{% if b.attention %}<figure><img src="{{ b.attention.data_uri }}" alt="{{ b.attention.caption }}">
<figcaption>{{ b.attention.caption }}</figcaption></figure>{% endif %}
</div>
</div>
{% elif b.kind == "sample" %}
<h3>{{ b.label }}</h3>
<pre class="sample">{{ b.text }}</pre>
{% endif %}
{% endfor %}
</section>
{% endfor %}
</body>
</html>
"""


def fmt(value: Any) -> str:
    """A table cell: 4 significant digits for floats, integers as they are, None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["fmt"] = fmt
    return env


def render(sections: Sequence[Section], title: str = "capline report") -> str:
    """The whole page; the same sections give the same text."""
    return _environment().from_string(TEMPLATE).render(title=title, sections=list(sections))
