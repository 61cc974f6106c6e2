#!/usr/bin/env bash
# The GPU runs behind the README's speed table and the open proofs, each one `optc bench`
# process (or script) writing its JSON to OUT_DIR, run in the order given. With BUDGET_S set,
# a run is started only if its usual length (the second field below) fits the time left, and
# is stopped when the budget runs out (its bench JSON, rewritten after every row, keeps the
# rows it finished). The target is the GPU present (h200 or h100).
#   BUDGET_S=570 benchmarks/proof_runs.sh OUT_DIR RUN...
#   runs: gpu-tests artifact-load artifact-bench llama1b llama1b-carried llama8b passes encoders-b1 (or vit-b1,
#         bert-b1) merge-vit merge-bert prune attention-shapes merge-profile
set -uo pipefail
out=$1; shift
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
start=$(date +%s) budget=${BUDGET_S:-100000}
case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in
  *H200*) target=h200;; *H100*) target=h100;; *) echo "no H100 or H200 here" >&2; exit 2;;
esac
left() { echo $(( budget - ($(date +%s) - start) )); }
run() {  # name seconds-it-usually-takes command...
  local name=$1 needs=$2; shift 2
  if [ "$(left)" -lt "$needs" ]; then echo "skipped $name: $(left) s left, it takes about $needs"; return; fi
  local t=$(date +%s)
  timeout $(( $(left) - 5 )) "$@" > "$out/$name.log" 2>&1
  echo "$name exit $? after $(( $(date +%s) - t )) s ($(left) s left)"
}
bench=(python3 -m optc.cli bench --target "$target")  # `timeout` runs commands, not functions
vs_max=(--baselines inductor-max --rounds 2)
# Encoder rows lower without autotune: Inductor's GEMM autotune of a pruned ViT-B/16 at batch 64
# alone outlasts a run (results/bench_prune_vitb16_b64_h100_partial.json); it only slows optc.
enc=(--no-autotune)
# Rows with optc's masked-attention kernel where the target leaves it off (bench refuses a
# variant that repeats the target's own setting).
kernel_off=$(python3 -c "from optc.compiler import targets; print(int(not targets.get('$target').encoder_attention))")
kernel() {  # the variant words a row with the kernel adds to
  if [ "$kernel_off" = 1 ]; then with_kernel=(--variant "$* target.encoder_attention=true"); else with_kernel=(); fi
}
# ViT rows with the target's patch embedding switched the other way (codegen/patch_gemm).
patch_other=$(python3 -c "from optc.compiler import targets; print(str(not targets.get('$target').patch_gemm).lower())")
with_patch=(--variant "target.patch_gemm=$patch_other")
for r in "$@"; do case $r in
  gpu-tests) run gpu-tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu "$here/../tests/gpu" ;;
  artifact-load) run artifact-load 300 bash "$here/load_on_a_fresh_machine.sh" llama-1b "$target" "$out/load" 1 ;;
  # The artifact's decode against the same configuration lowered fresh in the same process;
  # inductor-max is the llama1b run's.
  artifact-bench) run artifact-bench 150 "${bench[@]}" llama-1b --baselines "" --rounds 2 --tokens 64 \
      --artifact "$out/load/cold.optc" --out "$out/bench_llama1b_artifact_$target.json" ;;
  llama1b) run llama1b 200 "${bench[@]}" llama-1b "${vs_max[@]}" --tokens 64 \
      --out "$out/bench_llama1b_dense_$target.json" ;;
  # Issue 15's two processes: one compile's kernel configurations carried into two fresh bench
  # processes (--tuning-from), each against inductor-max (carried_tuning.sh).
  llama1b-carried) run llama1b-carried 520 bash "$here/carried_tuning.sh" llama-1b "$target" "$out/carried" 2 0 \
      inductor-max ;;
  llama8b) run llama8b 400 "${bench[@]}" llama-8b "${vs_max[@]}" --tokens 64 \
      --out "$out/bench_llama8b_dense_$target.json" ;;
  passes) run passes 400 "${bench[@]}" llama-1b "${vs_max[@]}" --tokens 64 --variant "skip_layers.count=4" \
      --variant "skip_layers.count=4 skip_layers.granularity=block" --variant "sparsify_activations.sparsity=0.5" \
      --variant "sparsify_activations.sparsity=0.5 sparsify_activations.method=cats" \
      --out "$out/bench_llama1b_passes_$target.json" ;;
  encoders-b1|vit-b1|bert-b1)
    [ $r = bert-b1 ] || run vit-b1 200 "${bench[@]}" vit-b16 --batch 1 "${vs_max[@]}" "${enc[@]}" \
      --variant "merge_tokens.r=13" "${with_patch[@]}" --out "$out/bench_vitb16_b1_$target.json"
    [ $r = vit-b1 ] || run bert-b1 150 "${bench[@]}" bert-base --batch 1 "${vs_max[@]}" "${enc[@]}" \
      --variant "merge_tokens.r=8" --out "$out/bench_bert_base_b1_$target.json" ;;
  merge-vit) kernel merge_tokens.r=13
    run merge-vit 300 "${bench[@]}" vit-b16 --batch 64 "${vs_max[@]}" "${enc[@]}" --variant "merge_tokens.r=8" \
      --variant "merge_tokens.r=13" --variant "merge_tokens.r=16" "${with_kernel[@]}" "${with_patch[@]}" \
      --out "$out/bench_vitb16_b64_merge_$target.json" ;;
  merge-bert)
    run merge-bert-s128 200 "${bench[@]}" bert-base --batch 32 --seq 128 "${vs_max[@]}" "${enc[@]}" \
      --variant "merge_tokens.r=8" --variant "merge_tokens.r=16" \
      --out "$out/bench_bert_base_b32_s128_merge_$target.json"
    kernel merge_tokens.r=64
    run merge-bert-s512 250 "${bench[@]}" bert-base --batch 32 --seq 512 "${vs_max[@]}" "${enc[@]}" \
      --variant "merge_tokens.r=32" --variant "merge_tokens.r=64" "${with_kernel[@]}" \
      --out "$out/bench_bert_base_b32_s512_merge_$target.json" ;;
  prune)
    run prune-llama1b 250 "${bench[@]}" llama-1b "${vs_max[@]}" --tokens 64 --variant "prune_mlp.ratio=0.25" \
      --out "$out/bench_prune_mlp_llama1b_$target.json"
    run prune-bert 200 "${bench[@]}" bert-base --batch 32 --seq 128 "${vs_max[@]}" "${enc[@]}" \
      --variant "prune_mlp.ratio=0.3 prune_heads.ratio=0.25" --out "$out/bench_prune_bert_base_b32_$target.json"
    run prune-vit 250 "${bench[@]}" vit-b16 --batch 64 "${vs_max[@]}" "${enc[@]}" \
      --variant "prune_mlp.ratio=0.3 prune_heads.ratio=0.25" --out "$out/bench_prune_vitb16_b64_$target.json" ;;
  attention-shapes)
    run attention-merged 90 python3 "$here/experiments/merged_attention.py" --out "$out/merged_attention_$target.json"
    run attention-padded 90 python3 "$here/experiments/merged_attention.py" --mask padding --batch 32 \
      --tokens 128,512 --out "$out/padded_attention_$target.json" ;;
  merge-profile) run merge-profile 150 python3 "$here/forward_profile.py" --model vit-b16 --batch 1 --variant "" \
      --variant "merge_tokens.r=4" --variant "merge_tokens.r=13" \
      --out "$out/forward_profile_vitb16_b1_merge_$target.json" ;;
  *) echo "unknown run '$r'" >&2; exit 2 ;;
esac; done
