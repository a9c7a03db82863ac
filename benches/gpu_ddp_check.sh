#!/usr/bin/env bash
# One-GPU check of the distributed path (issue 12): torchrun with world size 1, NCCL,
# cuda:LOCAL_RANK, bf16 autocast, PCGrad on the torch backend, a tiny budget.
# Prints the run's console lines and the training steps/s measured from metrics.jsonl.
#
#   benches/gpu_ddp_check.sh                 # data from $MTBERT_DATA (or ./data, ../shared/data)
#   MODEL=/path/to/bert STEPS=40 benches/gpu_ddp_check.sh
#
# Needs: CUDA, the mtbert package importable (PYTHONPATH=python with the native .so, or an
# install), the handout data and the embedded MiniLM (or MODEL=an HF BERT folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-${OUT:-/tmp}/gpu-ddp-check}
STEPS=${STEPS:-30}
export PYTHONPATH=${PYTHONPATH:-$PWD/python}
export PYTHONUNBUFFERED=1

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"
rm -rf "$OUT_DIR"
model_args=()
[ -n "${MODEL:-}" ] && model_args=(--model "$MODEL")
"$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m mtbert train "${model_args[@]}" \
    --device cuda --precision bf16 --combine pcgrad --max-steps "$STEPS" --log-every 10 \
    --train-limit 2000 --eval-limit 256 --batch-size 16 --save-every "$STEPS" \
    --no-progress --no-predict --out "$OUT_DIR"
"$PY" - "$OUT_DIR" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
train = [r for r in lines if r["type"] == "train"]
state = json.loads((out / "last" / "training_state.json").read_text())
tasks = len(train[-1]["loss"])
# steps/s from the windows after the first (the first holds CUDA warm-up)
rates = [r["examples_per_s"] / (tasks * state["global_batch"]) for r in train[1:]] or \
        [train[0]["examples_per_s"] / (tasks * state["global_batch"])]
print(f"world size {state['world_size']}, global batch {state['global_batch']}, "
      f"steps {state['step']}, last losses {train[-1]['loss']}")
print(f"steps/s (after warm-up): {sum(rates) / len(rates):.2f}")
assert all(v == v for v in train[-1]["loss"].values()), "NaN loss"
PYEOF
echo "gpu ddp check: OK"
