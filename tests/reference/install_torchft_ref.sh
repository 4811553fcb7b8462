#!/usr/bin/env bash
# Install torchft 0.2.0 (reference implementation for the DiLoCo parity test, tests/test_torchft_parity.py)
# into .venv/torchft-ref WITHOUT touching the venv's torch (everything is --no-deps). Test-only: torchft is
# not a dependency of lightning_commsgd. Use it with PYTHONPATH=.venv/torchft-ref (run_torchft_pair.py does
# that itself). `make test` runs this script (target $(VENV)/torchft-ref/.installed).
# Idempotent: skips the install when the import check already passes (~2 s); a fresh install takes a few
# seconds with a warm pip cache. Any failure exits non-zero with a message on stderr.
#   PY=...              the interpreter (default: the venv's, .venv/bin/python)
#   TORCHFT_REF_DIR=... the target folder (default: .venv/torchft-ref)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
TARGET=${TORCHFT_REF_DIR:-.venv/torchft-ref}
case "$TARGET" in /*) ;; *) TARGET="$(pwd)/$TARGET" ;; esac

fail() {
  echo "install_torchft_ref.sh: $*" >&2
  exit 1
}
[ -x "$PY" ] || fail "no interpreter at $PY (create the venv first: make venv)"

check() {
  PYTHONPATH="$TARGET" "$PY" - "$TARGET" <<'EOF'
import importlib.metadata
import sys

import torch
import torchft
import torchft.local_sgd
import torchft.manager

target = sys.argv[1]
assert torchft.local_sgd.__file__.startswith(target + "/"), f"torchft imported from {torchft.local_sgd.__file__}"
assert torch.__file__.find(target) < 0, f"torch shadowed by {torch.__file__}"
version = importlib.metadata.version("torchft")
assert version == "0.2.0", f"torchft {version}, expected 0.2.0"
print("torch", torch.__version__, "torchft", version, "ok in", target)
EOF
}

if check 2>/dev/null; then exit 0; fi
rm -rf "$TARGET"
# torchft/__init__.py imports torchft.otel -> opentelemetry (+ its deps), hence the pinned list.
# typing_extensions and idna are already in the venv and deliberately NOT shadowed here.
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$TARGET" torchft==0.2.0 \
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
  opentelemetry-proto==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2 \
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-common==0.66b2 \
  opentelemetry-exporter-http-transport==0.66b2 googleapis-common-protos==1.76.0 protobuf==7.36.2 \
  requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3 \
  || fail "pip install of torchft==0.2.0 into $TARGET failed (needs the package registry)"
check || fail "torchft installed into $TARGET but the import check failed (see above)"
