#!/usr/bin/env bash
# The paper's pipeline end to end on a toy data set, no data of your own needed:
#   1. synthetic image-like embeddings and their keys (as a LAION embedding release would give them),
#      a quarter of them near-repeats of others
#   2. cluster_embeddings.py with a large k, then deduplicate.py: SemDeDup's semantic deduplication
#   3. cluster_embeddings.py --subset: k-means of the rows deduplication kept
#   4. d_intra, d_inter, prune: the three commands of the upstream README
#   5. webdataset shards of the same samples, read back through the kept-key trie
# Usage: bash examples/demo.sh [OUT]   (default OUT: examples/demo_out; rerunning replaces only it)
#        DEMO_ROWS=5000 bash examples/demo.sh   (a smaller data set; default 20000)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
OUT="${1:-$HERE/demo_out}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
ROWS="${DEMO_ROWS:-20000}"
K=50            # concepts for DBP (the paper: 500 on LAION, 100 on DataComp)
K_DEDUP=200     # clusters to deduplicate within (SemDeDup: 50,000 on LAION-440M)
EPS=0.01        # a member goes when it is more than 99% similar to one kept before it

rm -rf "$OUT/data" "$OUT/dedup_clusters" "$OUT/dedup" "$OUT/semdedup" "$OUT/scores" "$OUT/run" "$OUT/shards"
mkdir -p "$OUT"

echo "== 1. toy embeddings and keys"
"$PY" "$HERE/make_toy_clusters.py" --out "$OUT/data" --n "$ROWS" --k "$K" --dim 64 --seed 0 --shard-size 1000 \
    --embeddings-only --duplicates 0.25

echo "== 2. deduplicate: k-means with a large k, then SemDeDup within each cluster"
"$PY" "$ROOT/cluster_embeddings.py" \
    --embeddings "$OUT/data/embeddings.npy" \
    --keys "$OUT/data/paths.txt" \
    --num_clusters "$K_DEDUP" \
    --save_folder "$OUT/dedup_clusters"
"$PY" "$ROOT/deduplicate.py" \
    --sorted_clusters_path "$OUT/dedup_clusters/sorted_clusters" \
    --eps 0.001 "$EPS" 0.05 \
    --save_folder "$OUT/dedup"

echo "== 3. k-means of the kept rows into SemDeDup's sorted clusters"
"$PY" "$ROOT/cluster_embeddings.py" \
    --embeddings "$OUT/data/embeddings.npy" \
    --keys "$OUT/data/paths.txt" \
    --subset "$OUT/dedup/eps_$EPS/kept_keys.npy" \
    --num_clusters "$K" \
    --save_folder "$OUT/semdedup"

echo "== 4. density-based pruning"
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

echo "== 5. the loader side: webdataset filtered by the trie"
"$PY" "$HERE/webdataset_demo.py" --paths "$OUT/data/paths.txt" --shards "$OUT/shards" \
    --keys "$OUT/run/kept_keys_trie.pkl"

echo "== done. outputs:"
echo "   embeddings, keys  $OUT/data/"
echo "   deduplication     $OUT/dedup/  (eps_<e>/kept_keys.npy, similarity.png, dedup_stats.csv, ...)"
echo "   sorted clusters   $OUT/semdedup/sorted_clusters/  (+ kmeans_centroids.npy)"
echo "   d_intra, d_inter  $OUT/scores/"
echo "   pruning run       $OUT/run/  (kept_keys_trie.pkl, kept_keys.npy, quotas.png, cluster_stats.csv, ...)"
echo "   webdataset        $OUT/shards/"
