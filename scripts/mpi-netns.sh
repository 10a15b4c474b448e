#!/usr/bin/env bash
# Runs COMMAND as 2 MPI ranks in two network namespaces joined by a veth pair,
# so the ranks' traffic really crosses a network interface (Open MPI's TCP
# transport, no shared memory). Needs root and iproute2. Prints the bytes the
# second namespace received on its interface as its last line:
#   veth bytes received: N
# Usage: scripts/mpi-netns.sh COMMAND [ARGS...]   (e.g. moe-gpu train --config c.json)
set -euo pipefail
[[ $# -gt 0 ]] || { echo "usage: scripts/mpi-netns.sh COMMAND [ARGS...]" >&2; exit 2; }
command -v ip >/dev/null || { echo "mpi-netns: iproute2 (ip) is not installed" >&2; exit 2; }
id=$$ a="moe-a-$$" b="moe-b-$$" net=10.77.$((RANDOM % 200)).
agent="$(mktemp /tmp/mpi-netns-agent-XXXXXX)"
cleanup() { ip netns del "$a" 2>/dev/null || true; ip netns del "$b" 2>/dev/null || true; rm -f "$agent"; }
trap cleanup EXIT
ip netns add "$a"; ip netns add "$b"
ip link add "va$id" type veth peer name "vb$id"
ip link set "va$id" netns "$a"; ip link set "vb$id" netns "$b"
ip -n "$a" addr add "${net}1/24" dev "va$id"; ip -n "$b" addr add "${net}2/24" dev "vb$id"
for n in "$a" "$b"; do ip -n "$n" link set lo up; done
ip -n "$a" link set "va$id" up; ip -n "$b" link set "vb$id" up
# Open MPI starts the remote rank through this "rsh" agent: into the second namespace.
cat > "$agent" <<AGENT
#!/bin/sh
host="\$1"; shift
if [ "\$host" = "${net}2" ]; then exec ip netns exec $b sh -c "\$*"; fi
exec sh -c "\$*"
AGENT
chmod +x "$agent"
received() { ip -n "$b" -s link show "vb$id" | awk '/RX:/ { getline; print $1 }'; }
before=$(received)
status=0
ip netns exec "$a" mpirun --allow-run-as-root -np 2 -H "${net}1:1,${net}2:1" --mca plm_rsh_agent "$agent" \
    --mca btl tcp,self --mca btl_tcp_if_include "${net}0/24" --mca oob_tcp_if_include "${net}0/24" "$@" || status=$?
echo "veth bytes received: $(( $(received) - before ))"
exit $status
