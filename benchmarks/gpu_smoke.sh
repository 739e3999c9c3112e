#!/usr/bin/env bash
# GPU smoke check: every CUDA path fixres has, on one GPU, offline, in a few minutes.
#
# Generates a small data set, then runs on CUDA (autocast + channels_last, fixres's defaults there):
#   eval, sweep (one pass, 4 sizes), finetune with the activation cache and without it,
#   a few training steps, and `torchrun --nproc_per_node=1` training (nccl backend);
#   then the throughput section (benchmarks/gpu_throughput.py; "no CUDA: skipped" without a GPU).
# Prints images/s for each step and exits non-zero at the first failure.
#
#   bash benchmarks/gpu_smoke.sh                 # needs a CUDA GPU; about 3-5 minutes
#   FIXRES_SMOKE_DEVICE=cpu bash benchmarks/gpu_smoke.sh   # dry run of the script's logic on a CPU
#
# Environment: PYTHON (default .venv/bin/python, else python3), FIXRES_SMOKE_MODEL (default resnet50,
# random init: nothing is downloaded), FIXRES_SMOKE_OUT (default runs/gpu_smoke).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEVICE=${FIXRES_SMOKE_DEVICE:-cuda}
MODEL=${FIXRES_SMOKE_MODEL:-resnet50}
OUT=${FIXRES_SMOKE_OUT:-runs/gpu_smoke}
CLASSES=4
FIX=("$PY" -m fixres)

if [ "$DEVICE" = cuda ]; then
  "$PY" - <<'EOF' || { echo "gpu_smoke: FAIL no CUDA device visible to torch" >&2; exit 1; }
import torch, sys
assert torch.cuda.is_available()
print(f"gpu_smoke: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
  SIZES=(train 128 test 160 sweep 128,160,224,288 batch 64)
  TRAIN_PER_CLASS=128; VAL_PER_CLASS=64
else
  echo "gpu_smoke: dry run on $DEVICE (logic only; the numbers mean nothing)"
  SIZES=(train 32 test 48 sweep 32,48 batch 8)
  TRAIN_PER_CLASS=8; VAL_PER_CLASS=4
  MODEL=${FIXRES_SMOKE_MODEL:-fixres_tiny_resnet}
fi
T=${SIZES[1]}; S=${SIZES[3]}; SWEEP=${SIZES[5]}; B=${SIZES[7]}
rm -rf "$OUT"; mkdir -p "$OUT"
COMMON=(--model "$MODEL" --num-classes "$CLASSES" --train-size "$T" --device "$DEVICE" --batch-size "$B" -q --json)

step() {  # step NAME PY_EXPR_FOR_IMAGES_PER_S -- command...; prints one line, fails loudly
  local name=$1 expr=$2; shift 3
  local t0=$SECONDS
  local rc=0
  "$@" > "$OUT/$name.json" 2> "$OUT/$name.err" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "gpu_smoke: FAIL $name (exit $rc): $(tail -n 3 "$OUT/$name.err" | tr '\n' ' ')" >&2
    exit 1
  fi
  "$PY" - "$OUT/$name.json" "$name" "$((SECONDS - t0))" "$expr" <<'EOF'
import json, sys
path, name, wall, expr = sys.argv[1:]
r = json.load(open(path))
rate = eval(expr, {}, {"r": r})
h = r.get("hparams", {})
prec = r.get("precision") or h.get("precision", "")
dist = f", {h['world_size']} process(es), backend {h['backend']}" if h.get("backend") else ""
print(f"gpu_smoke: ok   {name:<18} {rate:9.1f} images/s   wall {wall:>4} s   {prec}{dist}")
EOF
}

"${FIX[@]}" make-dataset --classes "$CLASSES" --train-per-class "$TRAIN_PER_CLASS" \
  --val-per-class "$VAL_PER_CLASS" --out "$OUT/data" -q > /dev/null
echo "gpu_smoke: data set $OUT/data ($CLASSES classes, $TRAIN_PER_CLASS + $VAL_PER_CLASS per class)"

step train 'r["images_per_s"]' -- \
  "${FIX[@]}" train "${COMMON[@]}" --data "$OUT/data" --epochs 2 --out "$OUT/train"
CKPT=(--checkpoint "$OUT/train/model.safetensors")
[ -f "$OUT/train/model.safetensors" ] || CKPT=(--random-init)  # random weights on purpose (a smoke test)

step eval 'r["images_per_s"]' -- \
  "${FIX[@]}" eval "${COMMON[@]}" "${CKPT[@]}" --data "$OUT/data" --test-size "$S" --out "$OUT/eval"
step sweep 'r["images_per_s"]' -- \
  "${FIX[@]}" sweep "${COMMON[@]}" "${CKPT[@]}" --data "$OUT/data" --test-sizes "$SWEEP" --out "$OUT/sweep"
FT_RATE='r["timing"]["batches"] * r["batch_size"] / max(r["timing"]["epochs_s"], 1e-9)'
step finetune-cached "$FT_RATE" -- \
  "${FIX[@]}" finetune "${COMMON[@]}" "${CKPT[@]}" --data "$OUT/data" --test-size "$S" --epochs 2 \
  --out "$OUT/ft_cached"
step finetune-uncached "$FT_RATE" -- \
  "${FIX[@]}" finetune "${COMMON[@]}" "${CKPT[@]}" --data "$OUT/data" --test-size "$S" --epochs 2 --no-cache \
  --out "$OUT/ft_uncached"
step torchrun-train 'r["images_per_s"]' -- \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m fixres train "${COMMON[@]}" \
  --data "$OUT/data" --epochs 1 --out "$OUT/torchrun"
"$PY" - "$OUT/torchrun-train.json" "$DEVICE" <<'EOF'
import json, sys
h = json.load(open(sys.argv[1]))["hparams"]
want = "nccl" if sys.argv[2] == "cuda" else "gloo"
assert h.get("backend") == want, f"torchrun ran without the {want} process group: {h.get('backend')}"
EOF

# The cached and uncached fine-tunes see the same batches: their accuracies must agree.
"$PY" - "$OUT" <<'EOF'
import json, sys
def last(p): return json.load(open(p))
a, b = (last(f"{sys.argv[1]}/finetune-{k}.json")["after"]["top1"] for k in ("cached", "uncached"))
print(f"gpu_smoke: finetune top-1 cached {a:.2f} vs uncached {b:.2f}")
assert abs(a - b) <= 2.0, "cached and uncached fine-tuning disagree"
EOF
# Throughput: images/s of eval at 128/224/384 and training at 128/224, the loader alone and
# end to end, and full-size JPEG decode CPU vs GPU. Only with CUDA; the CPU dry run checks the logic at
# tiny sizes and says plainly that the real measurement was skipped.
if [ "$DEVICE" = cuda ]; then
  "$PY" benchmarks/gpu_throughput.py --data "$OUT/data" --model "$MODEL" --batch-size "$B" --images 512 \
    || { echo "gpu_smoke: FAIL throughput" >&2; exit 1; }
else
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || echo "gpu_smoke: throughput: no CUDA: skipped (logic dry run at tiny sizes follows)"
  "$PY" benchmarks/gpu_throughput.py --data "$OUT/data" --device cpu --model "$MODEL" --eval-sizes 32,48 \
    --train-sizes 32 --batch-size "$B" --images 16 --workers 0 \
    || { echo "gpu_smoke: FAIL throughput (dry run)" >&2; exit 1; }
fi
echo "gpu_smoke: all steps passed"
