#!/usr/bin/env bash
# The page's end-to-end test: builds the conformance and benchmark page
# (scripts/web.sh), serves it on 127.0.0.1, drives it in headless Chromium
# (scripts/web-e2e, puppeteer-core from npm, installed with `npm ci` when
# missing), checks that every conformance row passes, and that the bench
# JSON the page saves goes through `wgpu-batchnorm report`. The page runs
# its quick benchmark (`?quick`) here. Outputs in target/web-e2e: the JSON,
# the report and a screenshot of the page.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/web-e2e
rm -rf "$out" && mkdir -p "$out"
scripts/web.sh --build-only
[ -e scripts/web-e2e/node_modules/puppeteer-core/package.json ] ||
  (cd scripts/web-e2e && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory web >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
  sleep 0.2
done
node scripts/web-e2e/e2e.mjs "http://127.0.0.1:$port/?quick" "$out"
cargo run -q -p wgpu-batchnorm-cli -- report "$out/bench.json" --markdown "$out/report.md" --svg "$out/report.svg"
echo "test-page: the page's JSON goes through report ($out/report.md)"
