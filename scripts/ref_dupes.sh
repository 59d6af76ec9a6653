#!/usr/bin/env bash
# List runs of code that stand both in our tree (sam2_fast/, kernels/) and in the installed
# reference sam2 package. Our code must be our own: rewrite anything this prints.
# Usage: scripts/ref_dupes.sh [path-filter-regex]
set -u
top=$(git rev-parse --show-toplevel) && cd "$top" || exit 1
py=.venv/bin/python
ref=$($py -c "import sam2, os; print(os.path.dirname(sam2.__file__))")
tmp=$(mktemp -d); mkdir -p "$tmp/ours" "$tmp/reference"
for d in sam2_fast kernels; do [ -d "$d" ] && cp -r "$d" "$tmp/ours/"; done
cp -r "$ref" "$tmp/reference/sam2"
duplicates --repo "$tmp" --most 200 --min-lines 6 --seconds 60 | grep -E "ours/.* ~ reference/|reference/.* ~ ours/" | grep -E "${1:-.}" 
rm -rf "$tmp"
exit 0
