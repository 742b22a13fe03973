"""Density-Based Pruning: keep the hardest samples of each cluster, more of the complex clusters.

Reads SemDeDup's sorted clusters and the d_intra / d_inter arrays of the two compute_*.py
scripts. The complexity of cluster j is C_j = d_intra[j] * d_inter[j]; P = softmax(C / T) says
which share of the kept N = int(prune_ratio * total) samples each cluster should get. The quotas
N_j solve min ||N_j - P_j N||^2 with sum N_j = N and min(m, n_j - 1) <= N_j <= n_j exactly
(m = int(N / k * cls_bal_ratio)), then the N_j members farthest from the centroid are kept
(--which-to-keep hard; easy keeps the nearest, random a seeded sample).

Writes into --save-dir: kept_keys_trie.pkl (pygtrie.StringTrie of kept keys: paths without their
extension, for a webdataset filter), kept_keys.npy (the same keys, sorted bytes, memory-mappable),
kept_paths.txt, quotas.npy, cluster_stats.csv, quotas.png, logs.log and, last, params.json; with
--datacomp-subset also datacomp_subset.npy, the kept uids as DataComp's resharder.py reads them.

    python prune.py --num-centroids 500 --mean_centroid_distances_save_path OUT/dinter.npy \\
        --avg_distance_to_cent_save_path OUT/dintra.npy --sorted-clusters-path SORTED \\
        --total-dataset-size 280000000 --prune-ratio 0.3 --save-dir RUN

(Installed with pip, `dbp-prune` is the same command as `python prune.py`.)
"""

import os

import numpy as np

import dbp_utils as du
import dbpkit
from dbpkit import cli, files, keys, prune_report, savedir, selection, tasks, trie
from dbpkit.clusters import PARSER_MODULES, load_cluster_scores, scan_clusters
from dbpkit.errors import MethodError, UsageError

PARTS_DIR = ".parts"  # in the staging folder: each cluster's selection, until it is gathered
REPORT_AFTER_KEYS = 1_000_000  # kept keys whose trie takes about as long to write as the report to draw
METHOD_FLAGS = {  # what the method refused -> the flag that set it, and what to do
    "density": ("--density", "recompute d_intra and d_inter from the cluster files"),
    "target": ("--prune-ratio", "lower --prune-ratio or fix --total-dataset-size"),
    "cls_bal_ratio": ("--cls-bal-ratio", "lower --cls-bal-ratio or raise --prune-ratio"),
}
PATH_FLAGS = ("sorted_clusters_path", "save_dir", "mean_centroid_distances_save_path", "avg_distance_to_cent_save_path")


def parse_args():
    parser = cli.make_parser(__doc__)
    cli.add_flag(parser, "--num-centroids", "--num-clusters", type=int, default=None,
                 help="number of k-means clusters k (default: the number of cluster_<j>.npy files)")
    cli.add_flag(parser, "--mean_centroid_distances_save_path", default=None,
                 help="d_inter .npy from compute_centroid_distances.py (needed by the dinter densities)")
    cli.add_flag(parser, "--avg_distance_to_cent_save_path", default=None,
                 help="d_intra .npy from compute_avg_dist_to_cluster_centroid.py (needed by the dintra densities)")
    cli.add_flag(parser, "--sorted-clusters-path", required=True,
                 help="folder of SemDeDup's sorted cluster files cluster_<j>.npy")
    cli.add_flag(parser, "--total-dataset-size", type=int, default=None,
                 help="dataset size the kept fraction refers to (default: the number of rows in the cluster "
                      "files). Pass it only when the clusters cover part of the data set, e.g. 280000000 for "
                      "LAION-DeDup-280M clustered from a sample; a different value is used but warned about")
    cli.add_flag(parser, "--prune-ratio", type=float, required=True,
                 help="the fraction of the dataset to KEEP, in (0, 1] (the upstream name): 0.3 keeps 30%%")
    cli.add_flag(parser, "--save-dir", required=True,
                 help="folder for the outputs (created; refused if it holds a completed run)")
    cli.add_flag(parser, "--temperature", type=float, default=0.5,
                 help="softmax temperature T > 0 (default: 0.5); lower favours complex clusters more")
    cli.add_flag(parser, "--cls-bal-ratio", type=float, default=0.5,
                 help="in [0, 1]: every cluster keeps at least int(N / k * ratio) samples (capped at "
                      "its size - 1); 0 means at least 1 (default: 0.5)")
    cli.add_flag(parser, "--which-to-keep", default="hard", choices=du.WHICH_TO_KEEP,
                 help="hard (default): the members farthest from the centroid; easy: the nearest; "
                      "random: a seeded random sample")
    cli.add_flag(parser, "--density", default="dintra*dinter", choices=du.DENSITIES,
                 help="complexity fed to the softmax: dintra*dinter (default, the paper's; "
                      "dinter*dintra is the same), dintra, dinter, uniform (equal quotas), "
                      "clustersize (the same kept fraction everywhere, no softmax: SSP-Pruning)")
    cli.add_flag(parser, "--seed", type=int, default=42, help="seed of --which-to-keep random (default: 42)")
    cli.add_flag(parser, "--no-trie", action="store_true",
                 help="skip kept_keys_trie.pkl; loaders use kept_keys.npy (far smaller at web scale)")
    cli.add_flag(parser, "--pruned-paths", action="store_true",
                 help="also write pruned_paths.txt: the paths not kept, one per line, cluster by cluster (reads "
                      "every path, so it takes longer)")
    cli.add_flag(parser, "--datacomp-subset", action="store_true",
                 help="also write datacomp_subset.npy: the kept DataComp uids for resharder.py --subset_file")
    cli.add_flag(parser, "--overwrite", action="store_true",
                 help="replace the outputs of a completed run in --save-dir")
    cli.add_workers_flag(parser)
    return parser.parse_args()


def check_args(args) -> None:
    cli.check_range("--prune-ratio", args.prune_ratio, 0, 1, low_open=True,
                    fix="it is the fraction to keep: 0.3 keeps 30% of the samples")
    cli.check_range("--temperature", args.temperature, 0, float("inf"), low_open=True, high_open=True,
                    fix="pass a temperature > 0 (default 0.5)")
    cli.check_range("--cls-bal-ratio", args.cls_bal_ratio, 0, 1)
    if args.seed < 0:
        raise UsageError("--seed", f"{args.seed} is negative", "pass a seed >= 0 (default 42)")
    if args.total_dataset_size is not None and args.total_dataset_size < 1:
        raise UsageError("--total-dataset-size", f"{args.total_dataset_size} is less than 1",
                         "omit it to use the number of rows in the cluster files")


def load_dintra_dinter(args, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d_intra and d_inter as the density needs them (NaN where it does not)."""
    needs_intra = "dintra" in args.density
    needs_inter = "dinter" in args.density
    files = (("--avg_distance_to_cent_save_path", args.avg_distance_to_cent_save_path, needs_intra),
             ("--mean_centroid_distances_save_path", args.mean_centroid_distances_save_path, needs_inter))
    loaded = []
    for flag, path, needed in files:
        if needed and not path:
            raise UsageError(flag, f"is required by --density {args.density}", "pass the file or another --density")
        holds, script = ("d_intra", "compute_avg_dist_to_cluster_centroid.py") \
            if flag == "--avg_distance_to_cent_save_path" else ("d_inter", "compute_centroid_distances.py")
        fix = f"recompute it with {script} on --sorted-clusters-path"
        loaded.append(load_cluster_scores(path, sizes, flag, holds, fix) if path else np.full(len(sizes), np.nan))
    return loaded[0], loaded[1]


def check_datacomp_keys(clusters: list) -> None:
    """--datacomp-subset on data whose keys are not DataComp uids: refused from the first key, before the selection
    (every kept key is checked again when the subset is written)."""
    if first := next((c for c in clusters if c.rows), None):
        (key,) = first.columns(("key",), 0, 1)
        keys.datacomp_subset(keys.strip_extensions(keys.keys_as_utf8(key, first.path)))


def main() -> None:
    args = parse_args()
    cli.absolute_paths(args, *PATH_FLAGS)  # as params.json names them: the run can be moved or shared
    check_args(args)
    workers = cli.num_workers(args.workers)
    run_log = cli.RunLog()
    pool = tasks.TaskPool(workers, preload=PARSER_MODULES)
    pool.start()  # the workers' fork server starts importing while this process checks the inputs

    # 1. Inputs, checked before anything is written (the distances of the rows read are checked as
    #    they are read; a failure there still leaves the save dir as it was).
    clusters = scan_clusters(args.sorted_clusters_path, args.num_centroids, "--sorted-clusters-path", "--num-centroids")
    k, sizes = len(clusters), np.array([c.rows for c in clusters], dtype=np.int64)
    if args.datacomp_subset:
        check_datacomp_keys(clusters)
    save_dir = savedir.SaveDir(args.save_dir, args.overwrite, du.OUTPUT_FILES, du.PARAMS_FILE, "--save-dir")
    d_intra, d_inter = load_dintra_dinter(args, sizes)
    total_rows = int(sizes.sum())
    total = args.total_dataset_size or total_rows
    target = int(args.prune_ratio * total)

    # 2. Complexity -> probabilities -> quotas.
    try:
        complexity = du.complexity(args.density, d_intra, d_inter, sizes)
        probs = du.cluster_probabilities(args.density, complexity, args.temperature)
        plan = du.solve_quotas(probs, sizes, target, args.cls_bal_ratio)
    except MethodError as e:  # the method names no flag: these are the flags that set what it refused
        flag, fix = METHOD_FLAGS[e.param]
        raise UsageError(flag, e.what, fix) from None
    cli.log.info(f"k={k} rows={total_rows} total={total} N={target} density={args.density} "
                 f"T={args.temperature} min_per_cluster={plan.min_per_cluster} nu={plan.nu!r}")
    sweep = du.temperature_sweep(args.density, complexity, sizes, target, args.cls_bal_ratio, args.temperature)
    spread = du.p_ratio(probs, sizes)
    near_equal = args.density not in ("uniform", "clustersize") and spread < du.NEAR_EQUAL

    # 3. Select and write, into a staging folder published at the end (params.json last).
    stats = {"cluster_id": np.arange(k), "size": sizes, "d_intra": d_intra, "d_inter": d_inter,
             "complexity": complexity, "probability": probs, "target": probs * target, "quota": plan.quotas,
             "kept_fraction": np.divide(plan.quotas, sizes, out=np.full(k, np.nan), where=sizes > 0)}
    title = f"DBP quotas: keep {args.prune_ratio:g}, T={args.temperature:g}, {args.density}"
    kept = int(plan.quotas.sum())
    with save_dir as out, pool:
        # The stats and the plot need only the quotas. A worker draws them beside the selection, or, when there
        # is a trie of a million keys or more to write (as long as the drawing takes), while this process
        # writes it on one core: then the drawing does not take a core from the selection.
        report_task = (out.path(du.STATS_FILE), out.path(du.SWEEP_FILE), out.path(du.PLOT_FILE), stats, sweep, plan,
                       target, args.temperature, title)
        draw_after = not args.no_trie and kept >= REPORT_AFTER_KEYS
        report = None if draw_after else pool.submit(prune_report.write_report, report_task)
        collected, unsorted, misnamed = selection.KeptKeyCollector(kept), [], []
        parts = out.path(PARTS_DIR)
        os.mkdir(parts)
        pruned_file = out.path(du.PRUNED_PATHS_FILE) if args.pruned_paths else os.devnull
        with open(out.path(du.KEPT_PATHS_FILE), "wb") as f, open(pruned_file, "wb") as pruned:
            selections = selection.select_kept(clusters, plan.quotas, args.which_to_keep, args.seed, args.pruned_paths,
                                               parts, pool)
            for j, (cluster, selected) in enumerate(zip(clusters, selections, strict=True)):  # strict: to the end
                collected.add(selection.take_part(selection.part_file(parts, j), f))
                if args.pruned_paths:
                    selection.take_part(selection.part_file(parts, j, pruned=True), pruned, with_keys=False)
                if not selected.in_order:
                    unsorted.append(cluster.path)
                if not selected.ids_match:
                    misnamed.append(cluster.path)
        os.rmdir(parts)
        report = report or pool.submit(prune_report.write_report, report_task)
        kept_keys = collected.sorted_unique(workers)
        files.save_npy(out.path(du.KEPT_KEYS_FILE), kept_keys)
        if args.datacomp_subset:
            files.save_npy(out.path(du.DATACOMP_FILE), keys.datacomp_subset(kept_keys))
        if not args.no_trie:
            cli.stage("writing the trie")
            with open(out.path(du.TRIE_FILE), "wb") as f:
                trie.write_trie(f, kept_keys)
        files.save_npy(out.path(du.QUOTAS_FILE), plan.quotas)
        report()
        # Warned only now: a bad input found on the way must end in its error line alone.
        if near_equal:
            doubling = du.temperature_for(2.0, complexity, sizes)
            cli.log.warning(f"the softmax at --temperature {args.temperature:g} spreads the clusters' shares by only "
                            f"{spread:.4f}x (largest / smallest): complexity barely moves the quotas from the equal "
                            "share (balanced pruning)" + (f"; T = {doubling:.3g} would spread them 2x" if doubling
                                                          else "") + f" (see {du.SWEEP_FILE})")
        if total != total_rows:
            cli.log.warning(f"--total-dataset-size {total} differs from the {total_rows} rows in the cluster "
                            "files; the kept target uses the given size")
        if target == 0:
            cli.log.warning(f"--prune-ratio {args.prune_ratio:g} of {total} samples keeps none (N = 0)")
        if unsorted:
            cli.log.warning(f"{len(unsorted)} cluster file(s) are not sorted by distance, e.g. {unsorted[0]}; "
                            f"--which-to-keep {args.which_to_keep} kept a prefix or suffix of each as if they were")
        if misnamed:
            cli.log.warning(f"{len(misnamed)} cluster file(s) hold rows whose cluster id column is not their "
                            f"own, e.g. {misnamed[0]}; check that the files were not renamed or mixed up")
        if len(kept_keys) < kept:
            cli.log.warning(f"{kept - len(kept_keys)} kept paths share a key with another kept path: the same path "
                            "in two clusters, or the same name with another extension; the key sets hold each once")
        extremes = prune_report.pruning_extremes(sizes, plan.quotas)
        cli.log.info(f"kept {kept} samples, {len(kept_keys)} unique keys; {extremes}")
        run_log.write(out.path(du.LOG_FILE))
        run_control = {"workers", "overwrite", "debug"}  # how the run went, not what it computed
        params = {name: value for name, value in sorted(vars(args).items()) if name not in run_control}
        params.update(num_centroids=k, num_clusters=k, total_rows=total_rows, dataset_size=total, target_size=target,
                      min_per_cluster=plan.min_per_cluster, nu=plan.nu, kept_samples=kept,
                      kept_keys=len(kept_keys), p_ratio=spread, near_equal_share=near_equal,
                      version=dbpkit.__version__)
        files.save_json(out.path(du.PARAMS_FILE), params)
    print(f"kept {kept} of {total_rows} samples ({kept / max(total_rows, 1):.1%}) from {k} clusters "
          f"({args.which_to_keep}, {args.density}) -> {args.save_dir}")


def run() -> None:
    """The command (dbp-... once installed): main, with user mistakes as one line."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
