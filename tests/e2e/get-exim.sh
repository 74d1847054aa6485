#!/bin/sh
# Exim for the end-to-end suite, without installing it: Debian's exim4 and postfix packages
# conflict, so exim4-daemon-light is downloaded and unpacked into a private root, and the tests
# run its binary with their own -C configuration (as root). Its one library that Postfix does
# not bring, libidn12, is installed by .ci/run. Idempotent.
set -eu
root=${1:-/opt/mailbox-relay-e2e/exim}
[ -x "$root/usr/sbin/exim4" ] && exit 0
download=$(mktemp -d)
chmod 755 "$download"  # apt's sandbox user writes the .deb here
(cd "$download" && apt-get download exim4-daemon-light >/dev/null)
mkdir -p "$root"
dpkg -x "$download"/exim4-daemon-light_*.deb "$root"
rm -rf "$download"
"$root/usr/sbin/exim4" -bV -C /dev/null >/dev/null 2>&1 || true  # fails only on a missing library below
if ldd "$root/usr/sbin/exim4" | grep -q "not found"; then
    ldd "$root/usr/sbin/exim4" | grep "not found" >&2
    exit 1
fi
