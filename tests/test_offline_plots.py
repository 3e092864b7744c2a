"""The offline plots page inlines Vega from exactly locked packages, past Vega's XSS advisories.
(That the page renders every plot: test_pipeline.check_plots_render, in headless Chromium.)"""

import json
import re

import pytest

from helpers import ROOT

PLOTS = ROOT / "plots"


def version(text):
    return tuple(int(part) for part in text.split("."))


def test_vega_is_locked_with_hashes_and_past_the_advisories():
    declared = json.loads((PLOTS / "package.json").read_text())["dependencies"]
    lock = json.loads((PLOTS / "package-lock.json").read_text())
    assert lock["lockfileVersion"] == 3
    packages = lock["packages"]
    assert packages[""]["dependencies"] == declared
    for name, wanted in declared.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", wanted), f"{name}: pin an exact version, not {wanted}"
        assert packages[f"node_modules/{name}"]["version"] == wanted
    unhashed = [name for name, entry in packages.items() if name and not entry.get("integrity", "").startswith("sha512-")]
    assert not unhashed, f"locked without a sha512 integrity hash: {unhashed}"
    # GHSA-7f2v-3qq3-vvjf (CVE-2025-59840): fixed in vega 6.2.0 / vega-expression 6.1.0; earlier XSS advisories
    # (GHSA-w5m3-xh75-mp55 and others) in 5.x releases before that.
    assert version(packages["node_modules/vega"]["version"]) >= (6, 2, 0)
    assert version(packages["node_modules/vega-expression"]["version"]) >= (6, 1, 0)


def test_offline_page_inlines_the_locked_vega():
    page = PLOTS / "offline.html"
    if not page.is_file():
        pytest.skip("plots/offline.html not built (setup.sh builds it where npm is installed)")
    locked = json.loads((PLOTS / "package-lock.json").read_text())["packages"]["node_modules/vega"]["version"]
    assert f'version="{locked}"' in page.read_text(), "plots/offline.html is older than the lock: python plots/offline_template.py"
