#!/usr/bin/env bash
# Real-window smoke run of the desktop app: Xvfb + Mesa's software Vulkan. `explora` (no command)
# opens the app on the built-in default run; EXPLORA_GUI_SMOKE makes it press Start, train for a
# while, screenshot every panel (eframe's screenshot viewport command), stop the run (which writes
# a checkpoint) and close. Then the run folder is resumed headless for one more step, as
# `explora --no-gui resume` would after a run started in the app.
# Screenshots: $GUI_SMOKE_OUT (default $CARGO_TARGET_DIR/gui-smoke/app*.png).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/explora-ci-target}"
bin="$CARGO_TARGET_DIR/release/explora"
cargo build --release --bin explora --quiet
out="${GUI_SMOKE_OUT:-$CARGO_TARGET_DIR/gui-smoke}"
seconds="${GUI_SMOKE_SECONDS:-20}"
rm -rf "$out"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

started=$(date +%s)
(
  cd "$work"
  EXPLORA_APP_SETTINGS="$work/app.toml" EXPLORA_GUI_SMOKE="$seconds:$out/app.png" \
    timeout 900 xvfb-run -a -s "-screen 0 1400x1000x24" "$bin" 2>&1 | tee "$out/app.log"
)
echo "gui smoke: the app ran $(( $(date +%s) - started )) s"

for panel in "" -batch -attention -adaptation -setup -results; do
  shot="$out/app$panel.png"
  [ -s "$shot" ] || { echo "gui smoke: missing screenshot $shot" >&2; exit 1; }
done
run=$(ls -d "$work"/runs/app-* | head -n1)
ls "$run"/checkpoints/step-*.safetensors >/dev/null || { echo "gui smoke: stopping the app wrote no checkpoint in $run" >&2; exit 1; }
step=$(ls "$run"/checkpoints | sed -n 's/^step-0*\([0-9][0-9]*\)\.safetensors$/\1/p' | sort -n | tail -n1)
(cd "$work" && "$bin" --no-gui resume "$run" --steps $(( step + 1 )) 2>&1 | tail -n 3)
[ -s "$run/backbone.safetensors" ] || { echo "gui smoke: the headless resume did not finish the run" >&2; exit 1; }
echo "gui smoke: ok (screenshots in $out, the app's run resumed headless from step $step)"
