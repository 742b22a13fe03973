#!/usr/bin/env bash
# DBP end to end on a toy data set, no data of your own needed:
#   1. synthetic image-like embeddings and their keys (as a LAION embedding release would give them)
#   2. cluster_embeddings.py: faiss spherical k-means -> SemDeDup's sorted clusters
#   3. d_intra, d_inter, prune: the three commands of the upstream README
#   4. webdataset shards of the same samples, read back through the kept-key trie
# Usage: bash examples/demo.sh [OUT]   (default OUT: examples/demo_out; rerunning replaces only it)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
OUT="${1:-$HERE/demo_out}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
K=50

rm -rf "$OUT/data" "$OUT/semdedup" "$OUT/scores" "$OUT/run" "$OUT/shards"  # this demo's own outputs only
mkdir -p "$OUT"

echo "== 1. toy embeddings and keys"
"$PY" "$HERE/make_toy_clusters.py" --out "$OUT/data" --n 20000 --k "$K" --dim 64 --seed 0 --shard-size 1000 \
    --embeddings-only

echo "== 2. k-means into SemDeDup's sorted clusters"
"$PY" "$ROOT/cluster_embeddings.py" \
    --embeddings "$OUT/data/embeddings.npy" \
    --keys "$OUT/data/paths.txt" \
    --num_clusters "$K" \
    --save_folder "$OUT/semdedup"

echo "== 3. density-based pruning"
"$PY" "$ROOT/compute_avg_dist_to_cluster_centroid.py" \
    --num_clusters "$K" \
    --sorted_clusters_path "$OUT/semdedup/sorted_clusters" \
    --avg_distance_to_cent_save_path "$OUT/scores/dintra.npy"
"$PY" "$ROOT/compute_centroid_distances.py" \
    --num_clusters "$K" \
    --sorted_clusters_path "$OUT/semdedup/sorted_clusters" \
    --mean_centroid_distances_save_path "$OUT/scores/dinter.npy"
"$PY" "$ROOT/prune.py" \
    --num-centroids "$K" \
    --mean_centroid_distances_save_path "$OUT/scores/dinter.npy" \
    --avg_distance_to_cent_save_path "$OUT/scores/dintra.npy" \
    --sorted-clusters-path "$OUT/semdedup/sorted_clusters" \
    --prune-ratio 0.3 \
    --save-dir "$OUT/run"

echo "== 4. the loader side: webdataset filtered by the trie"
"$PY" "$HERE/webdataset_demo.py" --paths "$OUT/data/paths.txt" --shards "$OUT/shards" \
    --keys "$OUT/run/kept_keys_trie.pkl"

echo "== done. outputs:"
echo "   embeddings, keys  $OUT/data/"
echo "   sorted clusters   $OUT/semdedup/sorted_clusters/  (+ kmeans_centroids.npy)"
echo "   d_intra, d_inter  $OUT/scores/"
echo "   pruning run       $OUT/run/  (kept_keys_trie.pkl, kept_keys.npy, quotas.png, cluster_stats.csv, ...)"
echo "   webdataset        $OUT/shards/"
