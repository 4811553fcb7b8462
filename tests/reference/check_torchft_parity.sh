#!/usr/bin/env bash
# Run torchft 0.2.0 DiLoCo (2 replica groups, CPU/gloo) for the reference configurations and
# compare every inner step's parameters with diloco_simulation.py (expected: bit-exact, tol 0).
# ~5 s per configuration on 2 cores.  Needs install_torchft_ref.sh first.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d /tmp/torchft_ref.XXXXXX)}
R=tests/reference
run() {  # name, then flags shared by launcher and simulation
  local name=$1; shift
  timeout 180 "$PY" $R/run_torchft_pair.py --out-dir "$OUT/$name" --timeout-s 150 "$@"
  local sim_flags=("$@"); sim_flags=("${sim_flags[@]/--quantize/}")
  "$PY" $R/diloco_simulation.py --compare "$OUT/$name" ${sim_flags[@]}
}
run h4_f1 --sync-every 4 --fragments 1 --steps 12
run h4_f2_d1_a05 --sync-every 4 --fragments 2 --delay 1 --alpha 0.5 --steps 12
run h6_f2_d2 --sync-every 6 --fragments 2 --delay 2 --steps 12
run h4_f2_shared --sync-every 4 --fragments 2 --outer-mode shared --steps 12
# should_quantize needs triton + an accelerator; on CPU torchft silently falls back to the
# plain fp32 allreduce (manager.py:458), so the unquantized simulation must match exactly.
run h4_f2_d1_a05_q --sync-every 4 --fragments 2 --delay 1 --alpha 0.5 --quantize --steps 12
echo "all torchft parity checks passed ($OUT)"
