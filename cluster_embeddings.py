"""Cluster embeddings with k-means and write SemDeDup's sorted clusters, the input of the three DBP scripts.

Reads the embeddings as researchers hold them (the layout is read off the files):
  - one .npy (n, dim), float16 or float32, with --keys a .txt (one key per line), a 1-D string .npy or
    a .parquet (--key-column);
  - clip-retrieval's output, as LAION's embedding releases come: --embeddings the img_emb folder of
    img_emb_<n>.npy parts, --keys the metadata folder of metadata_<n>.parquet (default: the metadata
    folder beside img_emb; key column image_path);
  - DataComp's shards: --embeddings a folder of <shard>.npz (array --npz-key, default l14_img) beside
    <shard>.parquet (keys: the uid column); no --keys.
With --subset FILE (a kept_keys.npy of deduplicate.py or prune.py, or a text file of paths) only the
rows whose key is in FILE are clustered; column 1 still indexes --embeddings. The keys are checked before
k-means: each names one sample (a key two rows hold is refused: the kept keys and the loaders' filter go by key)
and is UTF-8 without a tab, newline, carriage return or NUL. Rows are L2-normalised as they are read. k-means
is faiss's, as SemDeDup runs it (spherical, 100 iterations, seed 1234), trained on a seeded sample of
--sample-size rows (default: up to 256 per centroid); every row then goes to its nearest centroid in one
streamed pass.

Writes into --save_folder, exactly what SemDeDup writes:
  kmeans_centroids.npy                   float32 (k, dim)
  sorted_clusters/cluster_{j}.npy        (key, row index, cosine distance to the centroid, cluster id)
                                         as a <U (n_j, 4) array, farthest first (--ascending: nearest
                                         first); an empty cluster is np.save(path, [])
and beside them clusters.png (the clusters' sizes), logs.log (the command, its warnings and times) and
clustering.json (the flags and figures of the run; written last, it marks the folder complete). With
--k-sweep K1 K2 ..., also k_sweep.csv and k_sweep.png (without --num_clusters, only those and logs.log).
A killed or interrupted run is finished by rerunning the same command; a completed folder is refused
unless --overwrite.

With --from-nemo-curator, NeMo Curator 1.x's k-means result (kmeans_results/centroid=<j>/*.parquet) is
converted instead, without rerunning k-means: keys from --id-column, distances from
cosine_dist_to_cent, centroids from --centroids_file or a kmeans_centroids.npy beside the results,
else the normalised mean of each cluster's normalised embeddings (--embedding-column).

    python cluster_embeddings.py --embeddings emb.npy --keys keys.txt --num_clusters 500 --save_folder SAVE
    python cluster_embeddings.py --embeddings laion/img_emb --num_clusters 500 --save_folder SAVE
    python cluster_embeddings.py --embeddings datacomp/shards --num_clusters 100 --save_folder SAVE
    python cluster_embeddings.py --from-nemo-curator cache/kmeans_results --save_folder SAVE

(Installed with pip, `dbp-cluster` is the same command as `python cluster_embeddings.py`.)
"""

import argparse
import os
import shutil

import numpy as np

import dbp_utils as du
from dbpkit import cli, cluster_report, files, kmeans, layouts, nemo, savedir, tasks
from dbpkit.clusters import CENTROIDS_FILE, find_centroids, load_centroids
from dbpkit.errors import UsageError, not_a_file

PARAMS_FILE = kmeans.CLUSTERING_FILE
SIZES_PLOT, K_SWEEP_FILE, K_SWEEP_PLOT = "clusters.png", "k_sweep.csv", "k_sweep.png"
OUTPUTS = (CENTROIDS_FILE, kmeans.SORTED_DIR, files.LOG_FILE, PARAMS_FILE)
OBJECTIVE = "objective.json"  # in the staging folder: k-means' objective


USAGE = """%(prog)s --embeddings EMB [--keys KEYS] --num_clusters K --save_folder SAVE [--niter N] [--seed S]
           [--sample-size N] [--spherical | --no-spherical] [--ascending] [--npz-key KEY] [--key-column COLUMN]
           [--subset FILE] [--k-sweep K [K ...]] [--workers WORKERS] [--distributor local|ray] [--overwrite]
       %(prog)s --from-nemo-curator KMEANS_RESULTS --save_folder SAVE [--num_clusters K] [--id-column COLUMN]
           [--embedding-column COLUMN] [--centroids_file C.npy] [--ascending] [--workers WORKERS]
           [--distributor local|ray] [--overwrite]"""


def parse_args():
    parser = cli.make_parser(__doc__, USAGE)
    source = parser.add_mutually_exclusive_group(required=True)
    cli.add_flag(source, "--embeddings", default=None,
                 help="a .npy of embeddings (n, dim), a clip-retrieval img_emb folder, or a folder of DataComp shards")
    cli.add_flag(source, "--from-nemo-curator", default=None, metavar="KMEANS_RESULTS",
                 help="convert NeMo Curator 1.x's k-means result folder (centroid=<j>/*.parquet) instead")
    cli.add_flag(parser, "--keys", default=None,
                 help="the keys of the rows: a .txt (one per line), a 1-D string .npy or a .parquet; for "
                      "clip-retrieval, the metadata folder (default: beside img_emb); not for DataComp shards")
    cli.add_flag(parser, "--num_clusters", type=int, default=None, help="k, the number of k-means clusters")
    cli.add_flag(parser, "--save_folder", required=True,
                 help="folder for kmeans_centroids.npy and sorted_clusters/ (SemDeDup's save folder)")
    cli.add_flag(parser, "--niter", type=int, default=100, help="k-means iterations (default: 100, SemDeDup's)")
    cli.add_flag(parser, "--seed", type=int, default=1234,
                 help="seed of the training sample and of k-means (default: 1234, SemDeDup's)")
    cli.add_flag(parser, "--sample-size", type=int, default=None,
                 help="rows k-means is trained on, drawn uniformly (default: all rows, up to 256 per centroid)")
    parser.add_argument("--spherical", action=argparse.BooleanOptionalAction, default=True,
                        help="spherical k-means, SemDeDup's Kmeans_with_cos_dist (default: on)")
    cli.add_flag(parser, "--ascending", action="store_true",
                 help="sort each cluster nearest first (SemDeDup's keep_hard False); default: farthest first")
    cli.add_flag(parser, "--npz-key", default="l14_img",
                 help="the embedding array in DataComp's .npz (default: l14_img)")
    cli.add_flag(parser, "--key-column", default=None,
                 help="the key column of parquet keys (default: image_path for clip-retrieval, uid for DataComp)")
    cli.add_flag(parser, "--id-column", default="id", help="NeMo Curator's id column: the keys (default: id)")
    cli.add_flag(parser, "--embedding-column", default="embeddings",
                 help="NeMo Curator's embedding column, for centroids when none were saved (default: embeddings)")
    cli.add_flag(parser, "--centroids_file", default=None,
                 help="NeMo Curator's kmeans_centroids.npy (default: looked up beside KMEANS_RESULTS)")
    cli.add_flag(parser, "--k-sweep", type=int, nargs="+", default=None, metavar="K",
                 help="cluster the training sample (the one a run at the largest K trains on) at each K and write "
                      "k_sweep.csv and k_sweep.png: the objective, the cluster sizes and the spread DBP's softmax "
                      "will see; without --num_clusters, nothing else is done")
    cli.add_flag(parser, "--subset", default=None, metavar="FILE",
                 help="cluster only the rows whose key (extension stripped) is in FILE: a kept_keys.npy from "
                      "deduplicate.py or prune.py, prune.py's kept_keys_trie.pkl, or a text file of paths; column 1 "
                      "stays the row in --embeddings")
    cli.add_flag(parser, "--overwrite", action="store_true", help="replace the outputs of a completed run")
    cli.add_workers_flag(parser)
    tasks.add_distributor_flag(parser)
    return parser.parse_args()


def check_args(args, rows: int) -> None:
    """The flags against the data (k and the sample against the rows clustered are checked once those are
    known: a --subset is known only from the keys)."""
    if args.num_clusters is None and not args.k_sweep:
        raise UsageError("--num_clusters", "is required", "pass k, e.g. 500 for LAION, 100 for DataComp (or "
                         "--k-sweep K1 K2 ... to see what several k do first)")
    for k in args.k_sweep or []:
        check_k_and_sample(args, rows, k=k, flag="--k-sweep")
    if args.num_clusters is not None:
        check_k_and_sample(args, rows)
    if args.niter < 1:
        raise UsageError("--niter", f"{args.niter} is less than 1", "pass 1 or more (default 100)")
    if args.niter > cli.C_INT_MAX:
        raise UsageError("--niter", f"{args.niter} is more than {cli.C_INT_MAX}, the most faiss's k-means takes",
                         "pass fewer iterations (default 100)")
    if not 0 <= args.seed <= cli.C_INT_MAX:
        raise UsageError("--seed", f"{args.seed} is outside [0, {cli.C_INT_MAX}] (faiss's seed is a C int)",
                         "pass a smaller seed (default 1234)")
    if args.subset and not os.path.isfile(args.subset):
        raise UsageError("--subset", f"{args.subset} {not_a_file(args.subset)}",
                         "pass a kept_keys.npy from deduplicate.py or prune.py, or a text file of paths")
    if args.subset:
        layouts.check_subset(args.subset)


def check_k_and_sample(args, rows: int, of: str = "", k: int | None = None, flag: str = "--num_clusters") -> int:
    """k (by default --num_clusters) and the sample size against the rows clustered; returns the sample size."""
    k = args.num_clusters if k is None else k
    if k < 1 or k > rows:
        raise UsageError(flag, f"{k} is not between 1 and the {rows} rows{of}", "pass a smaller k")
    sample = min(rows, kmeans.POINTS_PER_CENTROID * k) if args.sample_size is None else args.sample_size
    if not k <= sample <= rows:
        raise UsageError("--sample-size", f"{sample} is not between k = {k} and the {rows} rows{of}",
                         "omit it for up to 256 rows per centroid")
    return sample


def fingerprint(args, embeddings: layouts.Embeddings) -> dict:
    """What a rerun must match to go on from a stopped run's work: the flags and the input files."""
    inputs = embeddings.files() + ([args.subset] if args.subset else [])
    digest = files.files_fingerprint(inputs)
    flags = {name: getattr(args, name) for name in ("num_clusters", "niter", "seed", "spherical", "ascending",
                                                    "npz_key", "key_column", "sample_size", "subset", "k_sweep")}
    return {"files": digest, "flags": flags}


def main() -> None:
    args = parse_args()
    cli.absolute_paths(args, "embeddings", "keys", "subset", "save_folder", "from_nemo_curator", "centroids_file")
    workers = cli.num_workers(args.workers, args.distributor)
    tasks.check_distributor(args.distributor)
    run_log = cli.RunLog()
    if args.from_nemo_curator:
        return convert_nemo_curator(args, workers, run_log)
    embeddings = layouts.find_embeddings(args.embeddings, args.keys, args.key_column, args.npz_key)
    n, k = embeddings.rows, args.num_clusters
    check_args(args, n)
    run = fingerprint(args, embeddings)
    ks = sorted(set(args.k_sweep or []))
    sweep_outputs = (K_SWEEP_FILE, K_SWEEP_PLOT) if ks else ()
    # A sweep alone is marked complete by its table; a run by clustering.json.
    outputs, marker = ((*sweep_outputs, files.LOG_FILE), K_SWEEP_FILE) if k is None else \
        ((*sweep_outputs, SIZES_PLOT, *OUTPUTS), PARAMS_FILE)
    save = savedir.SaveDir(args.save_folder, args.overwrite, outputs, marker, "--save_folder", resume=run)

    with save as out, tasks.TaskPool(workers, args.distributor) as pool:
        work, resumed, from_sweep = out.staging, "", ""
        if out.resumed:
            done = what_was_done(out.staging, k)
            resumed = f" (resumed a stopped run; done before: {done})"
            cli.log.info(f"resuming a stopped run; done before: {done}")
        # Each step's last file marks it done: a rerun after a kill goes on from the first step not done.
        if not os.path.exists(out.path(layouts.KEYS_FILE)):
            layouts.gather_keys(embeddings, work)
        cli.stage("keys gathered")
        subset, of = None, ""
        if args.subset:
            if not os.path.exists(out.path(layouts.SUBSET_ROWS)):
                selected, missing = layouts.subset_rows(work, args.subset)
                if not selected:
                    raise UsageError("--subset", f"none of the {missing} keys in {args.subset} is a key of the "
                                     f"embeddings ({args.embeddings})", "pass the kept keys of a run on these "
                                     "embeddings (keys are compared without their extension)")
                if missing:
                    cli.log.warning(f"{missing} keys of --subset {args.subset} are not among the embeddings' keys")
            subset = np.load(out.path(layouts.SUBSET_ROWS))
            n, of = len(subset), f" of --subset {args.subset}"
        if ks and not os.path.exists(out.path(K_SWEEP_FILE)):
            x = kmeans.training_sample(embeddings, args.seed, check_k_and_sample(args, n, of, ks[-1], "--k-sweep"),
                                       subset)
            fits = {}
            sweep = cli.stoppable(du.k_sweep, x, ks, args.niter, args.seed, args.spherical, workers, fits)
            if k == ks[-1]:  # the run's own k-means is this one (the same sample, seed and iterations)
                files.save_json(out.path(OBJECTIVE), fits[k][1])
                files.save_npy(out.path(CENTROIDS_FILE), fits[k][0])
                from_sweep = f"; k-means at k = {k} from the sweep, not trained again"
            cluster_report.k_sweep_figure(sweep).savefig(out.path(K_SWEEP_PLOT), format="png")
            files.write_csv(out.path(K_SWEEP_FILE), sweep)
            cli.log.info(f"k sweep on {len(x)} rows: " + ", ".join(
                f"k={k_} objective {o:.6g}" for k_, o in zip(sweep["k"].tolist(), sweep["objective"].tolist())))
        cli.stage("k sweep done")
        if k is None:
            run_log.write(out.path(files.LOG_FILE))
            return print(f"k sweep of {n} rows{of} at k = {', '.join(map(str, ks))}: "
                         f"{K_SWEEP_FILE}, {K_SWEEP_PLOT}{tasks.on(args.distributor)} -> {args.save_folder}")
        sample = check_k_and_sample(args, n, of)
        if not os.path.exists(out.path(kmeans.LABELS)):
            pool.start()  # the assignment's workers get ready while k-means trains here
        if not os.path.exists(out.path(CENTROIDS_FILE)):
            centroids, objective = kmeans.train_kmeans(embeddings, k, args.niter, args.seed, sample, args.spherical,
                                                       workers, subset)
            files.save_json(out.path(OBJECTIVE), objective)
            files.save_npy(out.path(CENTROIDS_FILE), centroids)
        cli.stage("k-means trained")
        if not os.path.exists(out.path(kmeans.LABELS)):
            labels, distances = kmeans.assign(embeddings, out.path(CENTROIDS_FILE), args.spherical, work, pool,
                                              out.path(layouts.SUBSET_ROWS) if args.subset else None)
            files.save_npy(out.path(kmeans.DISTANCES), distances)
            files.save_npy(out.path(kmeans.LABELS), labels)
            shutil.rmtree(out.path(kmeans.ASSIGN_DIR))
        labels = np.load(out.path(kmeans.LABELS))
        sizes, objective = np.bincount(labels, minlength=k), files.load_json(out.path(OBJECTIVE))
        # clusters.png needs only the sizes: drawn by a worker while the others write the cluster files.
        figure = pool.submit(cluster_report.write_clusters_figure, (out.path(SIZES_PLOT), sizes, objective))
        kmeans.write_clusters(out.path(kmeans.SORTED_DIR), work, labels, k, not args.ascending, pool)
        figure()
        empty, single = int((sizes == 0).sum()), int((sizes == 1).sum())
        if empty + single:  # their d_intra is NaN or near 0: DBP ranks them by almost nothing
            cli.log.warning(f"{single} of {k} clusters hold a single row and {empty} none: k = {k} is large for "
                            f"{n} rows (about {n // k} a cluster); consider a smaller --num_clusters")
        run_log.write(out.path(files.LOG_FILE))
        files.save_json(out.path(PARAMS_FILE), {
            "embeddings": args.embeddings, "keys": args.keys, **run["flags"], "subset": args.subset,
            "distributor": args.distributor,
            "key_column": embeddings.parts[0].key_column, "sample_size": sample, "rows": n,
            "embedding_rows": embeddings.rows, "dim": embeddings.dim, "parts": len(embeddings.parts),
            "kmeans_objective": objective, "empty_clusters": empty,
            "single_row_clusters": single, "smallest_cluster": int(sizes.min()), "largest_cluster": int(sizes.max()),
            "median_cluster": float(np.median(sizes)), "rows_per_cluster": n / k})
    print(f"clustered {n} rows{of} (dim {embeddings.dim}, {len(embeddings.parts)} part(s)) into {k} clusters of "
          f"{sizes.min()} to {sizes.max()} rows ({empty} empty, {single} of one row){from_sweep}{resumed}"
          f"{tasks.on(args.distributor)} -> {args.save_folder}")


def what_was_done(work: str, k: int) -> str:
    """The steps a stopped run had finished, in words."""
    done = [what for what, name in (("the keys", layouts.KEYS_FILE), ("k-means", CENTROIDS_FILE),
                                    ("the assignment", kmeans.LABELS)) if os.path.exists(os.path.join(work, name))]
    sorted_dir = os.path.join(work, kmeans.SORTED_DIR)
    written = sum(name.endswith(".npy") for name in os.listdir(sorted_dir)) if os.path.isdir(sorted_dir) else 0
    if written:
        done.append(f"{written} of {k} cluster files")
    return ", ".join(done) or "nothing but the start"


def convert_nemo_curator(args, workers: int, run_log: cli.RunLog) -> None:
    """NeMo Curator 1.x's k-means result as SemDeDup's layout: one pass over each cluster's parquet files."""
    if args.keys:
        raise UsageError("--keys", "is not used with --from-nemo-curator",
                         "the keys and distances come from NeMo Curator's parquet files")
    results = args.from_nemo_curator
    centroids_file = args.centroids_file or find_centroids(results, required=False)
    k, k_source, centroids = args.num_clusters, f"--num_clusters is {args.num_clusters}", None
    if centroids_file:  # the saved centroids know k, even when the last clusters are empty
        centroids = load_centroids(centroids_file, k, None, "--centroids_file")
        k, k_source = len(centroids), f"{centroids_file} holds {len(centroids)} centroids"
    clusters = nemo.find_nemo_clusters(results, k, k_source, args.id_column, args.embedding_column,
                                       need_embeddings=centroids_file is None)
    k = len(clusters)
    save = savedir.SaveDir(args.save_folder, args.overwrite, OUTPUTS, PARAMS_FILE, "--save_folder")
    with save as out, tasks.TaskPool(workers, args.distributor) as pool:
        os.mkdir(out.path(kmeans.SORTED_DIR))
        jobs = ((cluster, out.path(os.path.join(kmeans.SORTED_DIR, f"cluster_{cluster.j}.npy")), args.id_column,
                 args.embedding_column, not args.ascending, centroids is None) for cluster in clusters)
        means, hashes = zip(*pool.run(nemo.convert_nemo_cluster, jobs, "convert", total=k))
        nemo.check_unique_ids(clusters, np.concatenate(hashes), args.id_column)
        if centroids is None:  # an empty cluster has no members to average: its row is NaN (d_inter: NaN too)
            dims = sorted({len(m) for m in means if m is not None}) or [1]
            if len(dims) > 1:
                raise UsageError("--from-nemo-curator", f"{results} holds embeddings of dimensions {dims} in "
                                 "different clusters", "convert the results of one k-means run")
            centroids = np.stack([np.full(dims[0], np.nan) if m is None else m for m in means])
            source = "the normalised mean of each cluster's normalised embeddings (no kmeans_centroids.npy found)"
        else:
            source = os.path.abspath(centroids_file)
        files.save_npy(out.path(CENTROIDS_FILE), centroids.astype(np.float32))
        sizes = np.array([c.rows for c in clusters])
        run_log.write(out.path(files.LOG_FILE))
        files.save_json(out.path(PARAMS_FILE), {
            "from_nemo_curator": results, "id_column": args.id_column, "centroids": source,
            "distributor": args.distributor,
            "num_clusters": k, "ascending": args.ascending, "rows": int(sizes.sum()),
            "empty_clusters": int((sizes == 0).sum()), "smallest_cluster": int(sizes.min()),
            "largest_cluster": int(sizes.max())})
    print(f"converted {sizes.sum()} rows of NeMo Curator's k-means into {k} clusters of {sizes.min()} to "
          f"{sizes.max()} rows ({int((sizes == 0).sum())} empty){tasks.on(args.distributor)}; centroids: {source} "
          f"-> {args.save_folder}")


def run() -> None:
    """The command (dbp-... once installed): main, with user mistakes as one line."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
