#!/usr/bin/env bash
# One call on the lent GPU machine: install what it lacks (wheels in .whl/, from ../shared/device/wheels.sh),
# then run the named steps in order; every result lands under $OUT. Usage (from the repository root):
#   bash benchmarks/device.sh smoke tune host tests prefill
#   bash benchmarks/device.sh decode-tests decode-tune decode-graph decode decode-host   (the KV-cache op; peers
#                                                                from .peers/, see below)
#   bash benchmarks/device.sh decode-tune decode-tune-deep decode-graph    (the shipped decode records)
#   bash benchmarks/device.sh decode-fa4 decode-flex             (with fa4_site.tar.xz in .peers/)
#   bash benchmarks/device.sh bwd-tests bwd-tune bwd  (the backward: GPU tests and training run, a tune of its
#                                                    floor's buckets into the card's bundle, the bench suites)
#   bash benchmarks/device.sh bwd-ab bwd-tests         (the backward's gated paths, atomic dQ and descriptors:
#                                                    the bench without and with them, then the GPU suite)
#   bash benchmarks/device.sh varlen-tests varlen-tune varlen   (flash_attn_varlen_func: GPU tests, a tune of bf16
#                                                    D 128 into the card's bundle, the suites with .peers/'s peer)
#   bash benchmarks/device.sh hf-gpu serve   (the transformers integration's and the serving example's GPU tests,
#                                            figures printed; the serving sweep, FlashCore against SDPA)
#   bash benchmarks/device.sh models-tune validate   (a resumable slice of the models plan into the card's bundle;
#                                            held-out buckets validated against the default)
# Decode peers: FlashInfer and flash-attn 4 ship in ../shared/peers/ (fi_site.tar.xz, fa4_site.tar.xz); copy one of
# them to .peers/ (git-ignored), carry .peers, and this script unpacks it onto PYTHONPATH.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site \
  && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
export PYTHONUNBUFFERED=1
DEEP_BUCKETS=8x8192x1,8x32768x1,128x8192x1
for peer in .peers/fi_site.tar.xz .peers/fa4_site.tar.xz; do      # one per call: both exceed the carry limit
  [[ -f $peer ]] || continue
  mkdir -p /tmp/peer && tar -xJf "$peer" -C /tmp/peer || exit 1
  export PYTHONPATH=/tmp/peer:/tmp/peer/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
done
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
gpu=$(python3 -c 'from flashcore.device import gpu_name; print(gpu_name())')     # h100, h200, ...: the records' GPU
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
# a retune after a template edit starts each study from the shipped bundle's configs (any op version)
seed=(); [[ -f tuning_db/bundles/$gpu.json ]] && seed=(--seed-bundle "tuning_db/bundles/$gpu.json")
# the shipped bundle (if any) with the records of tuning DB $1 in place of its own and of the old op version's
# (import keeps the faster record of a key); later steps use it
into_bundle() {
  local bundle=tuning_db/bundles/$gpu.json
  flashcore-tune export --db "$1" --gpu "$gpu" -o /tmp/new.json
  if [[ -f $bundle ]]; then flashcore-tune merge "$bundle" /tmp/new.json -o /tmp/merged.json
  else cp /tmp/new.json /tmp/merged.json; fi
  rm -f /tmp/bundle.db
  # --strict: a record the op rejects stops the step and keeps the bundle as it was
  flashcore-tune import --strict --db /tmp/bundle.db /tmp/merged.json || return 1
  flashcore-tune prune --db /tmp/bundle.db
  flashcore-tune export --db /tmp/bundle.db --gpu "$gpu" -o "$bundle"
  cp "$bundle" "$OUT/$gpu.json"
}
# a slice of a plan, resumable across calls: `flashcore-tune` with the rest of the arguments for $2 seconds into
# tuning DB $1 (under .scratch/: carry it, copy back $OUT/$3.db after the call), skipping the buckets it holds,
# report in $OUT/$3; then into the bundle
tune_slice() {
  local db=$1 budget=$2 name=$3; shift 3
  mkdir -p "$(dirname "$db")"
  flashcore-tune --gpu "$gpu" "$@" --budget "$budget" --storage memory "${seed[@]}" --db "$db" \
    --report "$OUT/$name" --quiet | tail -4
  cp "$db" "$OUT/$name.db"
  into_bundle "$db"
}
# the backward bench of the floor's shapes, with the gated paths $1 (atomic, tma: comma-separated) on for the card
bwd_bench() {
  local bench=(flashcore-bench)
  [[ -n $1 ]] && bench=(python3 benchmarks/probes/bwd_switched.py "$1")
  "${bench[@]}" --op attn_bwd --suite "${BWD_SUITE:-backward}" --bwd-head-dims 128 \
    --bwd-seqlens 2048,4096,8192,16384 --no-bwd-gqa --bwd-peers "${BWD_PEERS:-cudnn,flash,flex,fa}" \
    --warmup-ms 10 --rep-ms 40 --out "$OUT/bench${1:+-$1}" | tail -14
}
for step in "$@"; do
  echo "== $step ($(date +%T))"
  case $step in
    smoke)   python3 -m pytest -q -m gpu tests/test_forward_gpu.py -k "launch_plan or cuda_graph or fullgraph or large" 2>&1 | tail -5 ;;
    tune)    # the forward's default plan (bf16 / fp16, D 64 / 128 / 256, GQA 1 / 8, causal or not; S 512 / 2k / 8k):
             # a slice of $TUNE_S seconds into $TUNE_DB (default .scratch/$gpu-fwd.db)
             tune_slice "${TUNE_DB:-.scratch/$gpu-fwd.db}" "${TUNE_S:-320}" tune --kernels attn_fwd --trials 12 ;;
    host)    flashcore-bench --suite host --out "$OUT/bench" | tail -20 ;;
    tests)   python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -15 ;;
    prefill) flashcore-bench --suite prefill --peers cudnn,flash,flex --out "$OUT/bench" | tail -5 ;;
    decode-tune)
             flashcore-tune --gpu "$gpu" --kernels attn_decode --trials 10 --budget "${DECODE_TUNE_S:-300}" \
               "${seed[@]}" --db "$OUT/$gpu.db" --report "$OUT/tune-decode" --quiet | tail -4
             into_bundle "$OUT/$gpu.db" ;;
    decode-tune-deep)   # 40 trials where the floors are tight (after decode-tune): $DECODE_DEEP_BUCKETS in the layouts
                        # $DECODE_DEEP_PAGES (page sizes, 0: contiguous; default 0,16,128), by default
                        # batch 1 at 8k / 32k and batch 16 at 8k
             flashcore-tune --gpu "$gpu" --kernels attn_decode --buckets "${DECODE_DEEP_BUCKETS:-$DEEP_BUCKETS}" \
               --feature page_size=${DECODE_DEEP_PAGES:-0,16,128} --trials 40 --budget "${DECODE_DEEP_S:-400}" \
               "${seed[@]}" --db "$OUT/$gpu-deep.db" --report "$OUT/tune-decode-deep" --quiet | tail -4
             into_bundle "$OUT/$gpu-deep.db" ;;
    decode-tests)
             python3 -m pytest -q tests/test_kvcache_checks.py 2>&1 | tee "$OUT/gpu-tests-checks.log" | tail -2
             python3 -m pytest -q -m gpu tests/test_kvcache_gpu.py tests/test_kvcache.py tests/test_paged_cache.py \
               tests/test_bench_decode.py tests/test_generation.py 2>&1 | tee "$OUT/gpu-tests-kvcache.log" | tail -2 ;;
    decode-graph)
             flashcore-bench --op attn_decode --suite decode-graph --decode-peers cudnn,flash --warmup-ms 10 \
               --rep-ms 40 --out "$OUT/bench" | tail -30 ;;
    decode)  flashcore-bench --op attn_decode --suite decode --decode-peers cudnn,flash,flashinfer --warmup-ms 10 \
               --rep-ms 30 --out "$OUT/bench" | tail -30 ;;
    decode-fa4) flashcore-bench --op attn_decode --suite decode --decode-peers cudnn,fa4 --no-decode-default \
               --warmup-ms 10 --rep-ms 30 --out "$OUT/fa4" | tail -30 ;;
    decode-flex) flashcore-bench --op attn_decode --suite decode --decode-peers cudnn,flex --no-decode-default \
               --decode-batches 1,16 --decode-caches 8192,32768 --decode-layouts contiguous --no-decode-ragged \
               --warmup-ms 10 --rep-ms 30 --out "$OUT/flex" | tail -8 ;;
    decode-host) flashcore-bench --op attn_decode --suite decode-host --out "$OUT/bench" | tail -20 ;;
    varlen-tests)
             python3 -m pytest -q -m "gpu or gpu_extended" tests/test_varlen_gpu.py tests/test_varlen_tma.py 2>&1 \
               | tee "$OUT/gpu-tests-varlen.log" | tail -2
             python3 -m pytest -q -m gpu tests/test_bench_varlen.py tests/test_tune_varlen.py tests/test_paged_cache.py \
               2>&1 | tee "$OUT/gpu-tests-varlen-tools.log" | tail -2 ;;
    bwd-tests)   # the backward's GPU tests and the bf16 training run against SDPA
             python3 -m pytest -q -m gpu tests/test_backward_gpu.py tests/test_training.py 2>&1 \
               | tee "$OUT/gpu-tests-bwd.log" | tail -3 ;;
    bwd-tune)    # the backward's bf16 D 128 MHA buckets of the floor shapes (2k x 8 and 8k x 2 sequences, causal and
                 # not) in the schemes $BWD_DQ_ATOMIC (default false, the dQ kernel: what every card runs until
                 # attn_bwd.host.ATOMIC_DQ_ARCHS lists it; true: atomic dQ): a study per kernel (dK/dV, then dQ or
                 # the atomic scheme's convert), $BWD_TRIALS trials each
             flashcore-tune --gpu "$gpu" --kernels attn_bwd --dtypes bf16 --head-dims 128 --feature gqa_group=1 \
               --feature dq_atomic="${BWD_DQ_ATOMIC:-false}" \
               --buckets "${BWD_BUCKETS:-2048x2048x128,8192x8192x32}" --trials "${BWD_TRIALS:-6}" \
               --budget "${BWD_TUNE_S:-200}" --storage memory --db "$OUT/$gpu-bwd.db" --report "$OUT/tune-bwd" --quiet | tail -4
             into_bundle "$OUT/$gpu-bwd.db" ;;
    bwd)     # the floor's shapes (bf16 D 128 MHA, S 2k..16k, causal and not), backward alone; FA4 from .peers/;
             # $BWD_ON (atomic, tma: benchmarks/probes/bwd_switched.py) runs it with those gated paths on for the
             # card, report in $OUT/bench-$BWD_ON
             bwd_bench "${BWD_ON:-}" ;;
    bwd-ab)  # the same, as main runs it and then with $BWD_ON (default atomic,tma) on: a switch's A/B (about 2 min)
             bwd_bench "" && bwd_bench "${BWD_ON:-atomic,tma}" ;;
    varlen-probe) python3 benchmarks/probes/varlen_tma_ab.py 2>&1 | grep -v Warning | tail -30 ;;
    varlen-tune)    # the plan's causal bf16 D 128 specs (packed / pages of 16 / 128, GQA 1 / 4): the suites' rows
             flashcore-tune --gpu "$gpu" --kernels attn_varlen --dtypes bf16 --head-dims 128 --feature causal=true --trials 8 \
               --budget "${VARLEN_TUNE_S:-300}" --db "$OUT/$gpu-varlen.db" --report "$OUT/tune-varlen" --quiet | tail -4
             into_bundle "$OUT/$gpu-varlen.db" ;;
    varlen)  flashcore-bench --op attn_varlen --varlen-peers "${VARLEN_PEERS:-flashinfer,fa4,sdpa,nested,dense}" \
               --warmup-ms 10 --rep-ms 40 --out "$OUT/bench" | tail -40 ;;
    hf-gpu)  # transformers' attn_implementation="flashcore" on a 1B-class Llama against sdpa (bf16), its time per
             # generated token (also in $OUT/hf-generate.json), and the serving example's GPU tests; -s: figures print
             FLASHCORE_OUT=$OUT python3 -m pytest -q -s -m gpu tests/test_transformers_gpu.py \
               tests/test_serving_example.py 2>&1 | tee "$OUT/gpu-tests-hf.log" | grep -v Warning | tail -40 ;;
    serve)   # the serving example, FlashCore and SDPA, 8 / 32 / 128 requests arriving at once (after a warm-up pass
             # each): tokens/s and ms per output token, a markdown table and $OUT/serve.json
             python3 examples/serve.py --model small --sweep "${SERVE_SWEEP:-8,32,128}" --attention flashcore,sdpa \
               --max-prompt 512 --max-new 128 --chunk 256 --token-budget 2048 --json "$OUT/serve.json" 2>&1 \
               | tee "$OUT/serve.log" | tail -14 ;;
    models-tune)   # the models plan (flashcore/models.py): a slice of $MODELS_TUNE_S seconds into $MODELS_DB (default
                   # .scratch/models-$gpu.db), the ops in the order of $MODELS_KERNELS (the forward first: held-out
                   # validation needs it)
             tune_slice "${MODELS_DB:-.scratch/models-$gpu.db}" "${MODELS_TUNE_S:-420}" models --plan models \
               --kernels "${MODELS_KERNELS:-attn_fwd,attn_decode,attn_varlen,attn_bwd}" \
               --dtypes "${MODELS_DTYPES:-bf16}" --trials "${MODELS_TRIALS:-8}" ;;
    validate)  # issue 27's neighbour rule: the held-out buckets of $VALIDATE_ARGS' plan (default: the forward's bf16
               # plan) get the faster of the nearest record's config and the default, measured here (flashcore-tune
               # heldout --validate, the shipped bundle's records as the neighbours), then into the bundle
             rm -f /tmp/validated.db
             flashcore-tune heldout --gpu "$gpu" --validate --db /tmp/validated.db \
               ${VALIDATE_ARGS:---kernels attn_fwd --dtypes bf16} --report "$OUT/heldout" --quiet | tail -3
             into_bundle /tmp/validated.db ;;
    profile) python3 -m pytest -q -s -m gpu tests/test_profiler.py 2>&1 | tee "$OUT/gpu-tests-profile.log" | tail -30 ;;
    host-ab) # what a hot-path change costs: the host suites on the tree $HOST_BASE (default .scratch/base: the commit
             # before the change, `git archive`d there and carried) and on this one, in turns, $HOST_ROUNDS times (2)
             python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/base "${HOST_BASE:-.scratch/base}" \
               >/dev/null 2>&1 || exit 1
             for round in $(seq "${HOST_ROUNDS:-2}"); do
               for tree in base head; do
                 path=$PYTHONPATH; [[ $tree == base ]] && path=/tmp/base:$PYTHONPATH
                 # (from /tmp: `python3 -c` puts its working directory, this tree, first on sys.path)
                 (cd /tmp && PYTHONPATH=$path python3 -c 'import flashcore; print("==", flashcore.__file__)')
                 PYTHONPATH=$path flashcore-bench --suite host --out "$OUT/host-$tree-$round" | grep "^|" | tail -9
                 PYTHONPATH=$path flashcore-bench --op attn_decode --suite decode-host --out "$OUT/host-$tree-$round" \
                   | grep "^|" | tail -9
               done
             done ;;
    probe)   python3 "benchmarks/probes/${PROBE:-varlen_structure_ab}.py" 2>&1 | grep -v Warning \
               | tee "$OUT/probe-${PROBE:-varlen_structure_ab}.txt" | tail -40 ;;
    *)       echo "unknown step $step"; exit 2 ;;
  esac
done
