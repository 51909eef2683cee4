#!/usr/bin/env bash
# Two sites on 127.0.0.1 with real mutual TLS: site-a replicates a volume to site-b.
# Run through `make demo` (which puts .venv/bin on PATH). Everything lives in .demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO="${DEMO_DIR:-$PWD/.demo}"
SIZE="${DEMO_SIZE:-256MiB}"
rm -rf "$DEMO"
mkdir -p "$DEMO"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

say "certificates from dvx-dr's own CA"
dvx-dr pki init-ca "$DEMO/pki"
dvx-dr pki issue-site "$DEMO/pki" site-a --host 127.0.0.1
dvx-dr pki issue-site "$DEMO/pki" site-b --host 127.0.0.1

PORT_A=$(free_port); PORT_B=$(free_port)
for site in site-a site-b; do
    # Demo passwords live in files (0600): dvx-dr never takes a password on the command line.
    (umask 077; printf 'demo password for %s\n' "$site" > "$DEMO/$site.password")
done
say "two encrypted stores"
dvx-dr site init --store "$DEMO/site-a/store" --name site-a --password-file "$DEMO/site-a.password"
dvx-dr site init --store "$DEMO/site-b/store" --name site-b --password-file "$DEMO/site-b.password"

write_config() {  # site port peer peer_port
    cat > "$DEMO/$1/site.yaml" <<YAML
name: $1
store: store
listen: 127.0.0.1:$2
tls:
  cert: ../pki/$1.crt
  key: ../pki/$1.key
  ca: ../pki/ca.crt
admin_socket: admin.sock
policy_dir: policies
peers:
  $3: https://127.0.0.1:$4
YAML
}
write_config site-a "$PORT_A" site-b "$PORT_B"
write_config site-b "$PORT_B" site-a "$PORT_A"
mkdir -p "$DEMO/site-a/policies" "$DEMO/site-b/policies"

say "a sample disk image ($SIZE, OS-like text, binaries, zero runs, random data, repeats)"
python3 bench/datagen.py "$DEMO/disk.img" --size "$SIZE" --seed 7
dvx-dr volume import vm1 "$DEMO/disk.img" --store "$DEMO/site-a/store" \
    --password-file "$DEMO/site-a.password"

say "starting both sites"
for site in site-a site-b; do
    dvx-dr site serve --config "$DEMO/$site/site.yaml" --password-file "$DEMO/$site.password" \
        > "$DEMO/$site/serve.log" 2>&1 &
    PIDS+=($!)
done
for site in site-a site-b; do
    for _ in $(seq 100); do [ -S "$DEMO/$site/admin.sock" ] && break; sleep 0.1; done
    [ -S "$DEMO/$site/admin.sock" ] || { cat "$DEMO/$site/serve.log"; exit 1; }
done
A=(--config "$DEMO/site-a/site.yaml")
B=(--store "$DEMO/site-b/store")

say "snapshot vm1 and replicate it to site-b (full)"
dvx-dr replicate --volume vm1 --to site-b "${A[@]}"

say "change 1% of vm1's blocks, then replicate again (incremental)"
python3 bench/datagen.py "$DEMO/disk.img" --mutate 0.01 --seed 8
dvx-dr volume write vm1 "$DEMO/disk.img" --store "$DEMO/site-a/store"
dvx-dr replicate --volume vm1 --to site-b "${A[@]}"

say "replicas at site-b"
dvx-dr snapshot list "${B[@]}"
LAST=$(dvx-dr snapshot list --json "${B[@]}" | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["snapshot"])')
dvx-dr snapshot export "$LAST" "$DEMO/replica.img" "${B[@]}"
if cmp -s "$DEMO/disk.img" "$DEMO/replica.img"; then
    echo "replica $LAST at site-b is byte-identical to vm1 at site-a"
else
    echo "replica differs from the source!" >&2; exit 1
fi
say "protection group 'demo': vm1 + vm2 snapshotted every 5s, replicated to site-b (RPO 1m)"

dvx-dr volume create vm2 --size 64MiB --store "$DEMO/site-a/store"
cat > "$DEMO/site-a/policies/demo.yaml" <<YAML
name: demo
members: ["vm*"]
snapshot:
  schedule: 5s
  retention: {keep_last: 3}
replication:
  - site: site-b
    schedule: after-snapshot
    retention: {keep_last: 3}
    rpo: 1m
YAML
dvx-dr pg validate "${A[@]}"      # its policy directory, targets checked against its peers
dvx-dr pg apply "${A[@]}"
for i in 1 2 3; do
    head -c 1048576 /dev/urandom > "$DEMO/chunk"
    dvx-dr volume write vm2 "$DEMO/chunk" --offset $((i * 1048576)) --store "$DEMO/site-a/store"
    sleep 5
done
sleep 3
say "group replicas arriving at site-b"
dvx-dr snapshot list "${B[@]}"
say "status at site-a"
dvx-dr status "${A[@]}"
say "site-b datastore"
dvx-dr datastore stats "${B[@]}"
say "done; logs in $DEMO/site-*/serve.log"
