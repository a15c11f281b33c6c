#!/usr/bin/env bash
# Two nodes on this machine: two Linux network namespaces ("node0", "node1") joined by a veth pair,
# each running launch/multinode.sh (the command users run on real nodes) with torchrun's c10d
# rendezvous over that link. Needs root and iproute2.
#   bash launch/two_nodes.sh [--rate 1gbit] [--nproc N] [--timeout S] [--logs DIR] [--] [multinode.sh args]
# --rate: limit the link with tc's tbf (e.g. 1gbit, 200mbit); --nproc: processes per node (default 1);
# --timeout: seconds the whole job may take (default 300: both nodes are killed then); --logs: where
# node0.log and node1.log go (default: a temporary folder, printed). Every other variable of
# multinode.sh (SCRIPT, RDZV_ID, ...) passes through.
# Addresses: 198.18.0.1 and 198.18.0.2 (198.18.0.0/15 is reserved for network benchmarking), inside the
# namespaces only; nothing listens on any other address. The namespaces, the link and every process in
# them are removed on exit, also after a failure, a timeout or Ctrl-C. Exit status: node0's, else node1's
# (77: no root or no ip, nothing was created).
set -euo pipefail
cd "$(dirname "$0")/.."
rate="" nproc=1 timeout_s=300 logs=""
while [ $# -gt 0 ]; do
  case $1 in
    --rate) rate=$2; shift 2 ;;
    --nproc) nproc=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --logs) logs=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [ "$(id -u)" != 0 ]; then echo "two_nodes.sh: needs root (it creates network namespaces)" >&2; exit 77; fi
if ! command -v ip >/dev/null 2>&1; then echo "two_nodes.sh: needs iproute2's ip" >&2; exit 77; fi
if [ -n "$rate" ] && ! command -v tc >/dev/null 2>&1; then echo "two_nodes.sh: --rate needs tc" >&2; exit 77; fi
bash launch/setup.sh  # here, where the package registries are reachable; the nodes have no other network
logs=${logs:-$(mktemp -d)}
mkdir -p "$logs"
tag=${GRADVAC_NS_TAG:-gv$$}  # names of at most 15 characters, unique per run
ns=("${tag}n0" "${tag}n1") ifs=("${tag}a" "${tag}b") addrs=(198.18.0.1 198.18.0.2)
cleanup() {
  for n in "${ns[@]}"; do
    if ip netns list 2>/dev/null | grep -qw "$n"; then
      ip netns pids "$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
      ip netns del "$n" 2>/dev/null || true  # the veth ends go with their namespaces
    fi
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ip netns add "${ns[0]}"
ip netns add "${ns[1]}"
ip link add "${ifs[0]}" netns "${ns[0]}" type veth peer name "${ifs[1]}" netns "${ns[1]}"
for i in 0 1; do
  ip -n "${ns[$i]}" link set lo up
  ip -n "${ns[$i]}" addr add "${addrs[$i]}/30" dev "${ifs[$i]}"
  ip -n "${ns[$i]}" link set "${ifs[$i]}" up
  if [ -n "$rate" ]; then
    ip netns exec "${ns[$i]}" tc qdisc add dev "${ifs[$i]}" root tbf rate "$rate" burst 256kb latency 50ms
  fi
done
echo "two_nodes.sh: ${ns[0]} (${addrs[0]}) <-> ${ns[1]} (${addrs[1]})${rate:+, $rate}; logs in $logs"
pids=()
for i in 0 1; do
  # Both namespaces share the machine's hostname, so torchrun cannot tell which node hosts the c10d
  # store: node 0 is told it does (is_host), and each node names its own address on the link.
  ip netns exec "${ns[$i]}" env MASTER="${addrs[0]}" NNODES=2 NODE_RANK="$i" NPROC="$nproc" \
    GLOO_SOCKET_IFNAME="${ifs[$i]}" LOCAL_ADDR="${addrs[$i]}" \
    RDZV_CONF="is_host=$([ "$i" = 0 ] && echo true || echo false)" GRADVAC_SKIP_SETUP=1 \
    timeout --kill-after=10 "$timeout_s" bash launch/multinode.sh "$@" >"$logs/node$i.log" 2>&1 &
  pids+=($!)
done
rcs=()
for pid in "${pids[@]}"; do
  rc=0
  wait "$pid" || rc=$?
  rcs+=("$rc")
done
for i in 0 1; do echo "--- node$i (exit ${rcs[$i]}): tail of $logs/node$i.log"; tail -n 5 "$logs/node$i.log"; done
[ "${rcs[0]}" = 0 ] && exit "${rcs[1]}"
exit "${rcs[0]}"
