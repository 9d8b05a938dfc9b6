#!/usr/bin/env bash
# The CUDA path end to end, on hymenoptera: train the head (features through torch on the GPU, bf16 autocast,
# channels_last), fine-tune (stage 2 on the GPU), predict, and a 2-GPU torchrun fine-tune when there are two GPUs;
# prints images/s and accuracy for each, every figure measured. One call of at most 10 minutes on a fresh GPU
# machine that has the repo (it runs `make install` first when .venv is missing).
#
#   bench/gpu.sh              on the GPU (fails in one line where torch sees none)
#   bench/gpu.sh --cpu        the same steps on the CPU, to exercise the script where no GPU is lent (slow)
#   bench/gpu.sh --check      only the early checks (data, venv, GPU, budget), then stop
#   bench/gpu.sh --quick      fewer epochs (a smoke run of every step)
#
# Data: $HEADSTART_DATA, else shared/data, ../shared/data or /work/shared/data (the first with hymenoptera/).
# Budget: $GPU_BENCH_BUDGET_S seconds in all (default 570); each step gets what is left, and a step that would
# start with under 30 s left is skipped and says so. Cache: a fresh one under the work folder ($GPU_BENCH_WORK),
# except the backbone weights, which come from $HEADSTART_CACHE (or the user cache) when it has them.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

DEVICE=cuda CHECK_ONLY=0 QUICK=0
for arg in "$@"; do
  case $arg in
    --cpu) DEVICE=cpu ;;
    --check) CHECK_ONLY=1 ;;
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "error: unknown flag $arg (see bench/gpu.sh --help)"; exit 2 ;;
  esac
done
START=$SECONDS
BUDGET=${GPU_BENCH_BUDGET_S:-570}
WORK=${GPU_BENCH_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/headstart-gpu.XXXXXX")}
mkdir -p "$WORK"
left() { echo $((BUDGET - (SECONDS - START))); }
die() { echo "error: $1"; exit 2; }

# --- data ---------------------------------------------------------------------------------------------------
DATA=""
for d in "${HEADSTART_DATA:-}" shared/data ../shared/data /work/shared/data; do
  if [ -n "$d" ] && [ -d "$d/hymenoptera/train" ] && [ -d "$d/hymenoptera/val" ]; then DATA=$(cd "$d" && pwd); break; fi
done
[ -n "$DATA" ] || die "no hymenoptera/{train,val} under \$HEADSTART_DATA, shared/data, ../shared/data or /work/shared/data"
TRAIN=$DATA/hymenoptera/train VAL=$DATA/hymenoptera/val

# --- venv: make install where it is missing (pip may take minutes: it is counted in the budget) -------------------
if [ ! -x .venv/bin/headstart ]; then
  echo "no .venv: make install ($(left) s left)"
  timeout "$(( $(left) / 2 ))" make install >"$WORK/install.log" 2>&1 || die "make install failed: $(tail -1 "$WORK/install.log")"
fi
PY=.venv/bin/python HS=.venv/bin/headstart TORCHRUN=.venv/bin/torchrun
[ -x "$PY" ] && [ -x "$HS" ] || die ".venv has no python or headstart; run make install"

# --- the GPU --------------------------------------------------------------------------------------------------
NGPU=0
if [ "$DEVICE" = cuda ]; then
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
  [ "$NGPU" -ge 1 ] 2>/dev/null || die "torch sees no CUDA GPU ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1)); on a machine without one run bench/gpu.sh --cpu"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | sed 's/^/gpu /'
fi
echo "data $DATA; device $DEVICE; $NGPU GPU(s); work $WORK; budget $(left) s"
[ "$CHECK_ONLY" = 1 ] && { echo "checks ok"; exit 0; }

# A cache of its own, so every figure is a cold extraction; the weights (not what is measured) are shared with it.
USER_CACHE=${HEADSTART_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/headstart}
export HEADSTART_CACHE=$WORK/cache HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
mkdir -p "$HEADSTART_CACHE"
[ -d "$USER_CACHE/weights" ] && [ ! -e "$HEADSTART_CACHE/weights" ] && ln -s "$USER_CACHE/weights" "$HEADSTART_CACHE/weights"
EPOCHS=() ; [ "$QUICK" = 1 ] && EPOCHS=(--epochs 10 --finetune-epochs 2)

ROWS=() FAILED=0
row() { ROWS+=("$(printf '%-22s %10s %12s %10s  %s' "$@")"); }
# step NAME TIMEOUT_FLOOR COMMAND...: runs the command with what is left of the budget, its log in WORK/NAME.log
step() {
  local name=$1; shift
  local t; t=$(left)
  if [ "$t" -lt 30 ]; then echo "skip $name: $t s left of the budget"; row "$name" - - - "skipped: budget"; FAILED=1; return 1; fi
  local t0=$SECONDS
  if ! timeout "$t" "$@" >"$WORK/$name.log" 2>&1; then
    echo "FAIL $name: $(grep -v '^\s*$' "$WORK/$name.log" | tail -1)"; row "$name" - - - "failed (see $WORK/$name.log)"; FAILED=1; return 1
  fi
  echo "$name done in $((SECONDS - t0)) s"
}
# figures NAME MODEL: images/s of the model's feature extraction or fine-tuning (from headstart.json) and its
# accuracy on hymenoptera/val scored on DEVICE, and the scoring pass's own images/s (predict through the API)
figures() {
  "$PY" - "$2" "$VAL" "$DEVICE" "$1" <<'PY'
import json, sys, time
from pathlib import Path
from headstart import ImageClassifier
model, val, device, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
meta = json.loads((model / "headstart.json").read_text())
fit = meta["fit"]
n_train = sum(fit["counts"].get("train", {}).values()) + sum(fit["counts"].get("val", {}).values())
timings = fit["timings"]
stage2 = fit["decision"].get("stage2")
if stage2:
    epochs = len(stage2["history"]["train_loss"])
    train_ips = sum(fit["counts"]["train"].values()) * epochs / timings["finetune_s"]
    what = f"fine-tune {epochs} epochs, kept {fit['decision']['kept']}"
else:
    train_ips = n_train / timings["features_s"]
    what = f"features of {n_train} images"
clf = ImageClassifier.load(model, device=device)
t0 = time.perf_counter()
rows = clf.predict_table(val)
predict_s = time.perf_counter() - t0
acc = clf.score(val)
dist = meta.get("distributed", {})
print(f"{name}\t{train_ips:.1f}\t{len(rows) / predict_s:.1f}\t{acc:.4f}\t{what}; world {dist.get('world_size', 1)} "
      f"{dist.get('backend') or ''}".rstrip())
PY
}
record() {  # record NAME MODEL: a table row from `figures`
  local out; out=$(figures "$1" "$2" 2>"$WORK/$1.figures.log" | tail -1)
  if [ -z "$out" ]; then row "$1" - - - "figures failed (see $WORK/$1.figures.log)"; FAILED=1; return 1; fi
  IFS=$'\t' read -r n tips pips acc what <<<"$out"
  row "$n" "$tips" "$pips" "$acc" "$what"
}

# 1. the head: features extracted on DEVICE into a cold cache
step head "$HS" train "$TRAIN" --strategy head --device "$DEVICE" "${EPOCHS[@]}" --out "$WORK/head" && record head "$WORK/head"
# 2. fine-tuning: the boundary store, then stage 2 on DEVICE (bf16 autocast and channels_last on CUDA)
step finetune "$HS" train "$TRAIN" --strategy finetune --device "$DEVICE" "${EPOCHS[@]}" --out "$WORK/finetune" \
  && record finetune "$WORK/finetune"
# 3. predict through the CLI (auto picks the GPU where there is one), one row per image
t0=$SECONDS
# shellcheck disable=SC2016  # $0..$3 are the inner shell's arguments
if step predict bash -c '"$0" predict "$1" "$2" --format csv >"$3"' "$HS" "$WORK/head" "$VAL" "$WORK/predict.csv"; then
  n=$(($(wc -l <"$WORK/predict.csv") - 1)); want=$(find "$VAL" -type f | wc -l)
  [ "$n" -eq "$want" ] || { echo "FAIL predict: $n rows for $want images"; FAILED=1; }
  row "predict-cli" - "$(python3 -c "print(round($n / max(1, $SECONDS - $t0), 1))")" - "$n rows, process start included"
fi
# 4. two GPUs: one DDP run (NCCL), rank 0 alone prints and writes
if [ "$NGPU" -ge 2 ]; then
  if step ddp "$TORCHRUN" --standalone --nproc-per-node 2 -m headstart train "$TRAIN" --strategy finetune \
      --device cuda "${EPOCHS[@]}" --out "$WORK/ddp"; then
    n=$(grep -c "headstart train" "$WORK/ddp.log")
    [ "$n" = 1 ] || { echo "FAIL ddp: the summary was printed $n times"; FAILED=1; }
    record ddp-2gpu "$WORK/ddp"
  fi
else
  row "ddp-2gpu" - - - "skipped: $NGPU GPU(s)"
fi

echo
printf '%-22s %10s %12s %10s  %s\n' step "train img/s" "predict img/s" "val acc" "what"
printf '%s\n' "${ROWS[@]}"
echo "device $DEVICE, $((SECONDS - START)) s in all; logs in $WORK"
exit "$FAILED"
