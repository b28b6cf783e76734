#!/usr/bin/env bash
# Creates .venv in the repository and installs everything focal_det2 needs, idempotently:
# a second run returns in seconds when requirements.txt, setup.py and this script are unchanged.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.focal_det2_setup"

die() {
    echo "focal_det2 setup: ERROR: $*" >&2
    exit 1
}

command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; install Python 3.10-3.12 or set PYTHON=/path/to/python3"
"$PYTHON" - <<'PY' || die "unsupported Python $("$PYTHON" -c 'import platform; print(platform.python_version())'): focal_det2 needs Python 3.10-3.12 (torch 2.14.1 and the Detectron2 wheel)"
import sys
sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)
PY

want="$(cat "$ROOT/requirements.txt" "$ROOT/setup.py" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"

# One set-up at a time: the demo and the tests may be started together on a fresh clone.
mkdir -p "$VENV"
exec 9>"$VENV/.setup.lock"
flock 9

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi

echo "focal_det2 setup: installing into $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || die "could not create $VENV (is the venv module installed? Debian: apt-get install python3-venv)"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
LOG="$VENV/setup.log"

pip_or_die() {
    local what="$1"
    shift
    if ! "${PIP[@]}" install "$@" >"$LOG" 2>&1; then
        tail -n 5 "$LOG" >&2
        die "could not install $what (full pip output: $LOG)"
    fi
}

pip_or_die "the pinned requirements (requirements.txt)" -r "$ROOT/requirements.txt"

# Detectron2 has no PyPI release under its own name. A Detectron2 already importable here (a
# user's own build, pip-installed into .venv) is kept; otherwise install the pure-Python wheel of
# upstream Detectron2 (built for CPython 3.10; its Python code runs on newer versions) without
# its compiled extension, which focal_det2 never needs.
if ! "$VENV/bin/python" -c "import detectron2" >/dev/null 2>&1; then
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    pip_or_die "Detectron2 (sal-detectron2==0.7.2)" --no-deps --only-binary=:all: \
        --python-version 3.10 --upgrade --target "$site" sal-detectron2==0.7.2
fi

pip_or_die "focal_det2 itself (editable)" --no-deps --no-build-isolation -e "$ROOT"

"$VENV/bin/python" -c "import focal_det2" >"$LOG" 2>&1 || {
    tail -n 5 "$LOG" >&2
    die "installed, but 'import focal_det2' fails (see $LOG)"
}
echo "$want" >"$STAMP"
echo "focal_det2 setup: done"
