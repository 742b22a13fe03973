"""d_intra: how spread out each k-means cluster is.

Reads SemDeDup's sorted clusters (SORTED/cluster_<j>.npy, rows of path, index, distance to
centroid, cluster id) and writes a float32 array of shape (k,) whose entry j is the mean
distance to the centroid of cluster j's members (NaN for an empty cluster). Only the distance
column is parsed, a chunk at a time, so memory stays flat however large the clusters are.

    python compute_avg_dist_to_cluster_centroid.py --num_clusters 500 \\
        --sorted_clusters_path SORTED --avg_distance_to_cent_save_path OUT/dintra.npy

(Installed with pip, `dbp-dintra` is the same command as `python compute_avg_dist_to_cluster_centroid.py`.)
"""

import numpy as np

import dbp_utils as du
from dbpkit import cli, savedir, tasks
from dbpkit.clusters import PARSER_MODULES, save_scores, scan_clusters


def parse_args():
    parser = cli.make_parser(__doc__)
    cli.add_flag(parser, "--num_clusters", type=int, default=None,
                 help="number of k-means clusters k (default: the number of cluster_<j>.npy files, "
                      "which must be exactly cluster_0 .. cluster_{k-1})")
    cli.add_flag(parser, "--sorted_clusters_path", required=True,
                 help="folder of SemDeDup's sorted cluster files cluster_<j>.npy")
    cli.add_flag(parser, "--avg_distance_to_cent_save_path", required=True,
                 help="the .npy file to write d_intra to (folders are created; with a .dbp.json sidecar beside "
                      "it saying what it holds)")
    cli.add_flag(parser, "--overwrite", action="store_true", help="replace an existing output file")
    cli.add_workers_flag(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cli.absolute_paths(args, "sorted_clusters_path", "avg_distance_to_cent_save_path")
    workers = cli.num_workers(args.workers)
    pool = tasks.TaskPool(workers, preload=PARSER_MODULES)
    pool.start()  # the workers' fork server starts importing while this process checks the inputs
    clusters = scan_clusters(args.sorted_clusters_path, args.num_clusters, "--sorted_clusters_path", "--num_clusters")
    out = args.avg_distance_to_cent_save_path
    savedir.check_output_file(out, "--avg_distance_to_cent_save_path", args.overwrite, [c.path for c in clusters])

    with pool:
        results = list(pool.run(du.cluster_mean_distance, clusters, "d_intra"))
    d_intra = np.array([mean for mean, _ in results], dtype=np.float32)
    unsorted = [c.path for c, (_, is_sorted) in zip(clusters, results) if not is_sorted]
    if unsorted:
        cli.log.warning(f"{len(unsorted)} cluster file(s) are not sorted by distance, e.g. {unsorted[0]}; "
                        "prune.py's hard/easy selection expects sorted files")

    sizes = np.array([c.rows for c in clusters])
    save_scores(out, d_intra, "d_intra", args.sorted_clusters_path, sizes)
    empty = int(np.isnan(d_intra).sum())
    print(f"d_intra of {len(clusters)} clusters ({sizes.sum()} rows, {empty} empty) "
          f"-> {out}")


def run() -> None:
    """The command (dbp-... once installed): main, with user mistakes as one line."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
