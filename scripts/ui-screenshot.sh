#!/usr/bin/env bash
# Refresh docs/images/ui.png, the README's picture of the operator page /ui, from the page as it
# really is: run the one browser test that signs in to /ui after real scans of loopback (a diff,
# a schedule, a running scan, a hostile banner) and copy the screenshot it takes. Installs
# chromium and chromium-driver when missing (as root; otherwise says what to install), like
# test.sh. Rerun it after changing the page (dashboard.py, dashboard_assets/) and commit the image.
# Usage: scripts/ui-screenshot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

test_name="tests/test_dashboard.py::test_the_page_in_a_browser_shows_tasks_ports_pools_progress_and_a_diff"
screenshot=tests/artifacts/dashboard.png

require_packages python nmap sandbox chromium
ensure_venv requirements-dev.txt
# A screenshot left by an earlier run must never pass for this one's.
rm -f "$screenshot"
.venv/bin/python -m pytest -q -n 0 -p no:cacheprovider "$test_name"
cp "$screenshot" docs/images/ui.png
echo "docs/images/ui.png refreshed from $screenshot" >&2
