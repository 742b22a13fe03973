"""k-means as SemDeDup runs it (faiss, spherical, on a seeded sample), the streamed assignment of every row to
its nearest centroid, and the sorted cluster files written from it.

faiss is imported inside the functions that use it; the assignment and the writing are tasks (dbpkit.tasks).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from dbpkit.clusters import cluster_table, save_cluster_file
from dbpkit.files import atomic_open, load_json, save_npy, write_npy
from dbpkit.layouts import CHUNK_ROWS, KEYS_FILE, SUBSET_ROWS, Embeddings, Part, _mapped, checked_unit, unit_rows

if TYPE_CHECKING:
    from dbpkit.tasks import TaskPool


FAISS_NO_BLAS = 1 << 30  # query batches at least this large go to BLAS: never


def exact_faiss(threads: int) -> Any:
    """faiss, on `threads` threads, computing every inner product and distance the same way for any number of
    them: past a batch of 20 queries faiss hands them to BLAS, whose sums may split differently by thread
    count (BLAS libraries promise nothing there; the last digits of a distance, and so near ties, would
    depend on --workers); its own SIMD loop per query does not. That costs time: k-means of 128 000 rows,
    k = 500, takes 2.2x BLAS's time at dim 64 and 4.3x at dim 768 (2-core x86; benchmarks/bench_cluster.py
    measures both)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    faiss.cvar.distance_compute_blas_threshold = FAISS_NO_BLAS
    return faiss


POINTS_PER_CENTROID = 256  # faiss's own cap on training points per centroid: the default sample size
SORTED_DIR = "sorted_clusters"
CLUSTERING_FILE = "clustering.json"  # cluster_embeddings.py's record, beside sorted_clusters/ (written last)
LABELS, DISTANCES = "labels.npy", "distances.npy"  # per row: its cluster, its distance to the centroid
ORDER = "order.npy"  # the rows sorted by cluster (stably: in row order within each)
ASSIGN_DIR = "assign"  # each range's labels and distances, until all are assigned
ASSIGN_ROWS = 1 << 18  # rows assigned by one task


def clustering_record(sorted_dir: str) -> tuple[str, dict]:
    """Where cluster_embeddings.py's CLUSTERING_FILE of these sorted clusters is (beside their folder), and what it
    says ({} where there is none)."""
    path = os.path.join(os.path.dirname(os.path.abspath(sorted_dir)), CLUSTERING_FILE)
    record = load_json(path)
    return path, record if isinstance(record, dict) else {}


def train_kmeans(embeddings: Embeddings, k: int, niter: int, seed: int, sample_size: int, spherical: bool,
                 threads: int, subset: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """faiss.Kmeans on a seeded uniform sample of the rows (of the `subset` rows, when given): (centroids float32
    (k, dim), final objective)."""
    x = training_sample(embeddings, seed, sample_size, subset)
    return fit(x, k, niter, seed, spherical, threads)


def training_sample(embeddings: Embeddings, seed: int, sample_size: int,
                    subset: np.ndarray | None = None) -> np.ndarray:
    """The rows k-means trains on: a seeded uniform sample (of the `subset` rows, when given), L2-normalised."""
    from dbpkit.cli import stoppable  # (not at the top: dbp_utils imports this module, and nothing of the CLI)

    count = embeddings.rows if subset is None else len(subset)
    rows = np.sort(np.random.default_rng(seed).choice(count, size=sample_size, replace=False))
    # (at SemDeDup's k, millions of rows read all over LAION's embeddings: minutes from a disk)
    return stoppable(embeddings.unit_rows_at, rows if subset is None else subset[rows])


def fit(x: np.ndarray, k: int, niter: int, seed: int, spherical: bool, threads: int) -> tuple[np.ndarray, float]:
    """faiss.Kmeans of the rows x: (centroids float32 (k, dim), final objective)."""
    from dbpkit.cli import stoppable

    sample_size = len(x)
    faiss = exact_faiss(threads)
    # Every sampled row is used (faiss would subsample past 256 per centroid), and faiss's warning about
    # few points per centroid, printed straight to stderr, is left to our own checks.
    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=spherical, verbose=False,
                          max_points_per_centroid=-(-sample_size // k), min_points_per_centroid=1)
    stoppable(_train, kmeans, x, threads)  # (hours at SemDeDup's k: Ctrl-C and SIGTERM act meanwhile)
    return kmeans.centroids, float(kmeans.obj[-1])


def _train(kmeans: Any, x: np.ndarray, threads: int) -> None:
    exact_faiss(threads)  # (OpenMP's thread count is the calling thread's own)
    kmeans.train(x)


ASSIGNED = np.dtype([("label", "<i4"), ("distance", "<f4")])  # a row's nearest centroid and its distance to it


def assign(embeddings: Embeddings, centroids_file: str, spherical: bool, work: str, pool: TaskPool,
           subset: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every row's (or every `subset` row's) nearest centroid and its cosine distance to it: (labels, distances).
    One task per range of ASSIGN_ROWS rows of a part writes ASSIGN_DIR/<part>_<first row>.npy; a rerun does
    only the missing ones."""
    folder = os.path.join(work, ASSIGN_DIR)
    os.makedirs(folder, exist_ok=True)
    starts = embeddings.starts()
    ranges = [(i, first, min(first + ASSIGN_ROWS, part.rows)) for i, part in enumerate(embeddings.parts)
              for first in range(0, part.rows, ASSIGN_ROWS)]
    files = [os.path.join(folder, f"{i}_{first}.npy") for i, first, _ in ranges]
    tasks = [(embeddings.parts[i], first, stop, centroids_file, spherical, path, subset, int(starts[i]))
             for (i, first, stop), path in zip(ranges, files) if not os.path.exists(path)]
    for _ in pool.run(assign_rows, tasks, "assign", unit="range"):
        pass
    assigned = np.concatenate([np.load(path) for path in files])
    return assigned["label"], assigned["distance"]


def assign_rows(task: tuple[Part, int, int, str, bool, str, str | None, int]) -> None:
    """One range of a part's rows (those in the `subset` file only, when given; `start` is the part's first row
    in the whole): each row's nearest centroid (faiss, by inner product for spherical k-means, else by L2)
    and 1 - its cosine to that centroid, computed in float64 per row so that it is the same on any machine
    and for any thread count; written to `path`."""
    part, first, stop, centroids_file, spherical, path, subset, start = task
    centroids = np.load(centroids_file)
    faiss = exact_faiss(1)  # the tasks are the parallelism
    index = faiss.IndexFlatIP(part.dim) if spherical else faiss.IndexFlatL2(part.dim)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    directions = unit_rows(centroids.astype(np.float64))
    if subset is None:  # (the rows of the part each chunk holds, the chunk)
        chunks = ((np.arange(row, row + len(x)), x) for row, x in part.chunks(first, stop))
    else:
        selected = _mapped(subset)
        local = selected[np.searchsorted(selected, start + first):np.searchsorted(selected, start + stop)] - start
        row_chunks = (local[a:a + CHUNK_ROWS] for a in range(0, len(local), CHUNK_ROWS))
        chunks = ((rows, part.take(rows)) for rows in row_chunks)
    pieces = []
    for rows, x in chunks:
        x = checked_unit(x, part.path, rows)
        _, nearest = index.search(x, 1)
        piece = np.empty(len(x), ASSIGNED)
        piece["label"] = nearest[:, 0]
        piece["distance"] = 1 - np.einsum("ij,ij->i", x.astype(np.float64), directions[nearest[:, 0]])
        pieces.append(piece)
    with atomic_open(path) as f:
        write_npy(f, np.concatenate(pieces) if pieces else np.empty(0, ASSIGNED))


def write_clusters(folder: str, work: str, labels: np.ndarray, k: int, descending: bool, pool: TaskPool) -> None:
    """SORTED/cluster_{j}.npy for every cluster not written yet (a rerun finishes a killed run). Each task
    reads its cluster's rows from the work files: the rows in cluster order, their distances and keys."""
    os.makedirs(folder, exist_ok=True)
    order = os.path.join(work, ORDER)
    if not os.path.exists(order):
        save_npy(order, np.argsort(labels, kind="stable"))  # each cluster's rows, in row order
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=k))])
    todo = [j for j in range(k) if not os.path.exists(os.path.join(folder, f"cluster_{j}.npy"))]
    tasks = ((os.path.join(folder, f"cluster_{j}.npy"), work, j, int(bounds[j]), int(bounds[j + 1]), descending)
             for j in todo)
    for _ in pool.run(write_cluster, tasks, "write", total=len(todo)):
        pass
    _mapped.cache_clear()  # unmapped, when this process wrote them


def write_cluster(task: tuple[str, str, int, int, int, bool]) -> None:
    """One cluster's file, from the rows [start, stop) of the work files' cluster order (positions among the
    subset's rows, when the work folder holds a subset)."""
    path, work, j, start, stop, descending = task
    positions = np.array(_mapped(os.path.join(work, ORDER))[start:stop])
    distances = _mapped(os.path.join(work, DISTANCES))[positions]
    subset = os.path.join(work, SUBSET_ROWS)
    rows = np.array(_mapped(subset)[positions]) if os.path.exists(subset) else positions
    keys = _mapped(os.path.join(work, KEYS_FILE))[rows]
    save_cluster_file(path, cluster_table(keys, rows, distances, j, descending))
