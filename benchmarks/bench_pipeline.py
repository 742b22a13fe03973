"""Benchmark the DBP pipeline against the floor of simply reading the data.

Generates SemDeDup-style sorted cluster files of the given size (reused when already there),
warms the page cache, then measures:
  - the floor: one process reading every cluster file once (np.load), then parsing its distance column
    with numpy's cast: the input the three scripts share, read once (the README and docs/scale.md use this
    floor); and, beside it, the same floor parsing as the scripts do (Arrow, 4x faster than numpy's cast);
  - each script as a whole process: wall time and peak RSS (largest process, and the sampled
    sum over the script and its workers), with its ratio to the floor;
  - the trie writer alone (dbp_utils.write_trie on the run's kept keys): keys per second, and the
    memory it adds per key;
  - what prune.py's temperature sweep (temperature_sweep.csv) costs, against the script's time;
  - the loader side: load time and lookups per second of kept_keys_trie.pkl and kept_keys.npy;
  - that prune's outputs are byte-identical with --workers 1 (but for the log's times and command line).

    python benchmarks/bench_pipeline.py --rows 5000000 --clusters 500 --keep 0.3
    python benchmarks/bench_pipeline.py --rows 50000000 --data /big/disk/bench50m --skip-identity
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

from make_toy_clusters import CENTROIDS_FILE, SORTED_DIR, sample_paths, save_sorted_cluster  # noqa: E402

SHARD_SIZE = 10000  # LAION-style keys: `00012/000120034.jpg`
EMBED_DIM = 768
LOOKUPS = 200_000
SAMPLE_S = 0.02  # memory sampling period
FLOOR = """
import glob, sys, numpy as np
for path in sorted(glob.glob(sys.argv[1] + "/cluster_*.npy")):
    rows = np.load(path)
    if rows.size:
        rows[:, 2].astype(np.float64)
"""
FLOOR_ARROW = """
import glob, sys, numpy as np
sys.path.insert(0, sys.argv[2])
from dbpkit.clusters import parse_distances
for path in sorted(glob.glob(sys.argv[1] + "/cluster_*.npy")):
    rows = np.load(path)
    if rows.size:
        parse_distances(rows[:, 2], path)
"""
TRIE_WRITER = """
import json, resource, sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
import dbp_utils as du
keys = np.load(sys.argv[2])
def rss_bytes():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) * 1024
before = rss_bytes()
t = time.perf_counter()
with open(sys.argv[3], "wb") as f:
    du.write_trie(f, keys)
seconds = time.perf_counter() - t
added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"keys_per_s": len(keys) / seconds, "bytes_per_key": added / len(keys)}))
"""
LOADER = """
import json, sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
import dbp_utils as du
kind, path, probes = sys.argv[2], sys.argv[3], np.load(sys.argv[4]).tolist()
t = time.perf_counter()
keys = du.load_trie(path) if kind == "trie" else du.load_kept_keys(path)
loaded = time.perf_counter() - t
probes = [p.decode() for p in probes]
t = time.perf_counter()
hits = sum(du.trie_search(keys, p) for p in probes) if kind == "trie" else sum(p in keys for p in probes)
print(json.dumps({"load_s": loaded, "lookups_per_s": len(probes) / (time.perf_counter() - t), "hits": hits}))
"""


def needs_generating(folder: str, spec: dict) -> bool:
    """Whether folder lacks data generated to `spec` (then it is emptied for it); mark_generated marks it."""
    manifest = os.path.join(folder, "manifest.json")
    if os.path.exists(manifest) and json.load(open(manifest)) == spec:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    return True


def mark_generated(folder: str, spec: dict) -> None:
    json.dump(spec, open(os.path.join(folder, "manifest.json"), "w"))


def generate(folder: str, rows: int, k: int, seed: int) -> None:
    """Cluster files as SemDeDup writes them (descending), with LAION-like spread in cluster sizes."""
    spec = {"rows": rows, "clusters": k, "seed": seed}
    if not needs_generating(folder, spec):
        return
    os.makedirs(os.path.join(folder, SORTED_DIR))
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(rows, rng.dirichlet(np.full(k, 4.0)))
    ids = rng.permutation(rows)
    start = 0
    for j, size in enumerate(sizes):
        members = np.sort(ids[start:start + size])
        start += size
        paths = sample_paths(members.tolist(), SHARD_SIZE)
        spread = rng.uniform(0.05, 0.5)  # tight and diffuse concepts
        save_sorted_cluster(os.path.join(folder, SORTED_DIR, f"cluster_{j}.npy"), paths, members,
                            rng.gamma(4, spread / 4, size), j)
        print(f"\rgenerating: {j + 1}/{k} clusters", end="", file=sys.stderr)
    print(file=sys.stderr)
    np.save(os.path.join(folder, CENTROIDS_FILE), rng.standard_normal((k, EMBED_DIM)).astype(np.float32))
    mark_generated(folder, spec)


def machine() -> str:
    """The machine the figures were measured on, in one line."""
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
            f"Python {platform.python_version()}")


def cuda_device() -> str | None:
    """The name of the CUDA device torch sees here, or None (asked in a separate process: torch's import is
    the benchmarked scripts' cost, not the benchmark's)."""
    probe = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    name = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    return name or None


def warm_cache(folder: str) -> None:
    """Read every file under folder once, so that the runs measured find it in the page cache."""
    for where, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(where, name), "rb") as f:
                while f.read(1 << 24):
                    pass


def drop_from_cache(path: str) -> None:
    """A file's pages out of the page cache (they are clean), so that the next read comes from the disk (Linux)."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants, from the kernel's per-thread children lists."""
    tree, frontier = [pid], [pid]
    while frontier:
        found = []
        for p in frontier:
            try:
                for tid in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{tid}/children") as f:
                        found += [int(c) for c in f.read().split()]
            except OSError:
                pass
        tree += found
        frontier = found
    return tree


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB: resident now, and the peak since it started its program."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


def proportional_kb(pid: int) -> int:
    """A process's PSS in kB: its resident pages, each shared one divided among the processes sharing it (Linux
    4.14+; 0 where the system does not say)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
    except (OSError, ValueError):
        return 0


def measure(cmd: list[str], pss: bool = False) -> dict:
    """Wall time, peak RSS of the largest process and peak summed RSS of the process tree (sampled). The summed
    RSS counts a page shared by several processes (the libraries a fork server's workers share with it) once per
    process; with `pss`, also the tree's peak summed PSS, which counts it once (reading it costs ~15 ms of a core
    per sample: for a run whose time is not the point)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"largest": 0, "tree": 0, "pss": 0}

    def sample():
        while proc.poll() is None:
            tree = process_tree(proc.pid)
            mem = [memory_kb(p) for p in tree]
            peak["largest"] = max(peak["largest"], *(hwm for _, hwm in mem))
            peak["tree"] = max(peak["tree"], sum(rss for rss, _ in mem))
            if pss:
                peak["pss"] = max(peak["pss"], sum(proportional_kb(p) for p in tree))
            time.sleep(SAMPLE_S)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err}")
    return {"wall_s": wall, "peak_rss_mb": peak["largest"] / 1024, "tree_rss_mb": peak["tree"] / 1024,
            **({"tree_pss_mb": peak["pss"] / 1024} if pss else {}), "stdout": out.strip()}


def time_sweep(dintra: str, dinter: str, sorted_dir: str, keep: float) -> float:
    """Seconds prune.py's temperature sweep takes at its defaults (best of 3), with its CSV written."""
    sys.path.insert(0, ROOT)
    import dbp_utils as du
    from dbpkit import files
    from dbpkit.clusters import scan_clusters

    sizes = np.array([c.rows for c in scan_clusters(sorted_dir, None, "", "")])
    complexity = du.complexity("dintra*dinter", np.load(dintra), np.load(dinter), sizes)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        sweep = du.temperature_sweep("dintra*dinter", complexity, sizes, int(keep * sizes.sum()), 0.5, 0.5)
        files.write_csv(os.devnull, sweep)
        best = min(best, time.perf_counter() - start)
    return best


def compare_outputs(a: str, b: str) -> bool:
    """The same outputs, byte for byte, folders included; but for logs.log, which records the command line and
    the times, and the run records (clustering.json, params.json), which say where the run ran (--distributor)."""
    def files(root: str) -> dict:
        return {os.path.relpath(os.path.join(where, n), root): os.path.join(where, n)
                for where, _, names in os.walk(root) for n in names if n != "logs.log"}

    def content(path: str) -> object:
        if os.path.basename(path) in ("clustering.json", "params.json"):
            with open(path) as f:
                return {name: value for name, value in json.load(f).items() if name != "distributor"}
        with open(path, "rb") as f:
            return f.read()
    left, right = files(a), files(b)
    return left.keys() == right.keys() and all(content(left[n]) == content(right[n]) for n in left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows in all cluster files (default: 5M)")
    parser.add_argument("--clusters", type=int, default=500, help="k (default: 500)")
    parser.add_argument("--keep", type=float, default=0.3, help="--prune-ratio (default: 0.3)")
    parser.add_argument("--which-to-keep", default="hard", help="hard, easy or random (default: hard)")
    parser.add_argument("--data", default=os.path.join(ROOT, "benchmarks", "data"),
                        help="folder for the generated data (reused when it matches)")
    parser.add_argument("--workers", type=int, default=None, help="--workers of the scripts (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-identity", action="store_true", help="skip the --workers 1 rerun of prune")
    parser.add_argument("--no-trie", action="store_true", help="pass --no-trie to prune")
    args = parser.parse_args()

    data = os.path.join(args.data, f"{args.rows}_{args.clusters}")
    generate(data, args.rows, args.clusters, args.seed)
    sorted_dir = os.path.join(data, SORTED_DIR)
    size_gb = sum(os.path.getsize(os.path.join(sorted_dir, n)) for n in os.listdir(sorted_dir)) / 1e9
    warm_cache(sorted_dir)
    work = tempfile.mkdtemp(prefix="dbp_bench_")
    py = sys.executable
    workers = [] if args.workers is None else ["--workers", str(args.workers)]
    steps = {
        "floor (read + parse distances)": [py, "-c", FLOOR, sorted_dir],
        "compute_avg_dist_to_cluster_centroid.py": [
            py, os.path.join(ROOT, "compute_avg_dist_to_cluster_centroid.py"), "--num_clusters", str(args.clusters),
            "--sorted_clusters_path", sorted_dir, "--avg_distance_to_cent_save_path", f"{work}/dintra.npy", *workers],
        "compute_centroid_distances.py": [
            py, os.path.join(ROOT, "compute_centroid_distances.py"), "--num_clusters", str(args.clusters),
            "--sorted_clusters_path", sorted_dir, "--mean_centroid_distances_save_path", f"{work}/dinter.npy",
            *workers],
    }
    prune = [py, os.path.join(ROOT, "prune.py"), "--num-centroids", str(args.clusters),
             "--mean_centroid_distances_save_path", f"{work}/dinter.npy",
             "--avg_distance_to_cent_save_path", f"{work}/dintra.npy", "--sorted-clusters-path", sorted_dir,
             "--prune-ratio", str(args.keep), "--which-to-keep", args.which_to_keep]
    prune += ["--no-trie"] if args.no_trie else []
    steps["prune.py"] = prune + ["--save-dir", f"{work}/run", *workers]

    print(machine())
    print(f"data: {args.rows:,} rows in {args.clusters} clusters, {size_gb:.2f} GB of cluster files; "
          f"keep {args.keep} ({args.which_to_keep})\n")
    results = {name: measure(cmd) for name, cmd in steps.items()}
    floor = results["floor (read + parse distances)"]["wall_s"]
    print(f"{'step':42s} {'wall s':>8s} {'x floor':>8s} {'peak RSS MB':>12s} {'tree RSS MB':>12s}")
    for name, r in results.items():
        print(f"{name:42s} {r['wall_s']:8.2f} {r['wall_s'] / floor:8.2f} {r['peak_rss_mb']:12.0f} "
              f"{r['tree_rss_mb']:12.0f}")
    total = sum(r["wall_s"] for name, r in results.items() if not name.startswith("floor"))
    print(f"{'three scripts together':42s} {total:8.2f} {total / floor:8.2f}")
    # The scripts parse distances with Arrow (dbpkit.clusters.parse_floats), 4x faster than the floor's numpy
    # cast: the same floor parsing that way, so that the gain from the parser alone is in plain view.
    arrow_floor = measure([py, "-c", FLOOR_ARROW, sorted_dir, ROOT])["wall_s"]
    print(f"{'(the floor, parsing as the scripts do)':42s} {arrow_floor:8.2f} {arrow_floor / floor:8.2f}   "
          f"three scripts: {total / arrow_floor:.2f}x it")

    sweep_s = time_sweep(f"{work}/dintra.npy", f"{work}/dinter.npy", sorted_dir, args.keep)
    print(f"\ntemperature sweep (temperature_sweep.csv, in prune.py before the selection): {sweep_s * 1e3:.1f} ms, "
          f"{sweep_s / results['prune.py']['wall_s']:.2%} of prune.py's time")

    r = measure([py, "-c", TRIE_WRITER, ROOT, f"{work}/run/kept_keys.npy", f"{work}/trie.pkl"])
    stats = json.loads(r["stdout"])
    print(f"\ntrie writer: {stats['keys_per_s'] / 1e6:.2f} M keys/s, {stats['bytes_per_key']:.0f} bytes per key "
          "above the kept keys themselves")

    kept = np.load(f"{work}/run/kept_keys.npy")
    rng = np.random.default_rng(1)
    present = kept[rng.integers(0, len(kept), LOOKUPS // 2)]
    absent = np.char.add(present, b"x")  # same shape of key, never kept
    np.save(f"{work}/probes.npy", np.concatenate([present, absent]))
    print(f"\nloader side ({len(kept):,} kept keys, {LOOKUPS:,} lookups, half of them hits):")
    for kind, name in (("trie", "kept_keys_trie.pkl"), ("npy", "kept_keys.npy")):
        path = f"{work}/run/{name}"
        if not os.path.exists(path):
            continue
        r = measure([py, "-c", LOADER, ROOT, kind, path, f"{work}/probes.npy"])
        stats = json.loads(r["stdout"])
        assert stats["hits"] == LOOKUPS // 2, stats
        print(f"  {name:20s} {os.path.getsize(path) / 1e6:8.1f} MB  load {stats['load_s']:6.2f} s  "
              f"{stats['lookups_per_s']:10,.0f} lookups/s  peak RSS {r['peak_rss_mb']:6.0f} MB")

    if not args.skip_identity:  # same --save-dir, since params.json records it
        os.rename(f"{work}/run", f"{work}/run_parallel")
        single = measure(prune + ["--save-dir", f"{work}/run", "--workers", "1"])
        same = compare_outputs(f"{work}/run", f"{work}/run_parallel")
        print(f"\nprune --workers 1: {single['wall_s']:.2f} s; outputs byte-identical to the parallel run: {same}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
