"""Make a small SemDeDup-style data set to run DBP on, with no data of your own.

Draws synthetic image-like embeddings (unit vectors around concepts of very different density:
some tight, some diffuse, some large, some small), clusters them with real faiss spherical
k-means and writes what SemDeDup's clustering and sort_clusters.py write:

    OUT/kmeans_centroids.npy               float32 (k, dim)
    OUT/sorted_clusters/cluster_<j>.npy    np.save of a list of (path, index, distance, cluster) tuples,
                                           sorted by distance (descending = SemDeDup's keep_hard=True)
    OUT/embeddings.npy, OUT/paths.txt      the embeddings and the sample keys, in dataset order

Keys look like LAION's webdataset keys: `00012/000120034.jpg` is sample 120034 in shard 00012.
With --embeddings-only it writes just embeddings.npy and paths.txt, for cluster_embeddings.py (with
--duplicates, some of them nearly repeating others: something for deduplicate.py to find).

    python examples/make_toy_clusters.py --out toy --n 20000 --k 50 --dim 64 --seed 0
    python examples/make_toy_clusters.py --out toy --n 20000 --dim 64 --embeddings-only
"""

import argparse
import os

import numpy as np

SORTED_DIR = "sorted_clusters"
CENTROIDS_FILE = "kmeans_centroids.npy"
PATH_DTYPE = "S24"  # SemDeDup's paths memmap dtype for LAION


def make_embeddings(n: int, dim: int, concepts: int, seed: int) -> np.ndarray:
    """Unit vectors around `concepts` directions, each concept with its own size and spread.

    Like real image embeddings, all concepts lean towards one shared direction (so neighbouring
    concepts are at cosine distances of about 0.3-0.7), and a concept's members lie from about
    0.1 (tight) to 0.5 (diffuse) from its centre.
    """
    rng = np.random.default_rng(seed)
    shared = _unit(rng.standard_normal(dim))
    centers = _unit(shared + _unit(rng.standard_normal((concepts, dim))) * rng.uniform(0.6, 1.4, (concepts, 1)))
    spread = np.exp(rng.uniform(np.log(0.5), np.log(1.6), concepts))  # tight .. diffuse concepts
    weights = rng.dirichlet(np.full(concepts, 0.7))  # a few large concepts, many small ones
    concept = rng.choice(concepts, size=n, p=weights)
    noise = rng.standard_normal((n, dim)) / np.sqrt(dim)
    return _unit(centers[concept] + noise * spread[concept, None])


def add_near_duplicates(x: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """x with a `fraction` of its rows replaced by near-copies of other rows (cosine similarity about 0.999),
    as web data holds re-uploads, crops and re-encodings of the same image."""
    rng = np.random.default_rng(seed)
    copies = np.flatnonzero(rng.random(len(x)) < fraction)
    sources = rng.integers(0, len(x), len(copies))
    x = x.copy()
    x[copies] = _unit(x[sources] + rng.standard_normal((len(copies), x.shape[1])) * 0.04 / np.sqrt(x.shape[1]))
    return x


def sample_paths(ids, shard_size: int) -> list[str]:
    """LAION-style webdataset paths of the given sample indices: `00012/000120034.jpg`."""
    return [f"{i // shard_size:05d}/{i:09d}.jpg" for i in ids]


def spherical_kmeans(x: np.ndarray, k: int, seed: int, niter: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids, label, cosine similarity to the label's centroid), as SemDeDup runs faiss: spherical
    k-means, then a search of its inner-product index for each sample's nearest centroid."""
    import faiss

    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False)
    kmeans.train(x)
    sims, labels = kmeans.index.search(x, 1)
    return kmeans.centroids, labels[:, 0], sims[:, 0]


def add_edge_clusters(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, sims: np.ndarray,
                      seed: int) -> tuple[np.ndarray, ...]:
    """Append three clusters k-means would not make: an empty one (k), one of 1 member (k + 1) and one of 2."""
    rng = np.random.default_rng(seed + 1)
    empty, a, b = _unit(rng.standard_normal((3, x.shape[1])))
    outliers = np.stack([a, b, _unit(b + 0.05 * rng.standard_normal(x.shape[1]))])
    k = len(centroids)
    return (np.concatenate([x, outliers]), np.concatenate([centroids, np.stack([empty, a, b])]),
            np.concatenate([labels, [k + 1, k + 2, k + 2]]),
            np.concatenate([sims, (outliers * np.stack([a, b, b])).sum(axis=1)]).astype(np.float32))


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def write_sorted_clusters(folder: str, paths: list, labels: np.ndarray, sims: np.ndarray, k: int,
                          descending: bool = True, three_columns: bool = False) -> None:
    """One file per cluster exactly as SemDeDup's sort_clusters.py writes it (cosine, spherical), or as
    NeMo Curator 0.4-0.7 wrote it: three columns (id, distance, cluster id)."""
    os.makedirs(folder, exist_ok=True)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    for c in range(k):
        members = order[bounds[c]:bounds[c + 1]]
        save_sorted_cluster(os.path.join(folder, f"cluster_{c}.npy"), [paths[i] for i in members], members,
                            1 - sims[members], c, descending, three_columns)


def save_sorted_cluster(path: str, paths: list, ids: np.ndarray, dists: np.ndarray, cluster_id: int,
                        descending: bool = True, three_columns: bool = False) -> None:
    """np.save of the cluster's (path, index, distance, cluster id) tuples sorted by distance, as SemDeDup does
    (or of (path, distance, cluster id) tuples, as NeMo Curator 0.4-0.7 did)."""
    dists = np.asarray(dists, dtype=np.float32).tolist()  # pandas hands SemDeDup Python floats
    rows = sorted(zip(paths, np.asarray(ids).tolist(), dists, [cluster_id] * len(paths)),
                  key=lambda row: row[2], reverse=descending)
    np.save(path, [(p, d, c) for p, _, d, c in rows] if three_columns else rows)


def make_dataset(out: str, n: int, k: int, dim: int, seed: int, shard_size: int = 10000,
                 descending: bool = True, bytes_paths: bool = False, edge_clusters: bool = False,
                 three_columns: bool = False) -> dict:
    """Write a SemDeDup-style data set into `out`; returns its parts for tests and the demo."""
    x = make_embeddings(n, dim, concepts=max(2, k // 2), seed=seed)
    centroids, labels, sims = spherical_kmeans(x, k, seed)
    edge = {}
    if edge_clusters:
        x, centroids, labels, sims = add_edge_clusters(x, centroids, labels, sims, seed)
        edge = {"empty": k, "one member": k + 1, "two members": k + 2}
    paths = sample_paths(range(len(x)), shard_size)
    write_embeddings(out, x, paths)
    stored = np.array(paths, dtype=PATH_DTYPE).tolist() if bytes_paths else paths  # bytes, as from a memmap
    np.save(os.path.join(out, CENTROIDS_FILE), centroids)
    write_sorted_clusters(os.path.join(out, SORTED_DIR), stored, labels, sims, len(centroids), descending,
                          three_columns)
    return {"x": x, "centroids": centroids, "labels": labels, "sims": sims, "paths": paths,
            "sorted": os.path.join(out, SORTED_DIR), "k": len(centroids), "edge_clusters": edge}


def write_embeddings(out: str, x: np.ndarray, paths: list[str]) -> None:
    """OUT/embeddings.npy and OUT/paths.txt (one key per line), in dataset order."""
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, "embeddings.npy"), x)
    with open(os.path.join(out, "paths.txt"), "w") as f:
        f.write("".join(p + "\n" for p in paths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the data set into")
    parser.add_argument("--n", type=int, default=20000, help="number of samples (default: 20000)")
    parser.add_argument("--k", type=int, default=50, help="number of k-means clusters (default: 50)")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    parser.add_argument("--ascending", action="store_true",
                        help="sort clusters nearest first (SemDeDup keep_hard=False)")
    parser.add_argument("--bytes-paths", action="store_true", help="store paths as bytes, as from an S24 memmap")
    parser.add_argument("--embeddings-only", action="store_true",
                        help="write only embeddings.npy and paths.txt (no k-means, no sorted clusters)")
    parser.add_argument("--duplicates", type=float, default=0.0,
                        help="with --embeddings-only: the fraction of samples that nearly repeat another (default: 0)")
    args = parser.parse_args()
    if args.embeddings_only:
        x = make_embeddings(args.n, args.dim, concepts=max(2, args.k // 2), seed=args.seed)
        x = add_near_duplicates(x, args.duplicates, args.seed) if args.duplicates else x
        write_embeddings(args.out, x, sample_paths(range(args.n), args.shard_size))
        print(f"{args.n} embeddings of dim {args.dim} -> {args.out}/embeddings.npy, keys -> {args.out}/paths.txt")
        return
    data = make_dataset(args.out, args.n, args.k, args.dim, args.seed, args.shard_size,
                        descending=not args.ascending, bytes_paths=args.bytes_paths)
    print(f"{args.n} samples, dim {args.dim}, {data['k']} clusters -> {data['sorted']}")


if __name__ == "__main__":
    main()
