#!/bin/sh
# Try mailbox-relay without Rails: start `mailbox-relay serve` (a local ingress that answers
# like Action Mailbox) on a free port, deliver contrib/sample.eml to it, and list what it
# stored. Run from a clone of the repository, with mailbox-relay on PATH (see README.md).
#
# It fails loudly: any step that fails stops it with a non-zero exit. The inbox is new on
# every run, so nothing left over from an earlier run can pass for success, and the password
# lives only in this script's environment, not in your shell. The inbox (it says where) is
# removed when the script ends, whether it succeeded or not.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
inbox=$(mktemp -d "${TMPDIR:-/tmp}/mailbox-relay-try.XXXXXX")
MAILBOX_RELAY_PASSWORD=try-it
export MAILBOX_RELAY_PASSWORD

mailbox-relay serve --port 0 --maildir "$inbox/Maildir" 2>"$inbox/serve.log" &
serve=$!
trap 'kill "$serve" 2>/dev/null || true; wait "$serve" 2>/dev/null || true; rm -rf "$inbox"' EXIT

url=""
for _ in $(seq 100); do
    url=$(sed -n 's/.*listening on \(http[^,]*\),.*/\1/p' "$inbox/serve.log")
    [ -n "$url" ] && break
    if ! kill -0 "$serve" 2>/dev/null; then
        echo "mailbox-relay serve did not start:" >&2
        cat "$inbox/serve.log" >&2
        exit 1
    fi
    sleep 0.1
done
[ -n "$url" ] || { echo "mailbox-relay serve did not say where it listens" >&2; exit 1; }

# Silent on success: any output here would be the one line saying what went wrong.
mailbox-relay deliver --url "$url" --retry-for 0 "$here/sample.eml"
echo "delivered; serve stored in $inbox/Maildir/new (removed when this script ends):"
ls "$inbox/Maildir/new"
