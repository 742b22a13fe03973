#!/usr/bin/env bash
# DBP end to end on a toy data set, no data of your own needed (well under a minute on 2 cores):
#   1. synthetic image-like embeddings -> faiss spherical k-means -> SemDeDup-style sorted clusters
#   2. d_intra, d_inter, prune: the three commands of the upstream README
#   3. webdataset shards of the same samples, read back through the kept-key trie
# Usage: bash examples/demo.sh [OUT]   (default OUT: examples/demo_out; rerunning replaces only it)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
OUT="${1:-$HERE/demo_out}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
K=50

rm -rf "$OUT/data" "$OUT/scores" "$OUT/run" "$OUT/shards"  # this demo's own outputs, nothing else
mkdir -p "$OUT"

echo "== 1. toy data: embeddings, spherical k-means, sorted clusters"
"$PY" "$HERE/make_toy_clusters.py" --out "$OUT/data" --n 20000 --k "$K" --dim 64 --seed 0 --shard-size 1000

echo "== 2. density-based pruning"
"$PY" "$ROOT/compute_avg_dist_to_cluster_centroid.py" \
    --num_clusters "$K" \
    --sorted_clusters_path "$OUT/data/sorted_clusters" \
    --avg_distance_to_cent_save_path "$OUT/scores/dintra.npy"
"$PY" "$ROOT/compute_centroid_distances.py" \
    --num_clusters "$K" \
    --sorted_clusters_path "$OUT/data/sorted_clusters" \
    --mean_centroid_distances_save_path "$OUT/scores/dinter.npy"
"$PY" "$ROOT/prune.py" \
    --num-centroids "$K" \
    --mean_centroid_distances_save_path "$OUT/scores/dinter.npy" \
    --avg_distance_to_cent_save_path "$OUT/scores/dintra.npy" \
    --sorted-clusters-path "$OUT/data/sorted_clusters" \
    --total-dataset-size 20000 \
    --prune-ratio 0.3 \
    --save-dir "$OUT/run"

echo "== 3. the loader side: webdataset filtered by the trie"
"$PY" "$HERE/webdataset_demo.py" --paths "$OUT/data/paths.txt" --shards "$OUT/shards" \
    --keys "$OUT/run/kept_keys_trie.pkl"

echo "== done. outputs:"
echo "   sorted clusters   $OUT/data/sorted_clusters/  (+ kmeans_centroids.npy)"
echo "   d_intra, d_inter  $OUT/scores/"
echo "   pruning run       $OUT/run/  (kept_keys_trie.pkl, kept_keys.npy, quotas.png, cluster_stats.csv, ...)"
echo "   webdataset        $OUT/shards/"
