#!/usr/bin/env bash
# The paper's five steps from images, on toy data, with no download:
#   0. webdataset shards of synthetic images (img2dataset's layout), and a tiny random DINOv2 in a folder
#   1. compute_embeddings.py: the images to embeddings, in clip-retrieval's layout
#   2. cluster_embeddings.py with a large k, then deduplicate.py (SemDeDup)
#   3. cluster_embeddings.py --subset: k-means of the rows kept
#   4. d_intra and d_inter, 5. prune.py
#   then the shards read back through the kept keys, as a training loader would,
#   6. make_report.py: the HTML report of what was kept and cut (open OUT/report/index.html)
# Usage: bash examples/images_demo.sh [OUT]   (default OUT: examples/images_demo_out; rerunning replaces only it)
#        IMAGES=400 bash examples/images_demo.sh   (default 800 images, 100 a shard)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
OUT="${1:-$HERE/images_demo_out}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
IMAGES="${IMAGES:-800}"
SHARDS=$(( (IMAGES + 99) / 100 - 1 ))

rm -rf "$OUT/shards" "$OUT/model" "$OUT/emb" "$OUT/c1" "$OUT/dedup" "$OUT/c2" "$OUT/scores" "$OUT/run" "$OUT/report"
mkdir -p "$OUT"

echo "== 0. synthetic images in webdataset shards, and a tiny random DINOv2"
"$PY" "$HERE/make_toy_images.py" --shards "$OUT/shards" --images "$IMAGES" --per-shard 100 --model "$OUT/model"

echo "== 1. embed the images"
"$PY" "$ROOT/compute_embeddings.py" --shards "$OUT/shards/{00000..$(printf %05d "$SHARDS")}.tar" \
    --output_folder "$OUT/emb" --model "$OUT/model" --batch-size 64

echo "== 2. deduplicate"
"$PY" "$ROOT/cluster_embeddings.py" --embeddings "$OUT/emb/img_emb" --num_clusters 16 --save_folder "$OUT/c1"
"$PY" "$ROOT/deduplicate.py" --sorted_clusters_path "$OUT/c1/sorted_clusters" --eps 0.001 --save_folder "$OUT/dedup"

echo "== 3. k-means of the kept rows"
"$PY" "$ROOT/cluster_embeddings.py" --embeddings "$OUT/emb/img_emb" --subset "$OUT/dedup/eps_0.001/kept_keys.npy" \
    --num_clusters 8 --save_folder "$OUT/c2"

echo "== 4. d_intra and d_inter"
"$PY" "$ROOT/compute_avg_dist_to_cluster_centroid.py" --sorted_clusters_path "$OUT/c2/sorted_clusters" \
    --avg_distance_to_cent_save_path "$OUT/scores/dintra.npy"
"$PY" "$ROOT/compute_centroid_distances.py" --sorted_clusters_path "$OUT/c2/sorted_clusters" \
    --mean_centroid_distances_save_path "$OUT/scores/dinter.npy" --num_NNs 5

echo "== 5. prune"
"$PY" "$ROOT/prune.py" --mean_centroid_distances_save_path "$OUT/scores/dinter.npy" \
    --avg_distance_to_cent_save_path "$OUT/scores/dintra.npy" --sorted-clusters-path "$OUT/c2/sorted_clusters" \
    --prune-ratio 0.5 --save-dir "$OUT/run"

echo "== the shards through the kept keys"
"$PY" - "$ROOT" "$OUT" "$SHARDS" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np, webdataset as wds, dbp_utils
out, last = sys.argv[2], int(sys.argv[3])
kept = dbp_utils.webdataset_filter(f"{out}/run/kept_keys.npy")  # flat keys (image_path): matched to __key__
samples = wds.WebDataset(f"{out}/shards/{{00000..{last:05d}}}.tar", shardshuffle=False).select(kept)
count = sum(1 for _ in samples)
print(f"webdataset: the filter let through {count} samples; kept_keys.npy holds "
      f"{len(np.load(f'{out}/run/kept_keys.npy'))}")
EOF

echo "== 6. the report"
"$PY" "$ROOT/make_report.py" --prune-dir "$OUT/run" --dedup-dir "$OUT/dedup" \
    --shards "$OUT/shards/{00000..$(printf %05d "$SHARDS")}.tar" --save_folder "$OUT/report"
echo "open $OUT/report/index.html in a browser"
