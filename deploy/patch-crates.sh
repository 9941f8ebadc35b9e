#!/usr/bin/env bash
# Our fixes to crates from crates.io, applied before any cargo command.
#
# For each patches/<crate>/ (a SOURCE file naming the crate, its version and the sha256 of its
# .crate on crates.io, and NNNN-*.patch files), this takes the pristine .crate (cargo's cache,
# else static.crates.io), checks its sha256, unpacks it, applies the patches in order and puts
# the result in .patched/<crate>/, which Cargo.toml's [patch.crates-io] points at (outside the
# workspace: excluded, so our lints and `cargo fmt` leave it alone). The copy is rebuilt only when
# SOURCE or a patch changes; a failed run leaves the previous copy as it was.
#
# Usage: deploy/patch-crates.sh [--check]   (--check: exit 1 if a copy is missing or stale)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$repo/.patched"
check_only=false
case "${1:-}" in
    --check) check_only=true ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "patch-crates: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac
command -v patch >/dev/null || { echo "patch-crates: needs the 'patch' program (apt-get install patch)" >&2; exit 1; }

for dir in "$repo"/patches/*/; do
    [ -f "$dir/SOURCE" ] || continue
    name="$(sed -n 's/^name=//p' "$dir/SOURCE")"
    version="$(sed -n 's/^version=//p' "$dir/SOURCE")"
    sha="$(sed -n 's/^sha256=//p' "$dir/SOURCE")"
    if [ -z "$name" ] || [ -z "$version" ] || [ -z "$sha" ]; then
        echo "patch-crates: $dir/SOURCE needs name=, version= and sha256= lines" >&2
        exit 1
    fi
    stamp="$(cat "$dir/SOURCE" "$dir"/*.patch | sha256sum | cut -d' ' -f1)"
    target="$out/$name"
    if [ "$(cat "$target/.shardswarm-patches" 2>/dev/null)" = "$stamp" ]; then
        continue
    fi
    if $check_only; then
        echo "patch-crates: $target is missing or stale: run deploy/patch-crates.sh" >&2
        exit 1
    fi
    mkdir -p "$out"
    work="$(mktemp -d "$out/.work.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    crate="$work/$name-$version.crate"
    cached="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$name-$version.crate" 2>/dev/null | head -1 || true)"
    if [ -n "$cached" ] && [ "$(sha256sum "$cached" | cut -d' ' -f1)" = "$sha" ]; then
        cp "$cached" "$crate"
    else
        url="https://static.crates.io/crates/$name/$name-$version.crate"
        echo "patch-crates: downloading $url"
        curl -fsSL --retry 3 -o "$crate" "$url"
    fi
    got="$(sha256sum "$crate" | cut -d' ' -f1)"
    if [ "$got" != "$sha" ]; then
        echo "patch-crates: $name-$version.crate has sha256 $got, expected $sha" >&2
        exit 1
    fi
    tar -xzf "$crate" -C "$work"
    for p in "$dir"/*.patch; do
        if ! patch -d "$work/$name-$version" -p1 --batch --quiet --no-backup-if-mismatch < "$p"; then
            echo "patch-crates: $(basename "$p") does not apply to $name $version" >&2
            exit 1
        fi
    done
    echo "$stamp" > "$work/$name-$version/.shardswarm-patches"
    rm -rf "$target"
    mv "$work/$name-$version" "$target"
    rm -rf "$work"
    trap - EXIT
    echo "patch-crates: $name $version with $(ls "$dir"/*.patch | wc -l) patch(es) from patches/$name/ in .patched/$name"
done
