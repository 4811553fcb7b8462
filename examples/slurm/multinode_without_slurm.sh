#!/bin/bash
# Multi-node without a scheduler (no SLURM, no torchrun): run this script once on every node with the
# same MASTER_ADDR/MASTER_PORT and that node's NODE_RANK. Lightning's LightningEnvironment starts one
# process per device on each node (the popen launcher) and reads these variables.
#   node 0:  MASTER_ADDR=10.0.0.1 NODE_RANK=0 NUM_NODES=2 DEVICES=4 bash examples/slurm/multinode_without_slurm.sh
#   node 1:  MASTER_ADDR=10.0.0.1 NODE_RANK=1 NUM_NODES=2 DEVICES=4 bash examples/slurm/multinode_without_slurm.sh
# CPU clusters: ACCELERATOR=cpu (gloo); set GLOO_SOCKET_IFNAME to the interface that reaches the other
# nodes (e.g. eth0) when a machine has several. GPUs: ACCELERATOR=gpu (NCCL; NCCL_SOCKET_IFNAME likewise).
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}"
: "${NODE_RANK:?set NODE_RANK to this node's index, 0 .. NUM_NODES-1}"
export MASTER_ADDR NODE_RANK
export MASTER_PORT="${MASTER_PORT:-29500}"
NUM_NODES="${NUM_NODES:-2}"
DEVICES="${DEVICES:-1}"
ACCELERATOR="${ACCELERATOR:-gpu}"
CONFIG="${CONFIG:-configs/local_sgd.yaml}"

# examples/digits/cli.py is the commsgd CLI with the digits example's model and data (the configs' model.* and
# data.*); with your own model and data named in a config: commsgd fit --config your.yaml
exec python examples/digits/cli.py fit --config "$CONFIG" \
    --trainer.accelerator="$ACCELERATOR" \
    --trainer.num_nodes="$NUM_NODES" \
    --trainer.devices="$DEVICES" \
    "$@"
