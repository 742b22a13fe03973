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

import numpy as np

import dbp_cli as cli
import dbp_dedup as dd
import dbp_embeddings as de
import dbp_tasks
import dbp_utils as du
from dbp_clusters import CENTROIDS_FILE, scan_clusters

PARAMS_FILE = "params.json"
LAYOUT, PARTS = "embeddings.json", ".parts"  # in the staging folder
CLUSTERING_FILE = "clustering.json"  # cluster_embeddings.py's record, beside sorted_clusters/
FIXED_OUTPUTS = (dd.SCORES_DIR, dd.MATCHES_DIR, dd.STATS_FILE, dd.CLUSTER_STATS_FILE, dd.PLOT_FILE, du.LOG_FILE,
                 PARAMS_FILE)


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
    cli.add_flag(parser, "--eps", type=float, nargs="+", required=True,
                 help="one or more eps in (0, 1): a member is removed when its similarity to an earlier one "
                      "> 1 - eps (SemDeDup used 0.0001 to 0.1)")
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
    dbp_tasks.add_distributor_flag(parser)
    return parser.parse_args()


def check_args(args) -> None:
    for eps in args.eps:
        cli.check_range("--eps", eps, 0, 1, low_open=True, high_open=True,
                        fix="eps is in (0, 1): 0.05 removes members more than 95% similar to an earlier one")
    named = {}
    for eps in args.eps:
        if named.setdefault(dd.eps_folder(eps), eps) != eps:
            raise cli.UsageError("--eps", f"{named[dd.eps_folder(eps)]!r} and {eps!r} would both be written to "
                                 f"{dd.eps_folder(eps)}", "pass values that differ in their first 6 digits")
    if args.seed < 0:
        raise cli.UsageError("--seed", f"{args.seed} is negative", "pass a seed >= 0 (default 1234)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise cli.UsageError("--device", "cuda was asked for, but torch sees no CUDA device",
                                 "pass --device cpu, or run where a GPU is")


def find_embeddings(args) -> tuple[de.Embeddings, str]:
    """--embeddings, or the embeddings of the clustering.json beside the cluster files; and where they are."""
    path, npz_key = args.embeddings, args.npz_key
    record = os.path.join(os.path.dirname(os.path.abspath(args.sorted_clusters_path)), CLUSTERING_FILE)
    if path is None:
        clustering = cli.load_json(record)
        if not isinstance(clustering, dict) or not clustering.get("embeddings"):
            raise cli.UsageError("--embeddings", f"is required: there is no {CLUSTERING_FILE} naming them in "
                                 f"{os.path.dirname(record)}", "pass the embeddings the clusters were made from")
        path, npz_key = clustering["embeddings"], npz_key or clustering.get("npz_key")
    return de.find_embeddings(path, None, None, npz_key or "l14_img", with_keys=False), os.path.abspath(path)


def check_centroids(sorted_dir: str, dim: int) -> None:
    """Embeddings of another dimension than the centroids' are another model's: refused."""
    path = os.path.join(os.path.dirname(os.path.abspath(sorted_dir)), CENTROIDS_FILE)
    if os.path.isfile(path):
        shape = np.load(path, mmap_mode="r").shape
        if len(shape) == 2 and shape[1] != dim:
            raise cli.UsageError("--embeddings", f"have dimension {dim} but the centroids in {path} have {shape[1]}",
                                 "pass the embeddings the clusters were made from")


def fingerprint(args, clusters: list, embeddings: de.Embeddings) -> dict:
    """What the scores depend on: a rerun that matches reuses them (whatever its eps)."""
    files = cli.files_fingerprint([c.path for c in clusters] + embeddings.files())
    return {"files": files, "which_to_keep": args.which_to_keep, "seed": args.seed, "device": args.device}


def published(save_folder: str, run: dict) -> list[float] | None:
    """The eps of a completed run in save_folder that scored the same inputs (its scores are reused), or None."""
    params = cli.load_json(os.path.join(save_folder, PARAMS_FILE))
    if isinstance(params, dict) and params.get("fingerprint") == run:
        return params.get("eps", [])
    return None


def reuse_scores(save_folder: str, staging: str) -> int:
    """Link a completed run's score files into the staging folder (linked, not moved: they stay in place until
    the new run is published); a cluster whose scores or matches are missing is scored again. Returns how many
    clusters' scores were linked."""
    folders = [os.path.join(save_folder, folder) for folder in (dd.SCORES_DIR, dd.MATCHES_DIR)]
    found = [set(os.listdir(f)) if os.path.isdir(f) else set() for f in folders]
    both = found[0] & found[1]
    for folder in (dd.SCORES_DIR, dd.MATCHES_DIR):
        os.makedirs(os.path.join(staging, folder), exist_ok=True)
        for name in both:
            if not os.path.exists(target := os.path.join(staging, folder, name)):
                os.link(os.path.join(save_folder, folder, name), target)
    return len(both)


def merged_eps(new: list[float], earlier: list[float]) -> list[float]:
    """This run's eps and an earlier run's, sorted; an earlier eps written to the same eps_<e> folder as a new
    one (they differ past the 6th digit) gives way to the new one."""
    named = {dd.eps_folder(eps): eps for eps in earlier}
    named.update({dd.eps_folder(eps): eps for eps in new})
    return sorted(named.values())


def earlier_outputs(save_folder: str) -> list[str]:
    """The eps_<e> folders already in save_folder: outputs of an earlier run, replaced when this one publishes."""
    if not os.path.isdir(save_folder):
        return []
    return sorted(name for name in os.listdir(save_folder) if name.startswith("eps_"))


def main() -> None:
    args = parse_args()
    cli.absolute_paths(args, "sorted_clusters_path", "embeddings", "save_folder")
    check_args(args)
    workers = cli.num_workers(args.workers)
    dbp_tasks.check_distributor(args.distributor)
    run_log = cli.RunLog()
    clusters = scan_clusters(args.sorted_clusters_path, args.num_clusters, "--sorted_clusters_path", "--num_clusters")
    if three := next((c for c in clusters if c.rows and c.width == 3), None):
        raise cli.UsageError(three.path, "has 3 columns (NeMo Curator 0.x): no row index to find its embeddings by",
                             "recluster with cluster_embeddings.py, whose files have the index in column 1")
    embeddings, source = find_embeddings(args)
    check_centroids(args.sorted_clusters_path, embeddings.dim)
    run = fingerprint(args, clusters, embeddings)
    # --overwrite starts afresh; otherwise a completed run on the same inputs lends its scores and its eps.
    earlier = None if args.overwrite or not os.path.isdir(args.save_folder) else published(args.save_folder, run)
    eps_list = merged_eps(args.eps, earlier or [])
    eps_folders = sorted({dd.eps_folder(eps) for eps in eps_list} | set(earlier_outputs(args.save_folder)))
    outputs = (*FIXED_OUTPUTS[:-1], *eps_folders, PARAMS_FILE)
    save = cli.SaveDir(args.save_folder, args.overwrite or earlier is not None, outputs, PARAMS_FILE,
                       "--save_folder", resume=run)

    # torch imported once, in the fork server, rather than once per worker
    with save as out, dbp_tasks.TaskPool(workers, args.distributor, preload=("torch",)) as pool:
        history = ""
        if earlier is not None:
            reuse_scores(args.save_folder, out.staging)
            history = cli.read_text(os.path.join(args.save_folder, du.LOG_FILE))  # the log goes on from it
        for folder in (dd.SCORES_DIR, dd.MATCHES_DIR):
            os.makedirs(out.path(folder), exist_ok=True)
        embeddings.save(out.path(LAYOUT))

        # 1. Scores, for the clusters not scored yet, the largest first (one huge cluster does not finish last).
        done = set(os.listdir(out.path(dd.MATCHES_DIR))) & set(os.listdir(out.path(dd.SCORES_DIR)))
        todo = sorted((j for j, c in enumerate(clusters) if f"cluster_{j}.npy" not in done),
                      key=lambda j: -clusters[j].rows)
        tasks = [(clusters[j], j, out.path(LAYOUT), out.staging, args.which_to_keep, args.seed, args.device)
                 for j in todo]
        unsorted = sum(not scored.sorted for scored in pool.run(dd.score_cluster, tasks, "score"))
        cli.stage("scored")

        # 2. Every eps, from the scores: each cluster's part, then gathered in cluster order.
        parts = out.path(PARTS)
        os.makedirs(parts, exist_ok=True)
        sizes = np.array([c.rows for c in clusters], dtype=np.int64)
        collected = {eps: du.KeptKeyCollector(int(sizes.sum())) for eps in eps_list}
        removed_files = {}
        for eps in eps_list:
            os.makedirs(out.path(dd.eps_folder(eps)), exist_ok=True)
            removed_files[eps] = open(out.path(os.path.join(dd.eps_folder(eps), dd.REMOVED_FILE)), "wb")
        tasks = [(c, j, out.staging, eps_list, parts) for j, c in enumerate(clusters)]
        removed = np.zeros((len(clusters), len(eps_list)), np.int64)
        histogram, curve = 0, 0
        try:
            for j, selected in enumerate(pool.run(dd.select_cluster, tasks, "select")):
                removed[j] = selected.removed
                histogram, curve = histogram + selected.histogram, curve + selected.curve
                for eps in eps_list:
                    collected[eps].add(du.take_part(dd.part_file(parts, eps, j), removed_files[eps]))
        finally:
            for f in removed_files.values():
                f.close()
        os.rmdir(parts)
        for eps in eps_list:
            np.save(out.path(os.path.join(dd.eps_folder(eps), dd.KEPT_KEYS_FILE)), collected[eps].sorted_unique())
        del collected

        # 3. The report.
        total = int(sizes.sum())
        dd.write_stats(out.path(dd.STATS_FILE), eps_list, total, removed)
        dd.write_cluster_stats(out.path(dd.CLUSTER_STATS_FILE), eps_list, sizes, removed)
        dd.plot_similarity(out.path(dd.PLOT_FILE), eps_list, removed.sum(axis=0), histogram, curve, total)
        if unsorted:
            cli.log.warning(f"{unsorted} cluster file(s) are not sorted by distance: their rows were sorted before "
                            f"scoring, so that --which-to-keep {args.which_to_keep} means what it says")
        summary = ", ".join(f"eps {eps:g} removes {gone} ({gone / max(total, 1):.1%})"
                            for eps, gone in zip(eps_list, removed.sum(axis=0).tolist()))
        cli.log.info(f"k={len(clusters)} rows={total} scored={len(todo)} reused={len(clusters) - len(todo)}: {summary}")
        with open(out.path(du.LOG_FILE), "w") as f:
            f.write(history + run_log.finished())
        params = {name: value for name, value in sorted(vars(args).items()) if name not in ("workers", "debug")}
        params.update(sorted_clusters_path=os.path.abspath(args.sorted_clusters_path), embeddings=source,
                      save_folder=os.path.abspath(args.save_folder),
                      eps=eps_list, num_clusters=len(clusters), rows=total, dim=embeddings.dim,
                      removed={f"{eps:g}": int(gone) for eps, gone in zip(eps_list, removed.sum(axis=0))},
                      fingerprint=run, version=cli.__version__)
        cli.save_json(out.path(PARAMS_FILE), params)
    reused = f"; scores reused for {len(clusters) - len(todo)} clusters" if len(todo) < len(clusters) else ""
    where = dbp_tasks.on(args.distributor)
    print(f"deduplicated {total} rows in {len(clusters)} clusters ({args.which_to_keep}{where}): {summary}{reused} "
          f"-> {args.save_folder}")


def run() -> None:
    """The command (dbp-... once installed): main, with user mistakes as one line."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
