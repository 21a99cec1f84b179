#!/usr/bin/env bash
# Render a flatscope HTML report (e.g. report/index.html from `flatscope compare`) in headless Chromium
# and save a full-page screenshot, to check that the self-contained page displays offline.
#
# Usage: scripts/render_report.sh report/index.html [screenshot.png] [WIDTHxHEIGHT]
# Needs Chromium (Debian: apt-get update && apt-get install -y chromium). Exit 0 when the screenshot was
# written, 2 on bad usage, 3 when no Chromium is installed. Networking is disabled for the render, so a
# page that needed anything from outside would show up broken in the screenshot.
set -euo pipefail
if [[ $# -lt 1 || $# -gt 3 ]]; then
  echo "usage: $0 REPORT.html [SCREENSHOT.png] [WIDTHxHEIGHT]" >&2
  exit 2
fi
html=$(realpath "$1")
out=${2:-${html%.html}.png}
size=${3:-1280x4000}
if [[ ! -f "$html" ]]; then
  echo "error: $1 not found" >&2
  exit 2
fi
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$browser" ]]; then
  echo "error: no chromium found (apt-get install -y chromium)" >&2
  exit 3
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
rm -f "$out"
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --proxy-server="127.0.0.1:9" --proxy-bypass-list="<-loopback>" \
  --window-size="${size/x/,}" --screenshot="$(realpath -m "$out")" "file://$html" >/dev/null 2>&1 || true
if [[ ! -s "$out" ]]; then
  echo "error: chromium wrote no screenshot for $html" >&2
  exit 1
fi
echo "$out"
