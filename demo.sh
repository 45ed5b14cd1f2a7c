#!/usr/bin/env bash
# The embedded default: M3 fine-tuning curriculum (warm-up dense -> all heads -> unified with self-distillation)
# on SciFact with all-MiniLM-L6-v2 on CPU, then eval.py's table on SciFact test beside the reference implementation's
# rows at the same budget. About 14 minutes on 2 idle cores.
# Stages chain checkpoint to checkpoint; each has its own seed so it draws new batches rather than the first ones again.
#   bash demo.sh                 # the full demo
#   PRETRAIN=1 bash demo.sh      # first a pre-training stage on SciFact's (title -> abstract) pairs, all 3 stages
#   QUICK=1 bash demo.sh         # a few steps and a small corpus slice: checks the pipeline in ~1 minute (CI)
# A rerun replaces the previous demo's runs (train.py --overwrite=true); OUT=DIR keeps them apart.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/demo}
if [ "${QUICK:-0}" = 1 ]; then
    S0=2 S1=2 S2=2 S3=2 EVAL=(--max_corpus=20 --passage_max_len=32)
else
    S0=60 S1=20 S2=40 S3=40 EVAL=(--passage_max_len=256)
fi
INIT=()
TIMES=()
stage() {  # stage NAME command...: run it and remember its wall time
    local name=$1 t0=$SECONDS
    shift
    "$@"
    TIMES+=("$name=$((SECONDS - t0))s")
}
if [ "${PRETRAIN:-0}" = 1 ]; then  # unsupervised pairs as the paper builds them: title -> body
    mkdir -p $OUT
    python -c 'import json, sys
for line in open("data/scifact/corpus.jsonl"):
    d = json.loads(line)
    if d["title"].strip() and d["text"].strip():
        print(json.dumps({"query": d["title"], "pos": [d["text"]]}))' > $OUT/pretrain_pairs.jsonl
    stage 0_pretrain python train.py configs/demo_pretrain.yaml --max_steps=$S0 --train_data=$OUT/pretrain_pairs.jsonl \
        --out_dir=$OUT/0_pretrain --overwrite=true "$@"
    INIT=(--init_from=$OUT/0_pretrain/final)
fi
stage 1_dense python train.py configs/demo.yaml --max_steps=$S1 --out_dir=$OUT/1_dense --overwrite=true \
    "${INIT[@]}" "$@"
stage 2_all_heads python train.py configs/demo.yaml --max_steps=$S2 --head_schedule=dense,sparse,colbert --seed=43 \
    --init_from=$OUT/1_dense/final --out_dir=$OUT/2_all_heads --overwrite=true "$@"
stage 3_unified python train.py configs/demo.yaml --max_steps=$S3 --head_schedule=dense,sparse,colbert --seed=44 \
    --self_distill=true --init_from=$OUT/2_all_heads/final --out_dir=$OUT/3_unified --overwrite=true "$@"
stage eval python eval.py --ckpt $OUT/3_unified/final --data data/scifact --split test "${EVAL[@]}" --out $OUT/eval
python bench/quality.py --beside $OUT/eval/metrics.json
echo "wall time per stage: ${TIMES[*]}" | tee $OUT/wall_times.txt
