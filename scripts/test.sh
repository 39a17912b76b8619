#!/usr/bin/env bash
# Sets up a fresh Debian 12 host (as root) and runs every check: ruff, mypy, the README's main job, then pytest
# (VM tests included) on the host state that job leaves behind.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"
ruff check src tests bench
ruff format --check src tests bench
echo "== mypy"
mypy
echo "== main job (README), so that the tests run on a host where it ran (issue 9: ip_forward, bridge, state)"
scripts/setup.sh
banger vm run --rm --no-workspace -- uname -a
banger daemon stop
echo "== pytest"
set +e
pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass.
if [ "$rc" = 5 ]; then
  echo "test: pytest collected no tests" >&2
fi
exit "$rc"
