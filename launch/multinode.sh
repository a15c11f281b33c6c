#!/usr/bin/env bash
# Multi-task DDP training with GradVac on several nodes (torchrun's c10d rendezvous).
# Run the SAME command on every node, changing only NODE_RANK:
#   MASTER=10.0.0.1 NNODES=2 NODE_RANK=0 bash launch/multinode.sh --steps 500   # on 10.0.0.1
#   MASTER=10.0.0.1 NNODES=2 NODE_RANK=1 bash launch/multinode.sh --steps 500   # on the other node
# MASTER: an address of node 0 every node can reach; the c10d rendezvous store listens on
#   MASTER:29500 (RDZV_PORT), so that TCP port must be open between the nodes.
# NNODES: the number of nodes; NODE_RANK: this node's index, 0..NNODES-1. With c10d the rendezvous
#   assigns the ranks itself and torchrun ignores --node_rank (it says so in a warning); the flag is
#   kept so that switching to --rdzv_backend static (fixed ranks, MASTER_ADDR/PORT) needs no new input.
# NPROC: processes per node (default: one per GPU, or 2 on a CPU-only node); RDZV_ID: a job id
#   shared by the nodes of one job (default gradvac); BACKEND: nccl with GPUs, else gloo.
# With gloo across nodes set GLOO_SOCKET_IFNAME (NCCL: NCCL_SOCKET_IFNAME) to the interface that
# connects the nodes if the default route's is not it.
# Optional: RDZV_CONF (torchrun --rdzv_conf, e.g. is_host=true on the node that hosts the store when
#   the nodes share a hostname), LOCAL_ADDR (this node's address, torchrun --local_addr), MAX_RESTARTS
#   (torchrun --max_restarts, elastic restarts), SCRIPT (default examples/ddp_train.py; it gets
#   --backend and the arguments of this script). launch/two_nodes.sh runs this file on two network
#   namespaces of one machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/lib.sh  # GRADVAC_DRY_RUN=1: print the commands instead
: "${MASTER:?set MASTER to the address of node 0}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to this node index (0..NNODES-1)}"
[ -n "${GRADVAC_SKIP_SETUP:-}" ] || run bash launch/setup.sh  # (launch/two_nodes.sh sets it up outside the nodes)
if command -v nvidia-smi >/dev/null 2>&1 && [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -gt 0 ]; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}; BACKEND=${BACKEND:-nccl}
else
  NPROC=${NPROC:-2}; BACKEND=${BACKEND:-gloo}
fi
# With restarts, the workers must not share the rendezvous store (torch's default): they isolate each
# round's keys by TORCHELASTIC_RESTART_COUNT, which each node counts on its own (a node restarted for
# its peer's failure does not count it), so restarted workers can read a previous round's addresses
# and hang connecting to them (pytorch#135712). A store of their own per round avoids that.
if [ -n "${MAX_RESTARTS:-}" ]; then export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}; fi
launch .venv/bin/torchrun \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER:${RDZV_PORT:-29500}" --rdzv_id "${RDZV_ID:-gradvac}" \
  ${RDZV_CONF:+--rdzv_conf "$RDZV_CONF"} ${LOCAL_ADDR:+--local_addr "$LOCAL_ADDR"} \
  ${MAX_RESTARTS:+--max_restarts "$MAX_RESTARTS"} \
  "${SCRIPT:-examples/ddp_train.py}" --backend "$BACKEND" "$@"
