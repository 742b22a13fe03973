"""d_inter: how far each k-means centroid is from its neighbours.

Reads the k-means centroids (SemDeDup's kmeans_centroids.npy, float32 (k, dim)), L2-normalises
them and writes a float32 array of shape (k,) whose entry j is the mean cosine distance
(1 - cosine similarity) from centroid j to its --num_NNs nearest *other* centroids, found with
faiss. Without --centroids_file the centroids are looked up in the sorted clusters folder and in
SemDeDup's save folder above it; the cluster files there fix k. An empty cluster whose centroid is
NaN (no member defines it, as when converted from NeMo Curator without saved centroids) gets NaN.

    python compute_centroid_distances.py --num_clusters 500 --sorted_clusters_path SORTED \\
        --mean_centroid_distances_save_path OUT/dinter.npy
    python compute_centroid_distances.py --centroids_file kmeans_centroids.npy \\
        --mean_centroid_distances_save_path OUT/dinter.npy --num_NNs 20

(Installed with pip, `dbp-dinter` is the same command as `python compute_centroid_distances.py`.)
"""
import numpy as np

import dbp_utils as du
from dbpkit import cli, savedir
from dbpkit.clusters import find_centroids, load_centroids, save_scores, scan_clusters
from dbpkit.errors import UsageError


def parse_args():
    parser = cli.make_parser(__doc__)
    cli.add_flag(parser, "--num_clusters", type=int, default=None,
                 help="number of k-means clusters k (default: the number of cluster files, or of "
                      "centroids when only --centroids_file is given)")
    cli.add_flag(parser, "--sorted_clusters_path", default=None,
                 help="folder of SemDeDup's sorted cluster files; kmeans_centroids.npy is looked up "
                      "here and in its parent folder")
    cli.add_flag(parser, "--centroids_file", default=None,
                 help="the k-means centroids .npy, shape (k, dim) (default: found beside the clusters)")
    cli.add_flag(parser, "--mean_centroid_distances_save_path", required=True,
                 help="the .npy file to write d_inter to (folders are created; with a .dbp.json sidecar beside "
                      "it saying what it holds)")
    cli.add_flag(parser, "--num_NNs", type=int, default=20,
                 help="l, the number of nearest other centroids averaged over (default: 20; "
                      "l >= k uses all k-1 others)")
    cli.add_flag(parser, "--dim", type=int, default=None,
                 help="embedding dimension, checked against the centroids (default: the file's)")
    cli.add_flag(parser, "--overwrite", action="store_true", help="replace an existing output file")
    cli.add_flag(parser, "--workers", type=int, default=None,
                 help="threads for faiss (default: all cores)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cli.absolute_paths(args, "sorted_clusters_path", "centroids_file", "mean_centroid_distances_save_path")
    workers = cli.num_workers(args.workers)
    if args.num_NNs < 1:
        raise UsageError("--num_NNs", f"{args.num_NNs} is less than 1", "pass 1 or more (default 20)")
    k, sizes, empty, clusters = args.num_clusters, None, None, []
    if args.sorted_clusters_path or not args.centroids_file:
        clusters = scan_clusters(args.sorted_clusters_path, k, "--sorted_clusters_path", "--num_clusters")
        sizes = np.array([c.rows for c in clusters])
        k, empty = len(clusters), sizes == 0
    elif k is not None and k < 1:
        raise UsageError("--num_clusters", f"{k} is less than 1", "pass the number of k-means clusters")
    centroids_file = args.centroids_file or find_centroids(args.sorted_clusters_path)
    out = args.mean_centroid_distances_save_path
    savedir.check_output_file(out, "--mean_centroid_distances_save_path", args.overwrite,
                              [centroids_file, *(c.path for c in clusters)])
    centroids = load_centroids(centroids_file, k, args.dim, "--centroids_file", empty)
    k = len(centroids)
    if args.num_NNs >= k:
        cli.log.warning(f"--num_NNs {args.num_NNs} >= k = {k}: averaging over all {k - 1} other centroids")

    d_inter = du.mean_centroid_distances(centroids, args.num_NNs, workers)

    save_scores(out, d_inter, "d_inter", args.sorted_clusters_path, sizes)
    print(f"d_inter of {k} centroids (dim {centroids.shape[1]}, {min(args.num_NNs, k - 1)} neighbours, "
          f"from {centroids_file}) -> {out}")


def run() -> None:
    """The command (dbp-... once installed): main, with user mistakes as one line."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
