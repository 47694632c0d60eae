#!/usr/bin/env bash
# The whole test suite: every test in its own process (nextest), once per CPU-fault backend.
set -euo pipefail
cd "$(dirname "$0")/.."
for backend in uffd mprotect; do
  echo "== CPU fault backend: $backend =="
  HETMEM_CPU_FAULT_BACKEND=$backend cargo nextest run --workspace --no-fail-fast "$@"
done
cargo test --workspace --doc
