#!/usr/bin/env bash
# The whole test suite: every test in its own process (nextest), once per CPU-fault backend.
set -euo pipefail
cd "$(dirname "$0")/.."
for backend in uffd mprotect; do
  echo "== CPU fault backend: $backend =="
  HETMEM_CPU_FAULT_BACKEND=$backend cargo nextest run --workspace --no-fail-fast "$@"
done
# The shuttle models of hetmem-core's concurrent protocols (tests/shuttle_models.rs): hetmem-core
# built over shuttle's primitives (`--cfg shuttle`), once (they do not depend on the backend), in
# a target directory of their own so that the flag does not rebuild the main one.
RUSTFLAGS="--cfg shuttle" CARGO_TARGET_DIR=target/shuttle \
  cargo nextest run -p hetmem-core --test shuttle_models --no-fail-fast "$@"
cargo test --workspace --doc
