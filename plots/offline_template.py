"""Write plots/offline.html: DVC's plots page with Vega, Vega-Lite and Vega-Embed inlined, so that
`dvc plots show --html-template plots/offline.html` makes a page that renders with no network (DVC's
own page loads them from a CDN).

    python plots/offline_template.py            # npm installs the three packages into .venv/vega first

The versions are those DVC's page asks for (vega-lite 5.2.0 wants vega >= 5.21).
"""

import argparse
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"vega": "5.21.0", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>qlora-pipeline plots</title>
%s
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


def main(prefix: Path, out: Path) -> None:
    if not all((prefix / "node_modules" / name / "build" / f"{name}.min.js").is_file() for name in PACKAGES):
        if shutil.which("npm") is None:
            raise SystemExit("error: npm not found: it installs Vega for the offline plots page (apt-get install npm)")
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--silent",
                        *(f"{name}@{version}" for name, version in PACKAGES.items())], check=True)
    scripts = "\n".join(
        f'    <script type="text/javascript">\n{(prefix / "node_modules" / name / "build" / f"{name}.min.js").read_text()}\n    </script>'
        for name in PACKAGES
    )
    out.write_text(PAGE % scripts)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}: dvc plots show --html-template {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=Path, default=ROOT / ".venv" / "vega", help="where npm installs the packages")
    parser.add_argument("--out", type=Path, default=ROOT / "plots" / "offline.html")
    args = parser.parse_args()
    main(args.prefix, args.out)
