#!/usr/bin/env bash
# Install the Debian/Ubuntu packages edge-agent's scripts need, when missing and possible.
#   scripts/setup-system.sh run    mosquitto (local broker), libsystemd-dev + pkg-config (systemd-python)
#   scripts/setup-system.sh test   the above, plus systemd (systemd-analyze, for the unit file test), chromium
#                                  and chromium-driver (the device page's browser test) and, best effort, the
#                                  linter for install.sh (its test skips, saying so, without it)
# Installs only as root or with passwordless sudo; otherwise prints what to install and carries on,
# except for what the chosen target cannot work without (mosquitto for both).
set -euo pipefail
target="${1:-run}"

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
pkg-config --exists libsystemd 2>/dev/null || missing+=(libsystemd-dev pkg-config)
if [ "$target" = test ]; then
  command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
fi
optional=()
if [ "$target" = test ] && ! command -v shellcheck >/dev/null 2>&1; then
  optional+=(shellcheck)
fi
[ ${#missing[@]} -eq 0 ] && [ ${#optional[@]} -eq 0 ] && exit 0

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo_cmd=(sudo -n)
  else
    sudo_cmd=(none)
  fi
fi

if [ "${sudo_cmd[*]-}" != none ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing ${missing[*]} ${optional[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq >/dev/null || true
  if [ ${#missing[@]} -gt 0 ] && ! "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    echo "setup: apt-get could not install ${missing[*]}" >&2
  fi
  # separately: a distribution without it must not cost us the packages above
  if [ ${#optional[@]} -gt 0 ] && ! "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${optional[@]}" >/dev/null 2>&1; then
    echo "setup: ${optional[*]} not available; its test will be skipped" >&2
  fi
else
  echo "setup: please install these packages (as root): apt-get install ${missing[*]} ${optional[*]}" >&2
fi

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "setup: mosquitto is required (the local broker for 'make run' and for the tests):" >&2
  echo "       sudo apt-get install mosquitto" >&2
  exit 1
fi
if [ "$target" = test ] && ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "setup: systemd-analyze is required by the unit file test: sudo apt-get install systemd" >&2
  exit 1
fi
if [ "$target" = test ] && { ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; }; then
  echo "setup: chromium and chromium-driver are required by the device page's browser test:" >&2
  echo "       sudo apt-get install chromium chromium-driver" >&2
  exit 1
fi
pkg-config --exists libsystemd 2>/dev/null || \
  echo "setup: libsystemd-dev missing: systemd-python will be skipped; the built-in sd_notify is used" >&2
exit 0
