"""`dvc plots show` renders the learning curves that dvc.yaml declares, from evaluate@'s CSV files, offline."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.plots_page import page, template_path, vega_lite_version
from pipeline.report.browser import FLAGS, find_chromium
from tests.conftest import ROOT

FAMILIES = ("captioner", "lstm_lm", "transformer_lm")


def dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_plots_show_renders_each_models_train_and_validation_loss(trained, tmp_path):
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "metrics").mkdir()
    for family in FAMILIES:  # the CSVs evaluate@ wrote for the tiny trained models
        shutil.copy(Path(trained.paths.metrics) / f"curve_{family}.csv", tmp_path / "metrics")
    dvc(tmp_path, "git", "init", "-q")
    dvc(tmp_path, "dvc", "init", "-q")
    shown = json.loads(dvc(tmp_path, "dvc", "plots", "show", "--json"))
    assert not shown.get("errors"), shown.get("errors")
    (plot,) = shown["data"]["learning_curves"]
    assert plot["content"]["title"]["text"] == "Learning curves of the final models"
    drawn = {(v["filename::field"], float(v["epoch"]), float(v["dvc_inferred_y_value"]))
             for v in plot["content"]["data"]["values"]}
    expected = set()
    for family in FAMILIES:  # every epoch's train and validation loss of every final model
        with open(tmp_path / "metrics" / f"curve_{family}.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                expected |= {(f"curve_{family}.csv::{y}", float(row["epoch"]), float(row[y]))
                             for y in ("train_loss", "val_loss")}
    assert drawn == expected


# Shown in Chromium under a policy that lets the page fetch nothing (inline scripts only): any fetch it tries is
# refused before it leaves and recorded on <html data-blocked>. The plots must draw all the same.
WATCH = ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
         "script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src data:\">"
         "<script>document.addEventListener('securitypolicyviolation', e => document.documentElement.setAttribute("
         "'data-blocked', (document.documentElement.getAttribute('data-blocked') || '') + ' ' + e.blockedURI));"
         "</script>")


def rendered(page: Path) -> tuple[str, list[str]]:
    """The DOM of `page` once its scripts ran, in headless Chromium with no name resolving; what it tried to fetch."""
    with tempfile.TemporaryDirectory(prefix="capline-plots-") as tmp:
        watched = Path(tmp) / "index.html"
        watched.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + WATCH, 1), encoding="utf-8")
        cmd = [find_chromium(), *FLAGS, f"--user-data-dir={tmp}/profile", "--host-resolver-rules=MAP * ~NOTFOUND",
               "--virtual-time-budget=10000", "--dump-dom", watched.as_uri()]  # virtual time: vegaEmbed is async
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    blocked = re.search(r'<html[^>]*data-blocked="([^"]*)"', dom)
    return dom, blocked.group(1).split() if blocked else []


def curve_lines(dom: str, plot_id: str) -> dict[str, set[str]]:
    """The lines Vega's SVG renderer drew in the plot <div id=plot_id>: series (file::field) -> path data."""
    start = dom.find(f'<div id="{plot_id}"')
    assert start >= 0, f"no plot {plot_id} on the page"
    svg = re.search(r"<svg[^>]*class=\"marks\".*?</svg>", dom[start:], re.S)
    assert svg is not None, f"plot {plot_id} drew nothing"
    lines: dict[str, set[str]] = {}
    for label, path in re.findall(r'<path aria-label="[^"]*filename::field: ([^";]+)"[^>]*'
                                  r'aria-roledescription="line mark" d="([^"]+)"', svg.group(0)):
        lines.setdefault(label, set()).add(path)
    return lines


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_plain_plots_show_draws_offline_from_the_page_make_setup_writes(tmp_path):
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "metrics").mkdir()
    for n, family in enumerate(FAMILIES):
        rows = [f"{e},{3.0 - e / 2 - n / 10},{3.2 - e / 3 - n / 10}" for e in range(1, 5)]
        (tmp_path / "metrics" / f"curve_{family}.csv").write_text("epoch,train_loss,val_loss\n" + "\n".join(rows))
    dvc(tmp_path, "git", "init", "-q")
    dvc(tmp_path, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", tmp_path / ".dvc" / "config")  # the project's plots.html_template
    dvc(tmp_path, sys.executable, "-m", "pipeline.plots_page")  # what `make setup` runs
    assert template_path(tmp_path).is_file()
    assert f"\n{template_path(ROOT).relative_to(ROOT)}: " in (ROOT / "Makefile").read_text()  # setup writes it
    dvc(tmp_path, "dvc", "plots", "show")  # plain: no --html-template, the config names the page
    page = tmp_path / "dvc_plots" / "index.html"
    assert not re.search(r"<script[^>]*\bsrc=", page.read_text(encoding="utf-8"))
    dom, blocked = rendered(page)
    assert blocked == []
    lines = curve_lines(dom, "learning_curves")  # train and validation loss of each family, 4 epochs each
    assert set(lines) == {f"curve_{f}.csv::{y}" for f in FAMILIES for y in ("train_loss", "val_loss")}
    paths = {d for drawn in lines.values() for d in drawn}
    assert all(len(re.findall(r"[ML]", d)) == 4 for d in paths), paths
    assert len(paths) == sum(len(drawn) for drawn in lines.values())  # six different curves, not one six times

    # DVC's own page, from the same repository: its libraries come from a CDN, so offline it draws nothing
    dvc(tmp_path, "dvc", "config", "--unset", "plots.html_template")
    dvc(tmp_path, "dvc", "plots", "show", "-o", "cdn_plots")
    dom, blocked = rendered(tmp_path / "cdn_plots" / "index.html")
    assert any("cdn.jsdelivr.net" in url for url in blocked) and '<svg' not in dom[dom.find('<div id="learning'):]


def test_the_page_leaves_dvc_no_place_for_cdn_scripts_and_keeps_the_bundle_whole():
    html = page('const tag = "</script>"; window.vegaEmbed = () => 1;', "Vega test")
    assert html.count("{plot_divs}") == 1 and "{refresh_tag}" in html
    assert "{scripts}" not in html  # where DVC would put its <script src=cdn> tags
    assert 'const tag = "<\\/script>"' in html  # would otherwise end the inline script early
    with pytest.raises(ValueError, match=r"placeholder \{plot_divs\}"):
        page("x = '{plot_divs}'", "Vega test")
    # DVC's plot templates are Vega-Lite 5 specs: the newest 5.x is inlined when the package has one
    assert vega_lite_version(["5.8", "5.21", "5.9", "6.4"]) == "5.21" and vega_lite_version(["6.1"]) is None
