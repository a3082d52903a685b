#!/usr/bin/env bash
# Every ratio issue 20 names, benchmark by benchmark (each one interleaves its own A/B variants in one run):
#   exact CBP / BP, floor / BP, exact CBP / floor (MLP batch 1 and 16, ConvNet batch 100), the reference GnT;
#   the ConvNet's CBP / BP again in a plain loop, in CPU time;
#   the six monitors and six empty callbacks on the quickstart and on plasticity_loss_digits;
#   Neural Elements' core-ms per run over ours on the Phase-3 grid.
# usage: benchmarks/issue20.sh [LOSS_OF_PLASTICITY_CHECKOUT] [NEURAL_ELEMENTS_DIR]
#   (shibhansh/loss-of-plasticity's root; mgmacleod/incubator's projects/neural-elements; both kept outside the
#   repository, both optional)
set -euo pipefail
cd "$(dirname "$0")"
echo "load at start: $(cat /proc/loadavg)"
python cbp_overhead.py ${1:+--reference "$1"}
OMP_NUM_THREADS=1 python cbp_conv_loop.py
python monitor_overhead.py --workloads quickstart digits
if [ -n "${2:-}" ]; then
    OMP_NUM_THREADS=1 python study_throughput.py --neural-elements "$2"
else
    echo "study throughput against Neural Elements: not run (pass its directory as the second argument)"
fi
echo "load at end: $(cat /proc/loadavg)"
