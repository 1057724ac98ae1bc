#!/usr/bin/env bash
# Render RUN_DIR/samples.html in headless Chromium and save RUN_DIR/samples.png: proof the page
# draws. Needs Chromium (Debian: apt-get install -y chromium). Not part of the default tests.
#   bash bench/screenshot_samples.sh RUN_DIR
set -euo pipefail
run_dir=$(cd "$1" && pwd)
python "$(dirname "$0")/render_samples.py" "$run_dir"
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome) \
  || { echo "no Chromium: apt-get install -y chromium" >&2; exit 1; }
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,1600 \
  --screenshot="$run_dir/samples.png" "file://$run_dir/samples.html" 2>/dev/null
ls -l "$run_dir/samples.png"
