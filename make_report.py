"""Look at what was pruned: a static HTML report of a DBP run (and of its deduplication).

Reads prune.py's --save-dir (cluster_stats.csv, params.json, kept_keys.npy, quotas.png and the sorted
clusters its params.json names), deduplicate.py's --save_folder (dedup_stats.csv, removed_paths.txt per
eps, similarity.png) and, when the embeddings came from compute_embeddings.py, its failed.txt; from the
shards, in one streaming pass (a task per shard), only the images, captions and urls it shows.

Writes into --save_folder: index.html (the funnel, each step's parameters, the plots, the simplest and the
most complex clusters as strips of thumbnails, the table of all clusters, sortable), clusters/cluster_<j>.html
(the members nearest the centroid, at the cut, the farthest, each marked kept or pruned), dedup.html (per eps,
removed images beside those they duplicate: the pairs nearest the threshold, then a seeded sample),
thumbs/ (JPEG thumbnails named by a hash of the key), report.js, report.css, the plots, and report.json
(every thumbnail shown: key, cluster, role, page). The pages open from file:// with no server and load
nothing from outside the folder. --inline writes one self-contained index.html instead.

    python make_report.py --prune-dir RUN --dedup-dir DEDUP --shards "DATA/{00000..00099}.tar" \\
        --save_folder REPORT

(Installed with pip, `dbp-report` is the same command as `python make_report.py`.)
"""

import functools
import os
import shutil
from collections import Counter

import numpy as np

import dbp_utils as du
from dbpkit import cli, files, report_data, savedir, tasks
from dbpkit.dedup import PLOT_FILE as DEDUP_PLOT_FILE
from dbpkit.errors import UsageError
from dbpkit.keys import as_text, strip_extensions
from dbpkit.prune_report import PLOT_FILE as PRUNE_PLOT_FILE
from dbpkit.report_html import (
    CLUSTERS_DIR,
    DEDUP_PAGE,
    INDEX_PAGE,
    SCRIPT_FILE,
    STYLE_FILE,
    Site,
    Thumb,
    cluster_page,
    write_report,
)
from dbpkit.samples import READER_MODULES, find_shards
from dbpkit.thumbs import THUMBS_DIR, Found, gather_images, thumb_name
from dbpkit.trie import KEPT_KEYS_FILE

REPORT_FILE = "report.json"  # every thumbnail shown; written last: it marks a completed report
OUTPUTS = (INDEX_PAGE, DEDUP_PAGE, CLUSTERS_DIR, THUMBS_DIR, SCRIPT_FILE, STYLE_FILE, PRUNE_PLOT_FILE, DEDUP_PLOT_FILE,
           REPORT_FILE)
NO_SHARDS = "no --shards given: images not shown"
NOT_FOUND = "not found in the shards given (--shards)"
CLUSTER_STRIPS = ("nearest", "cut", "farthest")  # a cluster page's; the index shows each extreme's "spread"
TABLE_COLUMNS = ("cluster_id", "size", "d_intra", "d_inter", "complexity", "probability", "target", "quota",
                 "kept_fraction")


def parse_args():
    parser = cli.make_parser(__doc__)
    cli.add_flag(parser, "--prune-dir", required=True, help="prune.py's --save-dir (the run to show)")
    cli.add_flag(parser, "--dedup-dir", default=None, help="deduplicate.py's --save_folder (adds dedup.html)")
    cli.add_flag(parser, "--shards", default=None,
                 help="the webdataset shards the run's images came from (DATA/{00000..00099}.tar); without it, "
                      "the report has every table and plot and placeholders for the images")
    cli.add_flag(parser, "--save_folder", required=True, help="folder for the report (created)")
    cli.add_flag(parser, "--max-clusters", type=int, default=200,
                 help="clusters given a page: the least and most complex and a seeded sample between (default 200)")
    cli.add_flag(parser, "--per-strip", type=int, default=8, help="thumbnails per strip (default 8)")
    cli.add_flag(parser, "--pairs", type=int, default=100, help="duplicate pairs shown per eps (default 100)")
    cli.add_flag(parser, "--thumb-size", type=int, default=128, help="thumbnail size in pixels (default 128)")
    cli.add_flag(parser, "--seed", type=int, default=0, help="seed of the sampled clusters and pairs (default 0)")
    cli.add_flag(parser, "--inline", action="store_true",
                 help="one self-contained index.html (thumbnails and plots embedded), to attach or mail")
    cli.add_flag(parser, "--overwrite", action="store_true", help="replace a completed report in --save_folder")
    cli.add_workers_flag(parser)
    tasks.add_distributor_flag(parser)
    return parser.parse_args()


def check_args(args) -> None:
    for flag, value, low in (("--max-clusters", args.max_clusters, 1), ("--per-strip", args.per_strip, 1),
                             ("--pairs", args.pairs, 0), ("--thumb-size", args.thumb_size, 16),
                             ("--seed", args.seed, 0)):
        if value < low:
            raise UsageError(flag, f"{value} is less than {low}", f"pass {low} or more")
    tasks.check_distributor(args.distributor)
    cli.absolute_paths(args, "prune_dir", "dedup_dir", "save_folder")


@functools.cache  # each shown key is looked for (wanted) and then looked up (thumb)
def stripped(key: str) -> str:
    """A key as a sample is matched: without the extension of its last component."""
    return str(as_text(strip_extensions(np.array([key.encode("utf-8", "surrogateescape")])))[0])


def thumb(key: str, role: str, found: dict[str, Found] | None, missing: str, cluster: int | None = None,
          note: str = "") -> Thumb:
    """A Thumb for a key: its image and text when the shards held it, else a placeholder saying why."""
    form = stripped(key)
    sample = found.get(form) if found is not None else None
    if sample is None:
        return Thumb(key, role, cluster, note, missing=missing)
    image = thumb_name(form) if not sample.missing else None
    return Thumb(key, role, cluster, note, sample.caption, sample.url, image, sample.missing)


def number(text: str, digits: int = 4) -> str:
    value = report_data.as_number(text)
    return text if value != value or float(value).is_integer() else f"{value:.{digits}g}"


def funnel(run, embed_params, failed_path, dedup_params, dedup_eps, clustered: str | None) -> list[dict]:
    """The samples at each step, with its parameters; `clustered`: the eps whose kept rows were clustered."""
    params = run.params
    first = embed_params["rows"] if embed_params else (dedup_params or {}).get("rows", params["total_rows"])
    steps = []
    if embed_params:
        steps.append(("images embedded", embed_params["rows"], f"model {embed_params['model']}, "
                      f"{embed_params.get('shard_count', '?')} shards"))
        failed = report_data.count_lines(failed_path) if failed_path else embed_params.get("failed", 0)
        steps.append(("failed to decode (not embedded)", failed, "listed in failed.txt"))
    if dedup_params:
        for e in dedup_eps:
            steps.append((f"kept by deduplication at eps {e.eps}", e.kept,
                          f"SemDeDup, k = {dedup_params['num_clusters']}, keep {dedup_params['which_to_keep']}"
                          f"{'; these rows were clustered for DBP' if e.eps == clustered else ''}"))
    steps.append(("in the clusters pruned", params["total_rows"], f"k = {params['num_clusters']}"))
    steps.append(("kept by DBP", params["kept_samples"],
                  f"prune ratio {params['prune_ratio']:g}, T = {params['temperature']:g}, {params['density']}, "
                  f"keep {params['which_to_keep']}, cls-bal-ratio {params['cls_bal_ratio']:g}"))
    return [{"label": label, "count": count, "share": f"{count / first:.1%}" if first else "",
             "params": detail} for label, count, detail in steps]


def main() -> None:
    args = parse_args()
    check_args(args)
    workers = cli.num_workers(args.workers, args.distributor, cli.IO_WORKERS_PER_CPU)
    # The shards are read with webdataset, whose import imports torch (a second or more): once, in the workers'
    # fork server, started now so that it imports while this process checks the inputs (this one needs
    # webdataset for the shard pattern too: both at once, on two cores).
    pool = tasks.TaskPool(workers, args.distributor, preload=READER_MODULES, commands=True)
    if args.shards:
        pool.prepare()

    # 1. Inputs, checked before anything is written.
    run = report_data.load_prune_run(args.prune_dir)
    clustered = report_data.clustered_eps(run, args.dedup_dir) if args.dedup_dir else None
    dedup_params, dedup_eps = (report_data.load_dedup(args.dedup_dir, args.pairs, args.seed) if args.dedup_dir
                               else (None, []))
    urls = find_shards(args.shards) if args.shards else []
    embed_params, failed_path = report_data.embedding_run(run)
    kept_keys = du.load_kept_keys(os.path.join(args.prune_dir, KEPT_KEYS_FILE))
    save = savedir.SaveDir(args.save_folder, args.overwrite, OUTPUTS, REPORT_FILE, "--save_folder")

    # 2. What to show: the clusters, their strips, the pairs.
    sizes = np.array([c.rows for c in run.clusters])
    complexity = np.array([report_data.as_number(row["complexity"]) for row in run.stats])
    shown, left_out = report_data.choose_clusters(complexity, sizes, args.max_clusters, args.seed)
    simplest, most_complex = report_data.extremes(complexity, sizes)
    cli.stage("reading the clusters")
    views = {j: report_data.cluster_view(run, j, args.per_strip, kept_keys)
             for j in sorted(set(shown) | set(simplest) | set(most_complex))}
    wanted = {stripped(m.key) for view in views.values() for strip in view.strips.values() for m in strip}
    wanted |= {stripped(key) for e in dedup_eps for pair in e.near + e.sampled
               for key in (pair.removed, pair.duplicate_of)}

    with save as out:
        thumbs = out.path(THUMBS_DIR)
        os.mkdir(thumbs)
        found, unreadable = None, []
        if urls:
            with pool:
                found, unreadable = gather_images(urls, wanted, args.thumb_size, thumbs, pool)
        missing = NOT_FOUND if urls else NO_SHARDS
        if unreadable:
            missing += f" ({len(unreadable)} shard(s) could not be read to the end)"

        def member_thumbs(view, name: str) -> list[Thumb]:
            return [thumb(m.key, "kept" if m.kept else "pruned", found, missing, view.cluster_id,
                          f"d = {m.distance:.4g}") for m in view.strips[name]]

        site = Site(args.inline, thumbs, set(shown), bool(dedup_eps))
        clusters = []
        for j in sorted(shown):  # (inline, the pages follow each other in this order)
            view = views[j]
            stats = [(name, number(view.stats[name])) for name in TABLE_COLUMNS[1:] if name in view.stats]
            clusters.append({"view": view, "stats": stats,
                             "strips": {name: member_thumbs(view, name) for name in CLUSTER_STRIPS}})
        extremes = [{"title": title, "rows": [{"cluster": j, "complexity": number(run.stats[j]["complexity"]),
                                               "kept": f"{run.stats[j]['quota']} of {run.stats[j]['size']}",
                                               "thumbs": member_thumbs(views[j], "spread")} for j in ids]}
                    # (what the softmax gives them; the fraction each keeps also depends on its size)
                    for title, ids in ((f"The {len(most_complex)} most complex clusters (the largest shares of the "
                                        "kept samples)", most_complex),
                                       (f"The {len(simplest)} simplest clusters (the smallest shares)", simplest))]
        figures = [{"title": title, "name": name, "path": os.path.join(source, name)}
                   for title, name, source in (("DBP quotas per cluster", PRUNE_PLOT_FILE, args.prune_dir),
                                               ("SemDeDup similarities", DEDUP_PLOT_FILE, args.dedup_dir))
                   if source and os.path.isfile(os.path.join(source, name))]
        dedup = None
        if dedup_eps:
            dedup = {"summary": f"{dedup_params['rows']} rows, {dedup_params['num_clusters']} clusters, keep "
                                f"{dedup_params['which_to_keep']}: per eps, up to {args.pairs} pairs",
                     "eps": [{"eps": e.eps, "removed": e.removed, "kept": e.kept,
                              "threshold": f"{np.float32(1 - float(e.eps)):.8g}",
                              "near": pair_views(e.near, found, missing),
                              "sampled": pair_views(e.sampled, found, missing)} for e in dedup_eps]}
        entries = report_entries(clusters, extremes, dedup, args.inline)
        placeholders = Counter(reason for _, reason in {(e["key"], e["missing"]) for e in entries if e["missing"]})
        notes = [f"{count} image(s) shown as placeholders: {reason}" for reason, count in sorted(placeholders.items())]
        notes += [f"shard {url} could not be read to the end: {why}" for url, why in unreadable]
        if dedup and report_data.clustered_every_row(run):
            notes.append("The clusters pruned hold every embedded row, not the rows deduplication kept: "
                         "cluster_embeddings.py ran without --subset")
        if left_out:
            notes.append(f"{len(shown)} of {int((sizes > 0).sum())} non-empty clusters have a page (the "
                         f"{max(args.max_clusters // 4, 1)} least and most complex and a seeded sample between); "
                         f"{left_out} were left out (--max-clusters {args.max_clusters})")
        index = {"title": f"DBP report: {os.path.basename(args.prune_dir.rstrip(os.sep))}",
                 "funnel": funnel(run, embed_params, failed_path, dedup_params, dedup_eps, clustered), "notes": notes,
                 "figures": figures, "extremes": extremes, "columns": TABLE_COLUMNS, "rows": table_rows(run.stats),
                 "table_note": f"{len(run.stats)} clusters; a cluster id links to its page where it has one."}
        cli.stage("writing the pages")
        write_report(out.staging, site, index, clusters, dedup)
        if not args.inline:
            for fig in figures:
                shutil.copyfile(fig["path"], out.path(fig["name"]))
        else:
            shutil.rmtree(thumbs)  # embedded in index.html
        files.save_json(out.path(REPORT_FILE), entries)
    pages = 1 if args.inline else 1 + len(clusters) + bool(dedup)
    images = len({e["key"] for e in entries})  # (an image can be shown more than once: a cluster's strip and page)
    print(f"report of {len(run.stats)} clusters ({len(shown)} with a page), {len(entries)} thumbnails of {images} "
          f"images ({sum(placeholders.values())} of them placeholders), {pages} page(s)"
          f"{tasks.on(args.distributor) if urls else ''} -> {args.save_folder}")


def pair_views(pairs, found, missing: str) -> list[dict]:
    """The pairs of dedup.html: the similarity is shown once, beside the two thumbnails (not under one as well)."""
    return [{"similarity": p.similarity, "removed": thumb(p.removed, "removed", found, missing),
             "duplicate": thumb(p.duplicate_of, "duplicate-of", found, missing)} for p in pairs]


def table_rows(stats: list[dict]) -> list[dict]:
    """cluster_stats.csv's rows for the sortable table: each cell its raw value (to sort by) and its text."""
    return [{"cluster": int(row["cluster_id"]),
             "cells": [{"value": row[c], "text": number(row[c])} for c in TABLE_COLUMNS]} for row in stats]


def report_entries(clusters: list[dict], extremes: list[dict], dedup: dict | None, inline: bool) -> list[dict]:
    """report.json: every thumbnail shown, with the page it is on."""
    entries = []

    def add(t: Thumb, page: str, strip: str, eps: str | None = None) -> None:
        image = None if inline or not t.image else f"{THUMBS_DIR}/{t.image}"
        entries.append({"key": t.key, "cluster": t.cluster, "role": t.role, "page": INDEX_PAGE if inline else page,
                        "strip": strip, "eps": eps, "image": image, "missing": t.missing})

    for group in extremes:
        for row in group["rows"]:
            for t in row["thumbs"]:
                add(t, INDEX_PAGE, "index")
    for c in clusters:
        for name, thumbs in c["strips"].items():
            for t in thumbs:
                add(t, cluster_page(c["view"].cluster_id), name)
    for e in (dedup or {}).get("eps", []):
        for strip in ("near", "sampled"):
            for pair in e[strip]:
                add(pair["removed"], DEDUP_PAGE, strip, e["eps"])
                add(pair["duplicate"], DEDUP_PAGE, strip, e["eps"])
    return entries


def run() -> None:
    """The command (dbp-report once installed): main, with user mistakes as one line."""
    cli.run_main(main)


if __name__ == "__main__":
    run()
