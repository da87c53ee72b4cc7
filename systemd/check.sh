#!/usr/bin/env bash
# Checks the units: `systemd-analyze verify` clean, and `systemd-analyze security` exposure <= 1.5.
# verify needs the ExecStart binary and the system's units, so it runs against a scratch root
# holding a stand-in /usr/local/bin/voipbin-archiver, a copy of the system units and ours.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v systemd-analyze >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
printf '#!/bin/sh\n' > "$root/usr/local/bin/voipbin-archiver"
chmod +x "$root/usr/local/bin/voipbin-archiver"
cp -r /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp "$here"/*.service "$here"/*.timer "$root/etc/systemd/system/"
units=$(cd "$here" && ls *.service *.timer)
out=$(cd "$root" && systemd-analyze verify --root="$root" $units 2>&1) || { echo "$out"; exit 1; }
if [ -n "$out" ]; then echo "systemd-analyze verify is not clean:"; echo "$out"; exit 1; fi
for unit in "$here"/*.service; do
    cd "$here"
    systemd-analyze security --offline=true --threshold=15 "$(basename "$unit")" | tail -1
done
echo "systemd units: verify clean, exposure <= 1.5"
