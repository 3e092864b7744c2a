"""Write plots/offline.html: DVC's plots page with Vega, Vega-Lite and Vega-Embed inlined, so that
`dvc plots show --html-template plots/offline.html` makes a page that renders with no network (DVC's
own page loads them from a CDN).

    python plots/offline_template.py            # npm installs the three packages into .venv/vega first

The versions are pinned in plots/package.json, and every package npm installs with them in
plots/package-lock.json (integrity hashes): `npm ci --ignore-scripts` installs exactly those and runs none
of their install scripts. They are newer than the Vega 5.20 that DVC's own page loads, which has
cross-site-scripting advisories fixed since; to update: bump plots/package.json, then
`npm install --package-lock-only --ignore-scripts` in plots/, and rerun the plots render test.
"""

import argparse
import filecmp
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
PACKAGES = ("vega", "vega-lite", "vega-embed")  # in the order the page loads them: each needs the one before

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
    lock = prefix / "package-lock.json"
    if not (lock.is_file() and filecmp.cmp(lock, HERE / "package-lock.json", shallow=False)):
        if shutil.which("npm") is None:
            raise SystemExit("error: npm not found: it installs Vega for the offline plots page (apt-get install npm)")
        prefix.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(HERE / name, prefix / name)
        # ci: exactly the locked versions, checked against their hashes; no install scripts run.
        try:
            subprocess.run(["npm", "ci", "--prefix", str(prefix), "--ignore-scripts", "--no-audit", "--no-fund",
                            "--loglevel=error"], check=True)
        except BaseException:
            lock.unlink()  # the copied lock marks a finished install
            raise
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
