#!/usr/bin/env bash
# The test command from the README: fetches the models the tests need, then runs every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The code sandbox needs bubblewrap (namespaces); without it code grading refuses to run.
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing bubblewrap for the code sandbox" >&2
        apt-get update -qq >/dev/null && apt-get install -y -qq bubblewrap >/dev/null
    else
        echo "error: the code sandbox needs bubblewrap: install it (apt-get install bubblewrap)" >&2
        exit 1
    fi
fi
scripts/fetch-model.sh all
cargo test --release --locked "$@"
