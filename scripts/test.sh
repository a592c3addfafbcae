#!/usr/bin/env bash
# The test command from the README: fetches the models the tests need, then runs every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-model.sh all
cargo test --release --locked "$@"
