#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, for `bash bench/gpu_check.sh` to install there
# (it has no network). Run here, in the repository root, once; then name `.whl` in the
# device tool's `carry`. Python 3.12, x86-64 manylinux (the lent H200's: see
# bench/README.md); ~4.4 MB. Versions as constraints.txt pins them.
#
#   bash bench/download_wheels.sh [DEST]     # DEST defaults to .whl (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" "$dest"
grep -qxF "/$dest/" "$exclude" 2>/dev/null || echo "/$dest/" >>"$exclude"
python3 -m pip download --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 \
    -d "$dest" \
    megatron-core==0.16.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0
ls -l "$dest"
