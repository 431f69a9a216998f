"""The page `dvc plots show` fills, with Vega, Vega-Lite and vega-embed inlined: plots draw offline.

DVC's own page loads the three libraries from a CDN and stays blank without a network. `.dvc/config`
(`plots.html_template`) names this page instead; `make setup` writes it (`python -m pipeline.plots_page`) from
the JavaScript that the vl-convert-python package ships, so nothing is fetched when the plots are shown.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.io import write_text

# DVC replaces {plot_divs} (one <div> per plot whose inline script calls vegaEmbed) and {refresh_tag}. The page
# has no {scripts}: that is where DVC would put its CDN <script src> tags.
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- @VERSIONS@ -->
    <script type="text/javascript">
@BUNDLE@
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")


def vega_lite_version(available: list[str]) -> str | None:
    """The newest Vega-Lite 5 (the `$schema` of DVC's plot templates) among `available`; None: the default."""
    fives = [v for v in available if v.split(".")[0] == "5"]
    return max(fives, key=lambda v: tuple(int(x) for x in v.split("."))) if fives else None


def page(bundle: str, versions: str) -> str:
    """The HTML template around a JavaScript bundle that defines window.vega, vegaLite and vegaEmbed."""
    for placeholder in DVC_PLACEHOLDERS:  # DVC would fill it inside the script, breaking it
        if placeholder in bundle:
            raise ValueError(f"the Vega bundle contains DVC's placeholder {placeholder}")
    # "</script" inside the script would end it early; "<\/script" means the same to JavaScript
    return PAGE.replace("@VERSIONS@", versions).replace("@BUNDLE@", bundle.replace("</script", "<\\/script"))


def bundled_page() -> tuple[str, str]:
    """The page with vl-convert-python's bundle of Vega, Vega-Lite and vega-embed, and their versions."""
    import vl_convert

    vl = vega_lite_version(vl_convert.get_vegalite_versions())
    versions = (f"Vega {vl_convert.get_vega_version()}, Vega-Lite {vl or 'default'}, vega-embed "
                f"{vl_convert.get_vega_embed_version()}: inlined from vl-convert-python")
    return page(vl_convert.javascript_bundle(vl_version=vl), versions), versions


def template_path(repo_dir: Path) -> Path:
    """Where `.dvc/config` (plots.html_template) tells `dvc plots show` its page is, resolved as DVC does."""
    from dvc.repo import Repo

    with Repo(str(repo_dir)) as repo:
        name = repo.config.get("plots", {}).get("html_template")
        if not name:
            raise ValueError(f"{repo.dvc_dir}/config: no plots.html_template to write the page to")
        return Path(repo.dvc_dir, name)  # a relative name is relative to .dvc/; an absolute one stays


def main() -> None:
    """Write the page where the DVC repository in the current directory looks for it."""
    path = template_path(Path.cwd())
    html, versions = bundled_page()
    write_text(path, html)
    print(f"dvc plots page: {path} ({len(html) / 1e6:.1f} MB; {versions})")


if __name__ == "__main__":
    from pipeline.errors import run_entry

    run_entry(main)  # a missing setting or an unwritable folder: one line, exit 1
