"""Write the HTML template that makes `dvc plots show` render offline (`make install` runs it).

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so its plots stay blank on a
machine without network. This writes `.dvc/plots_offline.html` (named by `plots.html_template`
in .dvc/config) with those libraries inlined, bundled by vl-convert-python from its own copy:
no network at build time or view time.

    python scripts/offline_plots.py && dvc plots show    # -> dvc_plots/index.html
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE = Path(".dvc/plots_offline.html")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots</title>
    <script>
BUNDLE
    </script>
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main() -> None:
    import vl_convert

    # The default bundle puts vegaEmbed, vegaLite and vega on `window`, which is what DVC's
    # plot divs call. No {scripts} placeholder: DVC's CDN script tags are left out.
    bundle = vl_convert.javascript_bundle()
    TEMPLATE.write_text(PAGE.replace("BUNDLE", bundle), encoding="utf-8")
    print(f"{TEMPLATE}: offline plot template written ({len(bundle) / 1e6:.1f} MB of Vega)")


if __name__ == "__main__":
    main()
