#!/usr/bin/env bash
# Install (or uninstall) edge-agent as a systemd service.
#
#   sudo packaging/install.sh                      # install/upgrade, enable and start
#   packaging/install.sh --root /tmp/stage         # stage into a directory tree (no users, no systemctl)
#   sudo packaging/install.sh --uninstall          # remove unit + venv, keep config and state
#   sudo packaging/install.sh --uninstall --purge  # ... and /etc/edge-agent, /var/lib/edge-agent
#
# Idempotent: running it again upgrades the venv and unit, never overwrites
# /etc/edge-agent/agent.yaml (a newer default goes next to it as agent.yaml.dist).
#
# Environment:
#   EDGE_AGENT_PIP_ARGS   extra arguments for `pip install` (word-split), e.g. "--no-deps"
#   EDGE_AGENT_SKIP_PIP=1 create the venv without pip and install nothing into it
#   EDGE_AGENT_EXTRAS     extras to install (default "tflite,systemd"; "" for none)
#
# See docs/service.md.
set -euo pipefail

PROG=${0##*/}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

NAME=edge-agent
ROOT=/
SOURCE=$(cd "$SCRIPT_DIR/.." && pwd)
PYTHON=python3
UNINSTALL=0
PURGE=0
ENABLE=1
CREATE_USER=1

usage() {
    cat <<EOF
Usage: $PROG [--root DIR] [--source DIR] [--python PY] [--no-enable] [--no-user]
       $PROG --uninstall [--purge] [--root DIR] [--no-enable]

  --root DIR     install below DIR instead of / (staging; implies no user creation
                 and no systemctl calls)
  --source DIR   edge-agent source tree to pip-install (default: $SOURCE)
  --python PY    Python >= 3.11 used to create the venv (default: python3)
  --no-enable    do not run systemctl; print the commands instead
  --no-user      do not create the '$NAME' system user/group
  --uninstall    disable and remove the unit and /opt/$NAME (keeps config and state)
  --purge        with --uninstall: also remove /etc/$NAME and /var/lib/$NAME
  -h, --help     this help
EOF
}

log()  { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die()  { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

need_arg() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs an argument (see --help)"; fi
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root)      need_arg "$@"; ROOT=$2; shift 2 ;;
        --root=*)    ROOT=${1#*=}; shift ;;
        --source)    need_arg "$@"; SOURCE=$2; shift 2 ;;
        --source=*)  SOURCE=${1#*=}; shift ;;
        --python)    need_arg "$@"; PYTHON=$2; shift 2 ;;
        --python=*)  PYTHON=${1#*=}; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge)     PURGE=1; shift ;;
        --no-enable) ENABLE=0; shift ;;
        --no-user)   CREATE_USER=0; shift ;;
        -h|--help)   usage; exit 0 ;;
        *)           usage >&2; die "unknown argument: $1" ;;
    esac
done

# Nothing this script creates is group/world-writable, whatever the caller's umask.
umask 022

[ "$PURGE" = 1 ] && [ "$UNINSTALL" = 0 ] && die "--purge only makes sense with --uninstall"
[ -n "$ROOT" ] || die "--root must not be empty"

# Canonical root; PREFIX is "" for the real system so paths read /opt/..., /etc/...
if [ "$ROOT" != / ]; then
    mkdir -p -- "$ROOT" || die "cannot create root directory $ROOT"
    ROOT=$(cd -- "$ROOT" && pwd -P)
fi
if [ "$ROOT" = / ]; then PREFIX=; REAL_ROOT=1; else PREFIX=$ROOT; REAL_ROOT=0; fi

OPT_DIR=$PREFIX/opt/$NAME
VENV=$OPT_DIR/venv
CONF_DIR=$PREFIX/etc/$NAME
CONF=$CONF_DIR/agent.yaml
STATE_DIR=$PREFIX/var/lib/$NAME
UNIT_DIR=$PREFIX/etc/systemd/system
UNIT=$UNIT_DIR/$NAME.service
UNIT_SRC=$SCRIPT_DIR/$NAME.service

if [ "$REAL_ROOT" = 1 ] && [ "$(id -u)" -ne 0 ]; then
    die "installing into / needs root: run with sudo, or stage with --root DIR"
fi

# systemctl is only ever used on the real root of a system booted with systemd.
can_systemctl() {
    [ "$REAL_ROOT" = 1 ] && [ "$ENABLE" = 1 ] && [ -d /run/systemd/system ] \
        && command -v systemctl >/dev/null 2>&1
}

group_exists() { getent group "$1" >/dev/null 2>&1; }
user_exists()  { getent passwd "$1" >/dev/null 2>&1; }

# Owner/group for files only when installing for real and the account exists.
chown_if_real() {  # chown_if_real OWNER:GROUP PATH...
    local spec=$1; shift
    if [ "$REAL_ROOT" = 1 ] && group_exists "$NAME"; then
        chown "$spec" "$@"
    fi
}

# ---------------------------------------------------------------- uninstall
if [ "$UNINSTALL" = 1 ]; then
    if can_systemctl; then
        log "stopping and disabling $NAME.service"
        systemctl disable --now "$NAME.service" 2>/dev/null || warn "systemctl disable --now $NAME failed (not installed?)"
    elif [ "$REAL_ROOT" = 1 ]; then
        log "systemd is not running (or --no-enable): run 'systemctl disable --now $NAME' yourself if it is enabled"
    fi
    if [ -e "$UNIT" ]; then
        log "removing $UNIT"
        rm -f -- "$UNIT"
    else
        log "$UNIT already absent"
    fi
    if [ -d "$OPT_DIR" ]; then
        log "removing $OPT_DIR (venv)"
        rm -rf -- "$OPT_DIR"
    else
        log "$OPT_DIR already absent"
    fi
    if can_systemctl; then
        systemctl daemon-reload || warn "systemctl daemon-reload failed"
    fi
    if [ "$PURGE" = 1 ]; then
        log "purging $CONF_DIR and $STATE_DIR"
        rm -rf -- "$CONF_DIR" "$STATE_DIR"
        if [ "$REAL_ROOT" = 1 ] && user_exists "$NAME"; then
            log "keeping the '$NAME' system user; remove it with: userdel $NAME"
        fi
    else
        log "kept $CONF_DIR and $STATE_DIR (add --purge to remove them)"
    fi
    log "uninstall done"
    exit 0
fi

# ---------------------------------------------------------------- preflight
[ -f "$UNIT_SRC" ] || die "unit file not found: $UNIT_SRC"
[ -d "$SOURCE" ] || die "source directory not found: $SOURCE"
SOURCE=$(cd -- "$SOURCE" && pwd -P)
SKIP_PIP=${EDGE_AGENT_SKIP_PIP:-0}
EXTRAS=${EDGE_AGENT_EXTRAS-tflite,systemd}

if [ "$SKIP_PIP" != 1 ] && [ ! -f "$SOURCE/pyproject.toml" ] && [ ! -f "$SOURCE/setup.cfg" ] && [ ! -f "$SOURCE/setup.py" ]; then
    die "$SOURCE is not a Python project (no pyproject.toml/setup.cfg); pass --source DIR"
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "Python interpreter '$PYTHON' not found; install python3 (>= 3.11) or pass --python PY"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$("$PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo '?') is too old: edge-agent needs Python >= 3.11 (pass --python PY)"
if [ "$SKIP_PIP" = 1 ]; then
    "$PYTHON" -c 'import venv' 2>/dev/null \
        || die "'$PYTHON -m venv' is not available; install it (Debian/Ubuntu: apt-get install python3-venv)"
else
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
        || die "'$PYTHON -m venv' cannot create a venv with pip (module venv/ensurepip missing); install it (Debian/Ubuntu: apt-get install python3-venv)"
fi

log "installing $NAME into ${PREFIX:-/} from $SOURCE"

# ---------------------------------------------------------------- user/group
if [ "$REAL_ROOT" = 0 ]; then
    log "skipping user/group creation: --root $ROOT is not / (create the '$NAME' system user on the target)"
elif [ "$CREATE_USER" = 0 ]; then
    log "skipping user/group creation (--no-user)"
else
    if group_exists "$NAME"; then
        log "group '$NAME' exists"
    else
        log "creating system group '$NAME'"
        groupadd --system "$NAME"
    fi
    if user_exists "$NAME"; then
        log "user '$NAME' exists"
    else
        log "creating system user '$NAME' (home /var/lib/$NAME, no login shell)"
        nologin=/usr/sbin/nologin
        [ -x "$nologin" ] || nologin=/sbin/nologin
        [ -x "$nologin" ] || nologin=/bin/false
        useradd --system --gid "$NAME" --home-dir "/var/lib/$NAME" --no-create-home \
            --shell "$nologin" --comment "edge-agent daemon" "$NAME"
    fi
    for g in video render; do
        if group_exists "$g"; then
            if id -nG "$NAME" | tr ' ' '\n' | grep -qx "$g"; then
                log "user '$NAME' already in group '$g'"
            else
                log "adding user '$NAME' to group '$g'"
                usermod -a -G "$g" "$NAME"
            fi
        else
            warn "group '$g' does not exist on this system; the unit's SupplementaryGroups=video render will fail to start (status=216/GROUP) until it exists or a drop-in overrides it (docs/service.md)"
        fi
    done
fi

# ---------------------------------------------------------------- venv + pip
mkdir -p -- "$OPT_DIR"
chmod 0755 "$OPT_DIR"
if [ "$SKIP_PIP" = 1 ]; then
    if [ -x "$VENV/bin/python" ]; then
        log "venv $VENV exists"
    else
        log "creating venv $VENV (without pip: EDGE_AGENT_SKIP_PIP=1)"
        "$PYTHON" -m venv --without-pip "$VENV" || die "creating the venv at $VENV failed"
    fi
    log "skipping pip install (EDGE_AGENT_SKIP_PIP=1)"
else
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        log "venv $VENV exists; upgrading $NAME in it"
    else
        log "creating venv $VENV"
        rm -rf -- "$VENV"
        "$PYTHON" -m venv "$VENV" \
            || die "creating the venv at $VENV failed (Debian/Ubuntu: apt-get install python3-venv)"
    fi
    # shellcheck disable=SC2206  # intentional word splitting of user-supplied pip args
    PIP_ARGS=(${EDGE_AGENT_PIP_ARGS:-})
    pip_install() {  # pip_install EXTRAS
        local spec=$SOURCE
        if [ -n "$1" ]; then spec="${SOURCE}[$1]"; fi
        log "pip install ${PIP_ARGS[*]:+${PIP_ARGS[*]} }$spec"
        "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade "${PIP_ARGS[@]}" "$spec"
    }
    if ! pip_install "$EXTRAS"; then
        case ",$EXTRAS," in
            *,systemd,*)
                fallback=$(printf '%s' ",$EXTRAS," | sed 's/,systemd,/,/; s/^,//; s/,$//')
                warn "pip install with extras [$EXTRAS] failed. The 'systemd' extra (systemd-python) is built from source and needs libsystemd-dev, pkg-config and a C compiler (apt-get install libsystemd-dev pkg-config gcc python3-dev)."
                warn "retrying without it: the daemon then uses its built-in sd_notify (READY/WATCHDOG still work)"
                pip_install "$fallback" || die "pip install of $SOURCE failed (see pip's output above)"
                ;;
            *)
                die "pip install of $SOURCE failed (see pip's output above)"
                ;;
        esac
    fi
    [ -x "$VENV/bin/$NAME" ] || die "pip finished but $VENV/bin/$NAME is missing (does the project declare the '$NAME' console script?)"
fi

# ---------------------------------------------------------------- bundled models and demo clip
# The package alone has no data files: the default config's model (models/face/...) and the demo
# clip are found under EDGE_AGENT_SHARE, which the unit points here.
SHARE_DIR=$OPT_DIR/share
for d in models assets; do
    if [ -d "$SOURCE/$d" ]; then
        log "installing $SHARE_DIR/$d"
        rm -rf -- "${SHARE_DIR:?}/$d"
        mkdir -p -- "$SHARE_DIR"
        cp -R -- "$SOURCE/$d" "$SHARE_DIR/$d"
        chmod -R u=rwX,go=rX -- "$SHARE_DIR/$d"
    else
        warn "$SOURCE/$d is missing: the default model or demo clip will not be there"
    fi
done

# ---------------------------------------------------------------- docs
if [ -f "$SOURCE/docs/service.md" ]; then
    install -D -m 0644 "$SOURCE/docs/service.md" "$OPT_DIR/docs/service.md"
fi

# ---------------------------------------------------------------- config
# /etc/edge-agent stays root-owned and readable (matches ConfigurationDirectoryMode=0755);
# agent.yaml may hold MQTT credentials: root:edge-agent 0640.
mkdir -p -- "$CONF_DIR"
chmod 0755 "$CONF_DIR"
DEFAULT_CONF=$SOURCE/config/agent.yaml
if [ ! -f "$DEFAULT_CONF" ]; then
    if [ -e "$CONF" ]; then
        log "keeping existing $CONF (no default config in $SOURCE/config)"
    else
        warn "no default config at $DEFAULT_CONF; write $CONF before starting the service"
    fi
elif [ ! -e "$CONF" ]; then
    log "installing default config $CONF (0640)"
    install -m 0640 "$DEFAULT_CONF" "$CONF"
    chown_if_real "root:$NAME" "$CONF"
elif cmp -s "$DEFAULT_CONF" "$CONF"; then
    log "config $CONF is the current default; leaving it"
    rm -f -- "$CONF.dist"
else
    log "keeping your $CONF; the new default is at $CONF.dist (compare with: diff -u $CONF.dist $CONF)"
    install -m 0640 "$DEFAULT_CONF" "$CONF.dist"
    chown_if_real "root:$NAME" "$CONF.dist"
fi

# ---------------------------------------------------------------- state dir
mkdir -p -- "$STATE_DIR"
chmod 0750 "$STATE_DIR"
if [ "$REAL_ROOT" = 1 ] && user_exists "$NAME"; then
    chown "$NAME:$NAME" "$STATE_DIR"
fi
log "state directory $STATE_DIR (0750)"

# ---------------------------------------------------------------- unit
# The unit names the final paths (/opt/edge-agent/venv, /etc/edge-agent); with --root it
# is installed unchanged, because those are the paths on the target system.
mkdir -p -- "$UNIT_DIR"
if [ -f "$UNIT" ] && cmp -s "$UNIT_SRC" "$UNIT"; then
    log "unit $UNIT is up to date"
else
    log "installing unit $UNIT"
    install -m 0644 "$UNIT_SRC" "$UNIT"
fi

# ---------------------------------------------------------------- enable/start
if can_systemctl; then
    log "systemctl daemon-reload"
    systemctl daemon-reload
    if systemctl is-active --quiet "$NAME.service"; then
        log "restarting running $NAME.service to pick up the new version"
        systemctl enable "$NAME.service"
        systemctl restart "$NAME.service"
    else
        log "systemctl enable --now $NAME"
        systemctl enable --now "$NAME.service"
    fi
    log "done. Check it with: systemctl status $NAME; journalctl -u $NAME -f"
else
    if [ "$REAL_ROOT" = 0 ]; then
        why="--root $ROOT"
    elif [ "$ENABLE" = 0 ]; then
        why="--no-enable"
    else
        why="systemd is not running as PID 1"
    fi
    log "not enabling the service ($why). On the target system run:"
    printf '    systemctl daemon-reload\n    systemctl enable --now %s\n' "$NAME"
    log "install done"
fi
