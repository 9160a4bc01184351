#!/usr/bin/env bash
# Milestone 5's figures that run on one machine without agents yet:
# placement among 1,000 nodes (a decision's p50/p99, placements per second
# committed through the cluster's lock). No peer scheduler runs here
# (Nomad is not packaged), so its published figure is printed beside ours.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --locked --quiet -p commons-server --bench placement 2>/dev/null | grep placement
