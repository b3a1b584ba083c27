#!/usr/bin/env bash
# Install, upgrade or remove edge-agent as a systemd service on a Jetson (JetPack 6) or any systemd Linux box.
# Idempotent: a second run changes nothing and says so. See docs/install.md.
#
# The unit (edge-agent.service) and the example config (edge-agent.toml) are taken from this script's own
# directory, not from the Python package: they describe the host, not the library, so pip never writes into
# /etc; the script needs them before the package is installed (it installs it); and the files it installs are
# the ones the tests verify. Ship deploy/jetson/ as one directory (a checkout or a release tarball).
set -eu

usage() {
    cat <<'EOF'
usage: install.sh [--root DIR] [--venv DIR] [--package SPEC] [--pip-args "ARGS"] [--python PYTHON]
                  [--upgrade | --uninstall [--purge]] [--no-start]

Installs edge-agent into a virtualenv and runs it as the systemd service edge-agent.service.

  --root DIR        install into DIR as the root of the file system (a staging image, a test); nothing is
                    started there
  --venv DIR        the virtualenv (default /opt/edgefleet/venv); made with --system-site-packages so
                    JetPack's own tensorrt and pycuda are used
  --package SPEC    what pip installs (default "edgefleet[agent]"; a version, a wheel file or a directory)
  --pip-args ARGS   more pip arguments, e.g. "--no-index --find-links /media/usb/wheels" for an offline box
  --python PYTHON   the interpreter the virtualenv is made from (default python3; JetPack 6: python3.10)
  --upgrade         pip install --upgrade the package, then restart the service; config and data are kept
  --uninstall       stop and disable the service, remove it and the virtualenv; keep /etc/edgefleet and
                    /var/lib/edgefleet (and the edgefleet user)
  --purge           with --uninstall: remove those too
  --no-start        install and enable, but do not start or restart the service
EOF
}

die() { # die CODE MESSAGE: exit 2 for bad arguments, 1 for a host that cannot be installed on
    echo "install.sh: $2" >&2
    exit "$1"
}

ARGS="$*"
ROOT=""
VENV=/opt/edgefleet/venv
PACKAGE="edgefleet[agent]"
PIP_ARGS=""
PYTHON=python3
MODE=install
PURGE=0
START=1

need_value() { [ "$#" -ge 2 ] && [ -n "$2" ] || die 2 "$1 needs a value (see --help)"; }
while [ "$#" -gt 0 ]; do
    case "$1" in
        --root) need_value "$@"; ROOT=$2; shift 2 ;;
        --venv) need_value "$@"; VENV=$2; shift 2 ;;
        --package) need_value "$@"; PACKAGE=$2; shift 2 ;;
        --pip-args) [ "$#" -ge 2 ] || die 2 "--pip-args needs a value (see --help)"; PIP_ARGS=$2; shift 2 ;;
        --python) need_value "$@"; PYTHON=$2; shift 2 ;;
        --upgrade) [ "$MODE" = install ] || die 2 "--upgrade and --uninstall exclude each other"; MODE=upgrade; shift ;;
        --uninstall) [ "$MODE" = install ] || die 2 "--upgrade and --uninstall exclude each other"; MODE=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        --no-start) START=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die 2 "unknown option: $1" ;;
    esac
done
[ "$PURGE" = 0 ] || [ "$MODE" = uninstall ] || die 2 "--purge goes with --uninstall"
case "$VENV" in
    /*) ;;
    *) die 2 "--venv must be an absolute path, not $VENV" ;;
esac
[ "$VENV" != / ] || die 2 "--venv / would be the whole file system"
if [ -n "$ROOT" ]; then
    [ -d "$ROOT" ] || die 2 "--root $ROOT is not a directory"
    ROOT=$(cd "$ROOT" && pwd -P)
    [ "$ROOT" != / ] || ROOT=""
fi

HERE=$(cd "$(dirname "$0")" && pwd -P)
UNIT_SRC=$HERE/edge-agent.service
CONFIG_SRC=$HERE/edge-agent.toml
USER_NAME=edgefleet
CONFIG_DIR=/etc/edgefleet
CONFIG=$CONFIG_DIR/edge-agent.toml
DATA_DIR=/var/lib/edgefleet
UNIT=/etc/systemd/system/edge-agent.service
LINK=/usr/local/bin/edge-agent
CHANGED=0

say() { echo "$*"; }
did() { CHANGED=1; echo "$*"; }

# --- the host --------------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die 1 "run as root: sudo $0 $ARGS"
[ -f "$UNIT_SRC" ] && [ -f "$CONFIG_SRC" ] ||
    die 1 "edge-agent.service and edge-agent.toml must be beside this script in $HERE (copy the whole deploy/jetson directory)"
command -v systemctl >/dev/null 2>&1 || die 1 "systemctl not found: this installs a systemd service; on a box without systemd run \`edge-agent run --config FILE\` under your own supervisor"
if [ -z "$ROOT" ] && [ ! -d /run/systemd/system ]; then
    die 1 "systemd is not running here (PID 1 is $(cat /proc/1/comm 2>/dev/null || echo unknown)): boot with systemd, or use --root DIR to stage an installation"
fi
SYSTEMCTL=(systemctl)
SHADOW_ROOT=()
if [ -n "$ROOT" ]; then
    SYSTEMCTL=(systemctl "--root=$ROOT")
    SHADOW_ROOT=(--root "$ROOT")
fi

# Numeric ids from the target root's own files: under --root, names resolve against the host's, not the root's.
id_of() { # id_of passwd|group NAME
    awk -F: -v n="$2" '$1 == n { print $3; found = 1 } END { exit !found }' "$ROOT/etc/$1"
}

# ensure_dir PATH MODE UID GID: make it, or fix its mode and owner when they differ
ensure_dir() {
    local path=$ROOT$1
    if [ ! -d "$path" ]; then
        install -d -m "$2" -o "$3" -g "$4" "$path"
        did "created $1 (mode $2, owner $3:$4)"
    elif [ "$(stat -c '%a %u %g' "$path")" != "${2#0} $3 $4" ]; then
        chmod "$2" "$path"
        chown "$3:$4" "$path"
        did "fixed the mode and owner of $1 ($2, $3:$4)"
    fi
}

# install_file SOURCE DEST MODE UID GID: (re)write DEST only when its content, mode or owner differ
install_file() {
    local dest=$ROOT$2
    if [ -f "$dest" ] && cmp -s "$1" "$dest" && [ "$(stat -c '%a %u %g' "$dest")" = "${3#0} $4 $5" ]; then
        return 1
    fi
    mkdir -p "$(dirname "$dest")"
    install -m "$3" -o "$4" -g "$5" "$1" "$dest.new"
    mv -f "$dest.new" "$dest"
    return 0
}

# A fingerprint of what pip installed in the venv: every distribution's RECORD lists its files' hashes.
venv_fingerprint() {
    find "$ROOT$VENV"/lib/python3*/site-packages -path '*.dist-info/RECORD' 2>/dev/null | LC_ALL=C sort |
        xargs -r cat | sha256sum | cut -d' ' -f1
}

unit_active() { [ -z "$ROOT" ] && systemctl is-active --quiet edge-agent.service; }

# --- uninstall -------------------------------------------------------------------------------------------
if [ "$MODE" = uninstall ]; then
    if [ -z "$ROOT" ] && systemctl is-active --quiet edge-agent.service; then
        systemctl stop edge-agent.service
        did "stopped edge-agent.service"
    fi
    if [ -f "$ROOT$UNIT" ]; then
        if "${SYSTEMCTL[@]}" --quiet is-enabled edge-agent.service 2>/dev/null; then
            "${SYSTEMCTL[@]}" --quiet disable edge-agent.service
            did "disabled edge-agent.service"
        fi
        rm -f "$ROOT$UNIT"
        did "removed $UNIT"
        [ -n "$ROOT" ] || systemctl daemon-reload
    fi
    if [ -L "$ROOT$LINK" ] && [ "$(readlink "$ROOT$LINK")" = "$VENV/bin/edge-agent" ]; then
        rm -f "$ROOT$LINK"
        did "removed $LINK"
    fi
    if [ -d "$ROOT$VENV" ]; then
        [ -f "$ROOT$VENV/pyvenv.cfg" ] || die 1 "$VENV has no pyvenv.cfg: not a virtualenv, left as it is"
        rm -rf "$ROOT$VENV"
        did "removed the virtualenv $VENV"
    fi
    if [ "$PURGE" = 1 ]; then
        for dir in "$CONFIG_DIR" "$DATA_DIR"; do
            if [ -e "$ROOT$dir" ]; then
                rm -rf "$ROOT$dir"
                did "removed $dir"
            fi
        done
        if id_of passwd "$USER_NAME" >/dev/null; then
            userdel "${SHADOW_ROOT[@]}" "$USER_NAME"
            did "removed the user $USER_NAME"
        fi
        if id_of group "$USER_NAME" >/dev/null; then
            groupdel "${SHADOW_ROOT[@]}" "$USER_NAME"
            did "removed the group $USER_NAME"
        fi
    else
        for dir in "$CONFIG_DIR" "$DATA_DIR"; do
            [ ! -e "$ROOT$dir" ] || say "kept $dir (--purge removes it)"
        done
    fi
    [ "$CHANGED" = 1 ] || say "nothing to do: edge-agent is not installed"
    exit 0
fi

# --- install / upgrade -----------------------------------------------------------------------------------
# The account: a system user with no login shell whose home is the data dir (CUDA's and TensorRT's caches
# under $HOME then land where the unit lets the agent write).
if ! id_of group "$USER_NAME" >/dev/null; then
    groupadd "${SHADOW_ROOT[@]}" --system "$USER_NAME"
    did "created the group $USER_NAME"
fi
if ! id_of passwd "$USER_NAME" >/dev/null; then
    shell=/usr/sbin/nologin
    [ -x "$ROOT$shell" ] || shell=/sbin/nologin
    [ -x "$ROOT$shell" ] || shell=/bin/false
    useradd "${SHADOW_ROOT[@]}" --system --gid "$USER_NAME" --home-dir "$DATA_DIR" --no-create-home \
        --shell "$shell" --comment "Edgefleet edge agent" "$USER_NAME"
    did "created the user $USER_NAME"
fi
# GPU device nodes are root:video (and root:render) on JetPack: the unit runs with the user's groups.
for group in video render; do
    members=$(awk -F: -v g="$group" '$1 == g { print $4 }' "$ROOT/etc/group")
    if grep -q "^$group:" "$ROOT/etc/group" && ! echo ",$members," | grep -q ",$USER_NAME,"; then
        usermod "${SHADOW_ROOT[@]}" --append --groups "$group" "$USER_NAME"
        did "added $USER_NAME to the group $group (GPU devices)"
    fi
done
UID_=$(id_of passwd "$USER_NAME")
GID_=$(id_of group "$USER_NAME")

# Config: root writes it, the agent's group reads it. Data: the agent's alone (systemd's StateDirectory= would
# make it too, at the first start; made here so enroll can run before that).
ensure_dir "$CONFIG_DIR" 0750 0 "$GID_"
ensure_dir "$DATA_DIR" 0750 "$UID_" "$GID_"

# The virtualenv sees the system site-packages: JetPack installs tensorrt and pycuda there, matched to its
# CUDA; pip's tensorrt wheels would not be.
if [ ! -x "$ROOT$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die 1 "$PYTHON not found: install Python 3.10 or newer (JetPack 6: apt-get install python3), or name one with --python"
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null ||
        die 1 "$PYTHON cannot make virtualenvs: apt-get install python3-venv (JetPack 6: apt-get install python3.10-venv)"
    mkdir -p "$(dirname "$ROOT$VENV")"
    "$PYTHON" -m venv --system-site-packages "$ROOT$VENV"
    did "created the virtualenv $VENV (with the system site-packages)"
fi
before=$(venv_fingerprint)
if [ "$MODE" = upgrade ] || [ ! -x "$ROOT$VENV/bin/edge-agent" ]; then
    upgrade=()
    [ "$MODE" = install ] || upgrade=(--upgrade)
    # shellcheck disable=SC2086 # PIP_ARGS is a list of arguments on purpose
    "$ROOT$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${upgrade[@]}" \
        $PIP_ARGS "$PACKAGE" ||
        die 1 "pip could not install $PACKAGE (its message is above); offline: --pip-args \"--no-index --find-links DIR\""
    [ -x "$ROOT$VENV/bin/edge-agent" ] || die 1 "$PACKAGE installed no edge-agent command: is it edgefleet[agent]?"
fi
after=$(venv_fingerprint)
UPGRADED=0
if [ "$before" != "$after" ]; then
    UPGRADED=1
    did "installed $PACKAGE into $VENV ($("$ROOT$VENV/bin/python" -c 'from importlib.metadata import version; print("edgefleet", version("edgefleet"))' 2>/dev/null || echo "edgefleet"))"
fi

# The command on PATH (for enroll, status, doctor), unless something else is there already.
if [ ! -e "$ROOT$LINK" ] && [ ! -L "$ROOT$LINK" ]; then
    mkdir -p "$(dirname "$ROOT$LINK")"
    ln -s "$VENV/bin/edge-agent" "$ROOT$LINK"
    did "linked $LINK -> $VENV/bin/edge-agent"
elif [ "$(readlink "$ROOT$LINK" || true)" != "$VENV/bin/edge-agent" ]; then
    say "left $LINK as it is (not a link to $VENV/bin/edge-agent)"
fi

# The config is the operator's once it exists: never overwritten.
if [ ! -e "$ROOT$CONFIG" ]; then
    install -m 0640 -o 0 -g "$GID_" "$CONFIG_SRC" "$ROOT$CONFIG"
    did "wrote $CONFIG from the example"
elif [ "$MODE" = upgrade ] && ! cmp -s "$CONFIG_SRC" "$ROOT$CONFIG"; then
    say "kept $CONFIG; the new example with every option is $CONFIG_SRC (diff them for new options)"
fi

# The unit, with this --venv's paths; rewritten only when its content changed.
rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT
sed "s#/opt/edgefleet/venv#$VENV#g" "$UNIT_SRC" >"$rendered"
UNIT_CHANGED=0
if install_file "$rendered" "$UNIT" 0644 0 0; then
    UNIT_CHANGED=1
    did "installed $UNIT"
    [ -n "$ROOT" ] || systemctl daemon-reload
fi
if ! "${SYSTEMCTL[@]}" --quiet is-enabled edge-agent.service 2>/dev/null; then
    "${SYSTEMCTL[@]}" --quiet enable edge-agent.service
    did "enabled edge-agent.service (starts at boot)"
fi

# Start, or restart what changed. Never under --root: that root's systemd is not running.
if [ -z "$ROOT" ] && [ "$START" = 1 ]; then
    if ! unit_active || [ "$UPGRADED" = 1 ] || [ "$UNIT_CHANGED" = 1 ]; then
        "$ROOT$VENV/bin/edge-agent" check-config "$CONFIG" >/dev/null ||
            die 1 "$CONFIG is not valid (the message above names the key); fix it, then run this again"
        if unit_active; then
            action=restart
        else
            action=start
        fi
        systemctl "$action" edge-agent.service ||
            die 1 "edge-agent did not start: see journalctl -u edge-agent -n 50 and systemctl status edge-agent"
        did "${action}ed edge-agent.service"
    fi
fi

if [ "$CHANGED" = 0 ]; then
    say "nothing to do: edge-agent is installed as configured"
elif [ -z "$ROOT" ] && [ ! -e "$DATA_DIR/identity/device.json" ]; then
    say "next: enroll this device: sudo -u $USER_NAME edge-agent enroll --url HOST:PORT --token efe_... --config $CONFIG"
fi
