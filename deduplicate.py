"""SemDeDup's semantic deduplication, the paper's first step, on one machine and exact to SemDeDup.

Reads SemDeDup's sorted clusters (from cluster_embeddings.py with a large k, or from SemDeDup itself) and
the embeddings they index (column 1: the row in --embeddings, in every layout cluster_embeddings.py reads;
by default the embeddings named in the clustering.json beside the clusters). Within each cluster, taken in
keep order, a member's score is its largest cosine similarity to an earlier member (clipped at 0); at eps
it is removed when its score > 1 - eps, as SemDeDup removes it. hard (default) keeps the member farthest
from the centroid of each group of near-duplicates, easy the nearest, random a seeded random one.

Writes into --save_folder:
  scores/cluster_<j>.npy      float32, each row's score, in the cluster file's row order
  matches/cluster_<j>.npy     int64, the row of the cluster file each row is most similar to (-1: none)
  eps_<e>/kept_keys.npy       per eps: the kept keys, as prune.py writes them (sorted, unique, no extension)
  eps_<e>/removed_paths.txt   per eps: path, the path it duplicates, similarity (tab-separated)
  dedup_stats.csv, dedup_cluster_stats.csv, similarity.png (the scores, and what each eps removes),
  logs.log and, last, params.json.
A rerun with other --eps on the same folder and inputs reuses the scores and takes seconds (eps folders of
earlier runs stay, their figures included; a missing score file is computed again; --overwrite starts
afresh, and publishing replaces every earlier output, eps folders included).
A stopped run is finished by rerunning it; one run at a time.

    python deduplicate.py --sorted_clusters_path SAVE/sorted_clusters --num_clusters 50000 \\
        --embeddings laion/img_emb --eps 0.01 0.05 0.1 --save_folder DEDUP
    python cluster_embeddings.py --embeddings laion/img_emb --subset DEDUP/eps_0.05/kept_keys.npy \\
        --num_clusters 500 --save_folder SAVE2

(Installed with pip, `dbp-dedup` is the same command as `python deduplicate.py`.)
"""

import os
import shutil
from collections.abc import Iterator

import numpy as np

import dbp_utils as du
import dbpkit
from dbpkit import cli, dedup, dedup_report, files, kmeans, layouts, savedir, selection, tasks
from dbpkit.clusters import PARSER_MODULES, find_centroids, scan_clusters
from dbpkit.errors import UsageError

LAYOUT, PARTS = "embeddings.json", ".parts"  # in the staging folder
FIXED_OUTPUTS = (dedup.SCORES_DIR, dedup.MATCHES_DIR, dedup.STATS_FILE, dedup.CLUSTER_STATS_FILE, dedup.CURVE_FILE,
                 dedup.PLOT_FILE, files.LOG_FILE, files.PARAMS_FILE)


def parse_args():
    parser = cli.make_parser(__doc__)
    cli.add_flag(parser, "--sorted_clusters_path", required=True,
                 help="folder of SemDeDup's sorted cluster files cluster_<j>.npy (4 columns)")
    cli.add_flag(parser, "--num_clusters", type=int, default=None,
                 help="k (default: the number of cluster_<j>.npy files, which must be exactly cluster_0 ..)")
    cli.add_flag(parser, "--embeddings", default=None,
                 help="the embeddings column 1 indexes: a .npy, a clip-retrieval img_emb folder or a folder of "
                      "DataComp shards (default: the one in the clustering.json beside the clusters)")
    cli.add_flag(parser, "--npz-key", default=None, help="the array in DataComp's .npz (default: l14_img)")
    removal = parser.add_mutually_exclusive_group(required=True)
    cli.add_flag(removal, "--eps", type=float, nargs="+", default=[],
                 help="one or more eps in (0, 1): a member is removed when its similarity to an earlier one "
                      "> 1 - eps (SemDeDup used 0.0001 to 0.1; read eps_curve.csv to choose)")
    cli.add_flag(removal, "--remove-fraction", type=float, default=None, metavar="F",
                 help="instead of --eps: remove exactly the ceil(F x rows) rows with the highest scores (and any "
                      "tied with the last of them), as the eps that does so")
    cli.add_flag(parser, "--which-to-keep", default="hard", choices=du.WHICH_TO_KEEP,
                 help="of each group of near-duplicates, keep the member farthest from the centroid (hard, "
                      "default), the nearest (easy) or a seeded random one (random)")
    cli.add_flag(parser, "--seed", type=int, default=1234, help="seed of --which-to-keep random (default: 1234)")
    cli.add_flag(parser, "--device", default="cpu", choices=("cpu", "cuda"),
                 help="where the similarities are computed: cpu (float32, default) or cuda (float16)")
    cli.add_flag(parser, "--save_folder", required=True, help="folder for the outputs (created)")
    cli.add_flag(parser, "--overwrite", action="store_true",
                 help="replace a completed run that scored other inputs (the same inputs need no --overwrite: "
                      "their scores are reused)")
    cli.add_workers_flag(parser)
    tasks.add_distributor_flag(parser)
    return parser.parse_args()


def check_args(args) -> None:
    if args.remove_fraction is not None:
        cli.check_range("--remove-fraction", args.remove_fraction, 0, 1, low_open=True, high_open=True,
                        fix="F is the fraction of rows to remove, in (0, 1): 0.2 removes a fifth")
    for eps in args.eps:
        cli.check_range("--eps", eps, 0, 1, low_open=True, high_open=True,
                        fix="eps is in (0, 1): 0.05 removes members more than 95% similar to an earlier one")
    named = {}
    for eps in args.eps:
        if named.setdefault(dedup.eps_folder(eps), eps) != eps:
            raise UsageError("--eps", f"{named[dedup.eps_folder(eps)]!r} and {eps!r} would both be written to "
                             f"{dedup.eps_folder(eps)}", "pass values that differ in their first 6 digits")
    if args.seed < 0:
        raise UsageError("--seed", f"{args.seed} is negative", "pass a seed >= 0 (default 1234)")
    if args.device == "cuda":
        cli.check_cuda()


def find_embeddings(args) -> tuple[layouts.Embeddings, str]:
    """--embeddings, or the embeddings of the clustering.json beside the cluster files; and where they are."""
    path, npz_key = args.embeddings, args.npz_key
    record, clustering = kmeans.clustering_record(args.sorted_clusters_path)
    if path is None:
        if not clustering.get("embeddings"):
            raise UsageError("--embeddings", f"is required: there is no {kmeans.CLUSTERING_FILE} naming them in "
                             f"{os.path.dirname(record)}", "pass the embeddings the clusters were made from")
        path, npz_key = clustering["embeddings"], npz_key or clustering.get("npz_key")
        if not os.path.exists(path):  # (moved since, or on another machine's disk)
            raise UsageError("--embeddings", f"is not given, and {path}, the embeddings {record} names, does not "
                             "exist", "pass --embeddings with where those embeddings are now")
    return layouts.find_embeddings(path, None, None, npz_key or "l14_img", with_keys=False), os.path.abspath(path)


def check_centroids(sorted_dir: str, clusters: list, embeddings: layouts.Embeddings) -> None:
    """Embeddings of another dimension than the centroids' are another model's: refused. Beside the clusters of
    cluster_embeddings.py (a clustering.json naming their embeddings), so are embeddings of the same dimension
    that are not those the clusters were made from (dedup.check_made_from)."""
    if not (path := find_centroids(sorted_dir, required=False)):
        return
    centroids = np.load(path, mmap_mode="r")
    if centroids.ndim == 2 and centroids.shape[1] != embeddings.dim:
        raise UsageError("--embeddings", f"have dimension {embeddings.dim} but the centroids in {path} have "
                         f"{centroids.shape[1]}", "pass the embeddings the clusters were made from")
    _, record = kmeans.clustering_record(sorted_dir)
    if record.get("embeddings") and centroids.shape == (len(clusters), embeddings.dim):
        fix = f"pass the embeddings the clusters were made from ({record['embeddings']}, as {kmeans.CLUSTERING_FILE} " \
            "names them)"
        dedup.check_made_from(clusters, embeddings, np.asarray(centroids, np.float64), fix)


def fingerprint(args, clusters: list, embeddings: layouts.Embeddings) -> dict:
    """What the scores depend on: a rerun that matches reuses them (whatever its eps)."""
    digest = files.files_fingerprint([c.path for c in clusters] + embeddings.files())
    return scores_key({"files": digest, "which_to_keep": args.which_to_keep, "seed": args.seed,
                       "device": args.device})


def scores_key(run: dict) -> dict:
    """A fingerprint with --seed only where it changes the scores, under random (hard and easy draw nothing): also
    that of a params.json written when every fingerprint held it."""
    return {**run, "seed": run.get("seed") if run.get("which_to_keep") == "random" else None}


def published(save_folder: str, run: dict) -> list[float] | None:
    """The eps of a completed run in save_folder that scored the same inputs (its scores are reused), or None."""
    params = files.load_json(os.path.join(save_folder, files.PARAMS_FILE))
    if isinstance(params, dict) and isinstance(params.get("fingerprint"), dict) \
            and scores_key(params["fingerprint"]) == run:
        return params.get("eps", [])
    return None


def reuse_scores(save_folder: str, staging: str) -> None:
    """Link a completed run's score files into the staging folder (linked, not moved: they stay in place until
    the new run is published); a cluster whose scores or matches are missing is scored again."""
    folders = [os.path.join(save_folder, folder) for folder in (dedup.SCORES_DIR, dedup.MATCHES_DIR)]
    found = [set(os.listdir(f)) if os.path.isdir(f) else set() for f in folders]
    both = found[0] & found[1]
    for folder in (dedup.SCORES_DIR, dedup.MATCHES_DIR):
        os.makedirs(os.path.join(staging, folder), exist_ok=True)
        for name in both:
            if not os.path.exists(target := os.path.join(staging, folder, name)):
                os.link(os.path.join(save_folder, folder, name), target)


def merged_eps(new: list[float], earlier: list[float]) -> list[float]:
    """This run's eps and an earlier run's, sorted; an earlier eps written to the same eps_<e> folder as a new
    one (they differ past the 6th digit) gives way to the new one."""
    named = {dedup.eps_folder(eps): eps for eps in earlier}
    named.update({dedup.eps_folder(eps): eps for eps in new})
    return sorted(named.values())


def in_cluster_order(pool: tasks.TaskPool, jobs: list, count: int) -> Iterator[tuple[int, dedup.Removed | None]]:
    """(j, the selection a select_eps task made of it, or None: its scoring task made it) for clusters 0 .. count-1,
    as the tasks finish: under the tasks' progress bar, or, with none to run (a fresh run), under one of the
    caller's gathering."""
    if not jobs:
        with cli.progress(count, "gather") as bar:
            for j in range(count):
                yield j, None
                bar.update()
        return
    selections = zip((job[1] for job in jobs), pool.run(dedup.select_eps, jobs, "select"), strict=True)
    selected_j, selected = next(selections)
    for j in range(count):
        if j != selected_j:
            yield j, None
            continue
        yield j, selected
        selected_j, selected = next(selections, (count, None))  # (after the last: the run ends, its bar closes)


def earlier_outputs(save_folder: str) -> list[str]:
    """The eps_<e> folders already in save_folder: outputs of an earlier run, replaced when this one publishes."""
    if not os.path.isdir(save_folder):
        return []
    return sorted(name for name in os.listdir(save_folder)
                  if name.startswith("eps_") and os.path.isdir(os.path.join(save_folder, name)))


def main() -> None:
    args = parse_args()
    cli.absolute_paths(args, "sorted_clusters_path", "embeddings", "save_folder")
    check_args(args)
    workers = cli.num_workers(args.workers, args.distributor)
    tasks.check_distributor(args.distributor)
    run_log = cli.RunLog()
    # torch imported once, in the workers' fork server, rather than once per worker; locally it starts now
    pool = tasks.TaskPool(workers, args.distributor, preload=("torch", *PARSER_MODULES))
    pool.prepare()  # (a second or more) while this process checks the inputs
    clusters = scan_clusters(args.sorted_clusters_path, args.num_clusters, "--sorted_clusters_path", "--num_clusters")
    if three := next((c for c in clusters if c.rows and c.width == 3), None):
        raise UsageError(three.path, "has 3 columns (NeMo Curator 0.x): no row index to find its embeddings by",
                         "recluster with cluster_embeddings.py, whose files have the index in column 1")
    embeddings, source = find_embeddings(args)
    check_centroids(args.sorted_clusters_path, clusters, embeddings)
    run = fingerprint(args, clusters, embeddings)
    # --overwrite starts afresh; otherwise a completed run on the same inputs lends its scores and its eps.
    earlier = None if args.overwrite or not os.path.isdir(args.save_folder) else published(args.save_folder, run)
    eps_list = merged_eps(args.eps, earlier or [])
    eps_folders = sorted({dedup.eps_folder(eps) for eps in eps_list} | set(earlier_outputs(args.save_folder)))
    outputs = (*FIXED_OUTPUTS[:-1], *eps_folders, files.PARAMS_FILE)
    save = savedir.SaveDir(args.save_folder, args.overwrite, outputs, files.PARAMS_FILE, "--save_folder", resume=run,
                           replace=earlier is not None)

    for warning in dedup.rounding_warnings(args.eps, args.device):  # (once the inputs are checked, before the scoring)
        cli.log.warning(warning)
    sizes = np.array([c.rows for c in clusters], dtype=np.int64)
    total = int(sizes.sum())
    with save as out, pool:
        pool.start()  # (on Ray: Ray's start-up and the workers' imports) while this process draws most of
        similarity = dedup_report.SimilarityFigure(total).draw_frame()  # similarity.png (all but the scores)
        history = ""
        if earlier is not None:
            reuse_scores(args.save_folder, out.staging)
            history = files.read_text(os.path.join(args.save_folder, files.LOG_FILE))  # the log goes on from it
        for folder in (dedup.SCORES_DIR, dedup.MATCHES_DIR):
            os.makedirs(out.path(folder), exist_ok=True)
        embeddings.save(out.path(LAYOUT))

        # 1. Scores, for the clusters not scored yet, the largest first (one huge cluster does not finish last).
        #    Each task also writes its cluster's part file for every eps, from the keys it read: one read per file.
        done = set(os.listdir(out.path(dedup.MATCHES_DIR))) & set(os.listdir(out.path(dedup.SCORES_DIR)))
        todo = sorted((j for j, c in enumerate(clusters) if f"cluster_{j}.npy" not in done),
                      key=lambda j: -clusters[j].rows)
        parts = out.path(PARTS)
        shutil.rmtree(parts, ignore_errors=True)  # a killed run's parts, of its eps: never reused
        os.makedirs(parts)
        scored_eps = eps_list  # (the eps the scoring tasks select at; --remove-fraction adds one after them)
        jobs = [(clusters[j], j, out.path(LAYOUT), out.staging, args.which_to_keep, args.seed, args.device, scored_eps,
                 parts) for j in todo]
        counts = {eps: np.zeros(len(clusters), np.int64) for eps in eps_list}  # rows removed, per eps and cluster
        histogram, curve = np.zeros(len(dedup.HISTOGRAM_BINS) - 1, np.int64), np.zeros(len(dedup.EPS_GRID), np.int64)
        unsorted = 0
        for j, scored in zip(todo, pool.run(dedup.score_cluster, jobs, "score"), strict=True):
            unsorted += not scored.sorted
            for eps, gone in zip(scored_eps, scored.selection.removed, strict=True):
                counts[eps][j] = gone
            histogram, curve = histogram + scored.selection.histogram, curve + scored.selection.curve
        cli.stage("scored")
        if args.remove_fraction is not None:  # the eps that removes that fraction, known now that all are scored
            fraction_eps, removing = dedup.eps_removing(out.staging, len(clusters), args.remove_fraction, total)
            eps_list = merged_eps([fraction_eps], eps_list)
            out.add_output(dedup.eps_folder(fraction_eps))
            cli.log.info(f"--remove-fraction {args.remove_fraction:g}: {removing} rows, eps {fraction_eps!r}")

        # 2. Every eps: the parts not written yet (clusters scored by an earlier run, an eps known only now), from
        #    the scores; then all of them gathered in cluster order.
        late, scored_now = [eps for eps in eps_list if eps not in scored_eps], set(todo)
        counts.update({eps: np.zeros(len(clusters), np.int64) for eps in late})
        wanted = [late if j in scored_now else eps_list for j in range(len(clusters))]
        jobs = [(c, j, out.staging, wanted[j], parts) for j, c in enumerate(clusters) if wanted[j]]
        collected = {eps: selection.KeptKeyCollector(total) for eps in eps_list}
        removed_files = {}
        for eps in eps_list:
            os.makedirs(out.path(dedup.eps_folder(eps)), exist_ok=True)
            removed_files[eps] = open(out.path(os.path.join(dedup.eps_folder(eps), dedup.REMOVED_FILE)), "wb")
        try:
            for j, selected in in_cluster_order(pool, jobs, len(clusters)):
                if selected is not None:
                    for eps, gone in zip(wanted[j], selected.removed, strict=True):
                        counts[eps][j] = gone
                    if j not in scored_now:
                        histogram, curve = histogram + selected.histogram, curve + selected.curve
                for eps in eps_list:
                    collected[eps].add(selection.take_part(dedup.eps_part(parts, eps, j), removed_files[eps]))
        finally:
            for f in removed_files.values():
                f.close()
        os.rmdir(parts)
        removed = np.stack([counts[eps] for eps in eps_list], axis=1)  # (clusters, eps)
        for eps in eps_list:
            kept_keys = out.path(os.path.join(dedup.eps_folder(eps), dedup.KEPT_KEYS_FILE))
            files.save_npy(kept_keys, collected[eps].sorted_unique(workers))
        del collected

        # 3. The report.
        cli.stage("writing the report")
        dedup_report.write_stats(out.path(dedup.STATS_FILE), eps_list, total, removed)
        dedup_report.write_curve(out.path(dedup.CURVE_FILE), curve, total)
        dedup_report.write_cluster_stats(out.path(dedup.CLUSTER_STATS_FILE), eps_list, sizes, removed)
        figure = similarity.draw(eps_list, removed.sum(axis=0), histogram, curve)
        figure.savefig(out.path(dedup.PLOT_FILE), format="png")
        if unsorted:
            cli.log.warning(f"{unsorted} cluster file(s) are not sorted by distance: their rows were sorted before "
                            f"scoring, so that --which-to-keep {args.which_to_keep} means what it says")
        summary = ", ".join(f"eps {eps:g} removes {gone} ({gone / max(total, 1):.1%})"
                            for eps, gone in zip(eps_list, removed.sum(axis=0).tolist()))
        cli.log.info(f"k={len(clusters)} rows={total} scored={len(todo)} reused={len(clusters) - len(todo)}: {summary}")
        run_log.write(out.path(files.LOG_FILE), history)
        params = {name: value for name, value in sorted(vars(args).items()) if name not in ("workers", "debug")}
        params.update(embeddings=source, eps=eps_list, num_clusters=len(clusters), rows=total, dim=embeddings.dim,
                      removed={f"{eps:g}": int(gone) for eps, gone in zip(eps_list, removed.sum(axis=0))},
                      remove_fraction_eps=fraction_eps if args.remove_fraction is not None else None,
                      fingerprint=run, version=dbpkit.__version__)
        files.save_json(out.path(files.PARAMS_FILE), params)
    reused = f"; scores reused for {len(clusters) - len(todo)} clusters" if len(todo) < len(clusters) else ""
    where = tasks.on(args.distributor)
    print(f"deduplicated {total} rows in {len(clusters)} clusters ({args.which_to_keep}{where}): {summary}{reused} "
          f"-> {args.save_folder}")


def run() -> None:
    """The command (dbp-... once installed): main, with user mistakes as one line."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
