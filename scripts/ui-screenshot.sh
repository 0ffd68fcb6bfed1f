#!/usr/bin/env bash
# Refresh docs/images/ui.png, the README's picture of the operator page /ui, from the page as it
# really is: run the one browser test that signs in to /ui after real scans of loopback (a diff,
# a schedule, a running scan, a hostile banner) and copy the screenshot it takes; and
# docs/images/ui-approvals.png (docs/ui.md) from the test in which an approver decides there. Installs
# chromium and chromium-driver when missing (as root; otherwise says what to install), like
# test.sh. Rerun it after changing the page (dashboard.py, dashboard_assets/) and commit the image.
# Usage: scripts/ui-screenshot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

tests=(tests/test_dashboard.py::test_the_page_in_a_browser_shows_tasks_ports_pools_progress_and_a_diff
       tests/test_dashboard.py::test_an_approver_approves_and_denies_in_the_page_and_each_decision_is_audited_as_theirs)
# Each screenshot a test takes, and the image it becomes.
declare -A images=([tests/artifacts/dashboard.png]=docs/images/ui.png
                   [tests/artifacts/dashboard-approvals.png]=docs/images/ui-approvals.png)

require_packages python nmap sandbox chromium
ensure_venv requirements-dev.txt
# A screenshot left by an earlier run must never pass for this one's.
rm -f "${!images[@]}"
.venv/bin/python -m pytest -q -n 0 -p no:cacheprovider "${tests[@]}"
for screenshot in "${!images[@]}"; do
  cp "$screenshot" "${images[$screenshot]}"
  echo "${images[$screenshot]} refreshed from $screenshot" >&2
done
