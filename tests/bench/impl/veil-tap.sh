# shellcheck shell=bash
# veil-tap: veil with --mode tap (README "Layer 2"): the same two nodes as impl/veil.sh, with
# Ethernet frames over a TAP device (ARP first) instead of IP packets over a TUN.
# shellcheck source=veil.sh
source "$BENCH_HOME/impl/veil.sh"
VEIL_UP_ARGS="--mode tap ${VEIL_UP_ARGS:-}"
