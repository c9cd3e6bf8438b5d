#!/usr/bin/env bash
# One set-up path for a fresh Debian 12 machine: system packages, then the venv.
#
# The venv is built from Debian's /usr/bin/python3 with --system-site-packages because
# nbdkit's Python plugin embeds Debian's Python 3.11 and libnbd's module `nbd` exists only
# as Debian's python3-libnbd: the plugin, the CLI and the tests must all run the same
# interpreter and see the same `nbd` module and the same repdisk code.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  nbdkit nbdkit-plugin-python python3-libnbd libnbd-bin
  qemu-utils qemu-system-x86 fio python3-venv
  busybox-static e2fsprogs cpio iproute2 gnutls-bin openssl psmisc gcc libc6-dev
  libnbd-dev nbdkit-plugin-dev strace
  pacemaker corosync resource-agents pacemaker-cli-utils libxml2-utils
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients python3-libvirt
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  # --no-install-recommends: pacemaker's recommends (fence-agents) pull in cloud SDKs.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import nbd' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
# pip's own status, not grep's: a dependency that cannot be installed stops the set-up here.
if ! pip_out=$(.venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]' 2>&1); then
  printf '%s\n' "$pip_out" | grep -v "is ignored: it is neither" >&2
  echo "setup: pip could not install repdisk with its test and bench extras (above)" >&2
  exit 1
fi
printf '%s\n' "$pip_out" | grep -v "is ignored: it is neither" | grep . || true
.venv/bin/python -c 'import nbd, repdisk' || { echo "setup: venv is broken (cannot import nbd or repdisk)" >&2; exit 1; }
# Every node preloads this into nbdkit (nbdplugin/nbdkit-guard.c says why).
mkdir -p .venv/lib/repdisk
cc -O2 -shared -fPIC -Wall -Wextra -Werror -o .venv/lib/repdisk/nbdkit-guard.so \
  nbdplugin/nbdkit-guard.c -ldl
# Every node runs this filter: a sync primary's writes in C (nbdplugin/repdisk-fast.c).
cc -O2 -shared -fPIC -Wall -Wextra -Werror -o .venv/lib/repdisk/repdisk-fast.so \
  nbdplugin/repdisk-fast.c -lnbd -lpthread
# Pacemaker finds OCF agents under /usr/lib/ocf/resource.d/PROVIDER: ocf:repdisk:repdisk
# runs this clone's ocf/repdisk (and its .venv); ocf/install says why it is not a link.
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO mkdir -p /usr/lib/ocf/resource.d/repdisk
$SUDO rm -f /usr/lib/ocf/resource.d/repdisk/repdisk   # an older setup's link into a clone
$SUDO ./ocf/install /usr/lib/ocf/resource.d/repdisk
echo "setup: ok ($(.venv/bin/python --version), nbdkit $(nbdkit --version | awk '{print $2}'), libnbd $(.venv/bin/python -c 'import nbd; print(nbd.NBD().get_version())'))"
