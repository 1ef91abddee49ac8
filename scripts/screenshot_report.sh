#!/usr/bin/env bash
# Open a fedtide report in headless Chromium (Debian package `chromium`) and save a screenshot:
#   scripts/screenshot_report.sh runs/privacy_utility/report.html docs/report-screenshot.png [WIDTH,HEIGHT]
# The report needs no network: everything it shows is inside the HTML file.
set -euo pipefail
report=${1:?usage: scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]}
out=${2:?usage: scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]}
size=${3:-1280,2400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "no Chromium found: apt-get install -y chromium" >&2
  exit 1
fi
# --no-sandbox: Chromium refuses to run as root otherwise (containers, CI).
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
  --window-size="$size" --screenshot="$(realpath -m "$out")" "file://$(realpath "$report")" 2>/dev/null
test -s "$out"
echo "screenshot: $out"
