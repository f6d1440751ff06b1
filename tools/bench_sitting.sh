#!/usr/bin/env bash
# One benchmark sitting beside TRL (docs/benchmarks.md): bench-trl's run_all.sh (TRL GRPO, RLOO, TRL 1.12's PPO,
# SFT, RM, DPO), then `rlhf bench` on the same tokenizer, prompts, SFT checkpoint and reward model, fp32 and bf16,
# then transformers' tiny generate. One JSON line per run on stdout; compare ratios only within one sitting, with
# nothing else running. Needs a release build (`cargo build --release -p rlhf`) and bench-trl (BENCH_TRL, default
# ../shared/bench-trl) whose run_all.sh has built $TRLBASE once (`FRESH=1 ./run_all.sh`).
set -u
cd "$(dirname "$0")/.."
BENCH_TRL="${BENCH_TRL:-$(cd .. && pwd)/shared/bench-trl}"
export TRLBASE="${TRLBASE:-/tmp/trlbase}" OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
R=target/release/rlhf
T="--tokenizer $TRLBASE/tokenizer"; P="--prompts $TRLBASE/data/prompts_train.jsonl"
D="--data $TRLBASE/data/sft_train.jsonl"; M="--model $TRLBASE/out/sft/final"; RM="--reward-model $TRLBASE/out/rm/final"
echo "# start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg) commit $(git rev-parse --short HEAD)"
(cd "$BENCH_TRL" && bash run_all.sh 2>"$TRLBASE/run_all.err")
for p in fp32 bf16; do
  $R bench grpo $T $P $M --steps 20 --precision $p 2>/dev/null
  $R bench rloo $T $P $M --steps 20 --precision $p 2>/dev/null
  $R bench ppo $T $P $M $RM --steps 20 --precision $p 2>/dev/null
  $R bench sft --shape tiny $T $D --steps 50 --precision $p 2>/dev/null
  $R bench rm $T --steps 50 --precision $p 2>/dev/null
  $R bench dpo $T --steps 50 --precision $p 2>/dev/null
done
$R bench grpo $T $P $M --steps 20 --backend candle 2>/dev/null
$R bench ppo $T $P $M $RM --steps 20 --backend candle 2>/dev/null
$R bench generate --shape tiny 2>/dev/null
$R bench generate --shape tiny --precision bf16 2>/dev/null
(cd "$BENCH_TRL" && "$TRLBASE/venv/bin/python" torch_tiny_generate.py 2>/dev/null)
echo "# end $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
