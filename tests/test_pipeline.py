"""End to end: the three scripts with the README's flags, checked against the paper's equations.

The reference here is written from the equations alone: d_intra and d_inter from the embeddings,
the softmax, and the quota QP solved by plain bisection on the water level.
"""

import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
from conftest import (
    DINTER_SCRIPT,
    DINTRA_SCRIPT,
    OUTPUTS,
    PRUNE_SCRIPT,
    bar_tops,
    brute_dinter,
    brute_dintra,
    drawn,
    run_script,
    under_legend,
)

import dbp_utils as du


@pytest.fixture(scope="module")
def scored(request, tmp_path_factory):
    """Run the two compute scripts once per data set, exactly as the README shows them."""
    cache = {}

    def get(data):
        if data["sorted"] not in cache:
            out = tmp_path_factory.mktemp("scores")
            for script, flag, name in ((DINTRA_SCRIPT, "--avg_distance_to_cent_save_path", "dintra.npy"),
                                       (DINTER_SCRIPT, "--mean_centroid_distances_save_path", "dinter.npy")):
                r = run_script(script, "--num_clusters", data["k"], "--sorted_clusters_path", data["sorted"],
                               flag, out / name)
                assert r.returncode == 0, r.stderr
            cache[data["sorted"]] = (out / "dintra.npy", out / "dinter.npy")
        return cache[data["sorted"]]
    return get


def prune(data, scores, save_dir, *extra):
    dintra, dinter = scores
    return run_script(PRUNE_SCRIPT, "--num-centroids", data["k"], "--mean_centroid_distances_save_path", dinter,
                      "--avg_distance_to_cent_save_path", dintra, "--sorted-clusters-path", data["sorted"],
                      "--total-dataset-size", len(data["x"]), "--save-dir", save_dir, *extra)


def reference_x(data, density, ratio, temperature, cls_bal):
    """x* of the SPEC's QP, from the equations: softmax, bounds, bisection on nu."""
    sizes = np.bincount(data["labels"], minlength=data["k"])
    d_intra, d_inter = brute_dintra(data), brute_dinter(data["centroids"], 20)
    if density == "clustersize":
        p = sizes / sizes.sum()
    else:
        c = {"dintra*dinter": d_intra * d_inter, "dinter*dintra": d_inter * d_intra, "dintra": d_intra,
             "dinter": d_inter,
             "uniform": np.zeros(data["k"])}[density]
        c = np.where(np.isnan(c), np.nanmean(c), c)
        p = np.exp(c / temperature) / np.exp(c / temperature).sum()
    n = int(ratio * len(data["x"]))
    m = int(n / data["k"] * cls_bal) if cls_bal > 0 else 1
    lb, ub = np.maximum(0, np.minimum(m, sizes - 1)), sizes
    lo, hi = (p * n - ub).min() - 1, (p * n - lb).max() + 1
    for _ in range(200):
        nu = (lo + hi) / 2
        lo, hi = (nu, hi) if np.clip(p * n - nu, lb, ub).sum() > n else (lo, nu)
    return np.clip(p * n - nu, lb, ub), n


def check_selection(data, save_dir, which, trie=True):
    """Every cluster keeps exactly its quota, and the right members; the key sets hold exactly those."""
    quotas = np.load(save_dir / "quotas.npy")
    kept_paths = (save_dir / "kept_paths.txt").read_text().splitlines()
    assert len(kept_paths) == len(set(kept_paths)) == quotas.sum()
    kept = set(kept_paths)
    for j in range(data["k"]):
        rows = np.load(os.path.join(data["sorted"], f"cluster_{j}.npy"))
        if rows.size == 0:
            assert quotas[j] == 0
            continue
        paths = [p.decode() if isinstance(p, bytes) else p for p in rows[:, 0].tolist()]
        dist = rows[:, -2].astype(float)  # the distance is second to last in 4 and in 3 columns
        is_kept = np.array([p in kept for p in paths])
        assert is_kept.sum() == quotas[j]
        if which != "random" and 0 < quotas[j] < len(rows):
            far, near = dist[is_kept], dist[~is_kept]
            if which == "hard":
                assert far.min() >= near.max()
            else:
                assert far.max() <= near.min()
    expected_keys = {p[: -len(".jpg")] for p in kept_paths}
    if trie:
        with open(save_dir / "kept_keys_trie.pkl", "rb") as f:
            assert set(pickle.load(f).keys()) == expected_keys
    assert {k.decode() for k in np.load(save_dir / "kept_keys.npy").tolist()} == expected_keys


CASES = [  # (which, density, prune ratio, cls-bal ratio)
    ("hard", "dintra*dinter", 0.3, 0.5), ("easy", "dintra*dinter", 0.3, 0.5), ("hard", "dinter*dintra", 0.6, 0.0),
    ("easy", "dintra", 0.5, 1.0), ("hard", "dinter", 0.2, 0.2), ("hard", "uniform", 0.25, 0.5),
    ("easy", "clustersize", 0.4, 0.0), ("random", "dintra*dinter", 0.35, 0.5),
]


# Every case on one data set; on the others (bytes paths ascending, NeMo's three columns), what depends on the
# file layout: the hard and the easy end, and the seeded random pick.
LAYOUT_CASES = [CASES[0], CASES[1], CASES[-1]]


@pytest.mark.parametrize("name,which,density,ratio,cls_bal",
                         [("desc_str", *case) for case in CASES] +
                         [(name, *case) for name in ("asc_bytes", "nemo_three") for case in LAYOUT_CASES])
def test_prune_matches_the_equations(request, scored, tmp_path, name, which, density, ratio, cls_bal):
    dataset = request.getfixturevalue(name)
    save_dir = tmp_path / "run"
    r = prune(dataset, scored(dataset), save_dir, "--prune-ratio", ratio, "--which-to-keep", which,
              "--density", density, "--cls-bal-ratio", cls_bal, "--temperature", 0.1)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(save_dir)) == sorted(OUTPUTS)
    x, n = reference_x(dataset, density, ratio, 0.1, cls_bal)
    quotas = np.load(save_dir / "quotas.npy")
    assert quotas.dtype == np.int64 and quotas.sum() == n
    assert (np.abs(quotas - x) < 1 + 1e-6).all()
    check_selection(dataset, save_dir, which)

    stats = pd.read_csv(save_dir / "cluster_stats.csv")
    assert list(stats.columns) == ["cluster_id", "size", "d_intra", "d_inter", "complexity", "probability",
                                   "target", "quota", "kept_fraction"]
    np.testing.assert_array_equal(stats["quota"], quotas)
    np.testing.assert_allclose(stats["d_intra"], brute_dintra(dataset), atol=1e-5)
    assert stats["probability"].sum() == pytest.approx(1)
    params = json.loads((save_dir / "params.json").read_text())
    assert params["prune_ratio"] == ratio and params["target_size"] == n and params["kept_samples"] == n
    assert f"kept {n} of {len(dataset['x'])}" in r.stdout


def test_random_is_seeded_and_worker_count_does_not_matter(desc_str, scored, tmp_path):
    runs = {}
    for name, extra in (("a", ["--workers", "1"]), ("b", ["--workers", "3"]), ("c", ["--seed", "7"])):
        r = prune(desc_str, scored(desc_str), tmp_path / name, "--prune-ratio", 0.3, "--which-to-keep", "random",
                  *extra)
        assert r.returncode == 0, r.stderr
        runs[name] = {f: (tmp_path / name / f).read_bytes() for f in OUTPUTS if f not in ("params.json", "logs.log")}
    assert runs["a"] == runs["b"]
    assert runs["a"]["kept_paths.txt"] != runs["c"]["kept_paths.txt"]
    assert runs["a"]["quotas.npy"] == runs["c"]["quotas.npy"]


def test_defaults_need_only_the_readme_flags(asc_bytes, scored, tmp_path):
    """--num-centroids and --total-dataset-size may be omitted; the default keeps the hardest."""
    dintra, dinter = scored(asc_bytes)
    r = run_script(PRUNE_SCRIPT, "--mean_centroid_distances_save_path", dinter, "--avg_distance_to_cent_save_path",
                   dintra, "--sorted-clusters-path", asc_bytes["sorted"], "--prune-ratio", 0.3,
                   "--save-dir", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    params = json.loads((tmp_path / "run" / "params.json").read_text())
    assert params["which_to_keep"] == "hard" and params["density"] == "dintra*dinter"
    assert params["num_clusters"] == asc_bytes["k"] and params["target_size"] == int(0.3 * len(asc_bytes["x"]))
    x, n = reference_x(asc_bytes, "dintra*dinter", 0.3, 0.5, 0.5)
    assert (np.abs(np.load(tmp_path / "run" / "quotas.npy") - x) < 1 + 1e-6).all()
    check_selection(asc_bytes, tmp_path / "run", "hard")


def test_total_dataset_size_differs_warns(desc_str, scored, tmp_path):
    r = prune(desc_str, scored(desc_str), tmp_path / "run", "--prune-ratio", 0.3)  # the true size: no warning
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    r = run_script(PRUNE_SCRIPT, "--sorted-clusters-path", desc_str["sorted"], "--density", "uniform",
                   "--total-dataset-size", 2000, "--prune-ratio", 0.5, "--save-dir", tmp_path / "run2")
    assert r.returncode == 0, r.stderr
    assert "warning: --total-dataset-size 2000 differs" in r.stderr
    assert np.load(tmp_path / "run2" / "quotas.npy").sum() == 1000


def test_no_trie_and_save_dir_protocol(desc_str, scored, tmp_path):
    save_dir = tmp_path / "run"
    assert prune(desc_str, scored(desc_str), save_dir, "--prune-ratio", 0.3).returncode == 0
    before = {f: (save_dir / f).read_bytes() for f in OUTPUTS}
    r = prune(desc_str, scored(desc_str), save_dir, "--prune-ratio", 0.5)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert {f: (save_dir / f).read_bytes() for f in OUTPUTS} == before
    r = prune(desc_str, scored(desc_str), save_dir, "--prune-ratio", 0.5, "--overwrite", "--no-trie")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(save_dir)) == sorted(set(OUTPUTS) - {"kept_keys_trie.pkl"})
    assert np.load(save_dir / "quotas.npy").sum() == int(0.5 * len(desc_str["x"]))


def test_help_explains_every_flag_and_both_spellings_work(desc_str, scored, tmp_path):
    r = run_script(PRUNE_SCRIPT, "--help")
    assert r.returncode == 0 and "fraction of the dataset to KEEP" in r.stdout
    for flag in ("--temperature", "--cls-bal-ratio", "--which-to-keep", "--density", "--seed", "--overwrite"):
        assert flag in r.stdout
    dintra, dinter = scored(desc_str)
    r = run_script(PRUNE_SCRIPT, "--num_centroids", desc_str["k"], "--mean-centroid-distances-save-path", dinter,
                   "--avg-distance-to-cent-save-path", dintra, "--sorted_clusters_path", desc_str["sorted"],
                   "--prune_ratio", 0.3, "--save_dir", tmp_path / "run", "--which_to_keep", "easy",
                   "--cls_bal_ratio", 0.1, "--total_dataset_size", 2 * len(desc_str["x"]), "--density", "uniform",
                   "--temperature", 0.25, "--seed", 5, "--no_trie")
    assert r.returncode == 0, r.stderr
    params = json.loads((tmp_path / "run" / "params.json").read_text())
    assert params["num_centroids"] == desc_str["k"] and params["total_dataset_size"] == 2 * len(desc_str["x"])
    assert params["which_to_keep"] == "easy" and params["cls_bal_ratio"] == 0.1 and params["prune_ratio"] == 0.3
    assert params["density"] == "uniform" and params["temperature"] == 0.25 and params["seed"] == 5
    assert params["target_size"] == int(0.3 * 2 * len(desc_str["x"])) and params["no_trie"]
    assert not (tmp_path / "run" / "kept_keys_trie.pkl").exists()
    x, _ = reference_x(desc_str, "uniform", 0.6, 0.25, 0.1)  # N = 0.3 of twice the rows
    assert (np.abs(np.load(tmp_path / "run" / "quotas.npy") - x) < 1 + 1e-6).all()
    check_selection(desc_str, tmp_path / "run", "easy", trie=False)


def test_prune_warns_about_unsorted_files(tmp_path):
    sorted_dir = tmp_path / "sorted"
    sorted_dir.mkdir()
    np.save(sorted_dir / "cluster_0.npy", [(f"a/{i}.jpg", i, d, 0) for i, d in enumerate([0.9, 0.95, 0.5, 0.1])])
    np.save(sorted_dir / "cluster_1.npy", [(f"b/{i}.jpg", i, d, 1) for i, d in enumerate([0.8, 0.6, 0.4, 0.3])])
    r = run_script(PRUNE_SCRIPT, "--sorted-clusters-path", sorted_dir, "--density", "uniform", "--prune-ratio", 0.5,
                   "--cls-bal-ratio", 0, "--save-dir", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "1 cluster file(s) are not sorted" in r.stderr and "cluster_0.npy" in r.stderr
    assert (tmp_path / "run" / "kept_paths.txt").read_text().split() == ["a/0.jpg", "a/1.jpg", "b/0.jpg", "b/1.jpg"]


def test_a_tiny_temperature_gives_the_most_complex_cluster_all_it_can_take(desc_str, scored, tmp_path):
    """T = 1e-310 would overflow exp(C / T); the softmax is then one-hot on the largest complexity."""
    r = prune(desc_str, scored(desc_str), tmp_path / "run", "--prune-ratio", 0.3, "--temperature", 1e-310,
              "--cls-bal-ratio", 0)
    assert r.returncode == 0, r.stderr
    d_intra, d_inter = brute_dintra(desc_str), brute_dinter(desc_str["centroids"], 20)
    c = d_intra * d_inter
    c = np.where(np.isnan(c), np.nanmean(c), c)
    sizes = np.bincount(desc_str["labels"], minlength=desc_str["k"])
    quotas = np.load(tmp_path / "run" / "quotas.npy")
    top = np.argmax(c)
    assert quotas[top] == sizes[top]  # the one cluster with all the probability keeps everything
    assert quotas.sum() == int(0.3 * len(desc_str["x"]))


def write_clusters(folder, clusters):
    folder.mkdir()
    for j, rows in enumerate(clusters):
        np.save(folder / f"cluster_{j}.npy", rows)


def test_warnings_for_what_prune_notices_on_the_way(tmp_path):
    sorted_dir = tmp_path / "sorted"
    write_clusters(sorted_dir, [
        [("a/0.jpg", 0, 0.9, 0), ("a/1.jpg", 1, 0.5, 0)],
        [("b/0.jpg", 2, 0.8, 7), ("b/1.jpg", 3, 0.2, 7)],  # rows that say they belong to cluster 7
        [("a/0.jpg", 0, 0.7, 2), ("a/1.png", 1, 0.1, 2)],  # the same path again, and the same name as .png
    ])
    common = ["--sorted-clusters-path", sorted_dir, "--density", "uniform"]
    r = run_script(PRUNE_SCRIPT, *common, "--prune-ratio", 1, "--save-dir", tmp_path / "all")
    assert r.returncode == 0, r.stderr
    assert "1 cluster file(s) hold rows whose cluster id column is not their own" in r.stderr
    assert str(sorted_dir / "cluster_1.npy") in r.stderr
    assert "2 kept paths share a key with another kept path: the same path in two clusters, or the same" in r.stderr
    assert np.load(tmp_path / "all" / "kept_keys.npy").tolist() == [b"a/0", b"a/1", b"b/0", b"b/1"]
    r = run_script(PRUNE_SCRIPT, *common, "--prune-ratio", 0.1, "--save-dir", tmp_path / "none")
    assert r.returncode == 0, r.stderr
    assert "--prune-ratio 0.1 of 6 samples keeps none (N = 0)" in r.stderr
    assert (tmp_path / "none" / "kept_paths.txt").read_text() == ""


def test_the_temperature_sweep_is_the_quotas_at_each_temperature():
    """Each row of the sweep against the quotas computed at its T without the solver: numpy's softmax and the
    best integer quotas by enumerating every feasible vector (test_quotas' brute force)."""
    import itertools

    from test_quotas import bounds

    def best_integer(t, lb, ub):
        """The integer quotas nearest t (squared distance) that sum to the target, by enumerating them all."""
        feasible = [x for x in itertools.product(*(range(a, b + 1) for a, b in zip(lb, ub))) if sum(x) == target]
        return np.array(min(feasible, key=lambda x: ((np.array(x) - t) ** 2).sum()))

    rng = np.random.default_rng(5)
    sizes = np.array([9, 3, 10, 6])
    complexity = rng.uniform(0.002, 0.004, 4)  # a narrow spread, as DINOv2 distances give on small data
    target, ratio, temperature = 14, 0.5, 0.5
    sweep = du.temperature_sweep("dintra*dinter", complexity, sizes, target, ratio, temperature)
    assert list(sweep) == ["temperature", "p_ratio", "quota_min", "quota_median", "quota_max", "kept_whole",
                           "at_minimum", "moved_fraction"]
    assert temperature in sweep["temperature"].tolist() and (np.diff(sweep["temperature"]) > 0).all()
    assert sweep["p_ratio"].min() <= 1.1 and sweep["p_ratio"].max() >= 50  # the grid spans the data's own scale
    lb, ub = bounds(sizes, target, ratio)
    for row in zip(*sweep.values()):
        t, spread, low, median, high, whole, at_min, moved = row
        p = np.exp(complexity / t) / np.exp(complexity / t).sum()
        n = best_integer(p * target, lb, ub)
        assert spread == pytest.approx(p.max() / p.min(), rel=1e-9)
        assert (low, median, high) == (n.min(), np.median(n), n.max())
        assert whole == int((n == sizes).sum()) and at_min == int(((n == lb) & (lb < sizes)).sum())
        assert moved == pytest.approx(np.abs(n - target / 4).sum() / (2 * target))


def test_a_softmax_that_barely_spreads_is_said_and_the_figure_marks_the_run_temperature(desc_str, scored, tmp_path):
    import csv
    import json

    from dbpkit.prune_report import quotas_figure

    runs = {}
    for name, temperature in (("hot", 1000), ("cold", 0.0005)):
        r = prune(desc_str, scored(desc_str), tmp_path / name, "--prune-ratio", 0.3, "--temperature", temperature)
        assert r.returncode == 0, r.stderr
        runs[name] = r, json.loads((tmp_path / name / "params.json").read_text())
    (r, hot), (r_cold, cold) = runs["hot"], runs["cold"]
    line = [line for line in r.stderr.splitlines() if line.startswith("warning: the softmax")]
    assert len(line) == 1 and "barely moves the quotas" in line[0] and "would spread them 2x" in line[0]
    assert hot["near_equal_share"] is True and hot["p_ratio"] < 1.1
    printed = line[0].split("spreads the clusters' shares by only ")[1].split("x ")[0]  # (not 1.1 for 1.0999)
    assert printed == f"{hot['p_ratio']:.4f}" and float(printed) < 1.1
    assert "barely" not in r_cold.stderr and cold["near_equal_share"] is False and cold["p_ratio"] >= 1.1
    doubling = float(line[0].split("T = ")[1].split(" ")[0])
    complexity = pd.read_csv(tmp_path / "hot" / "cluster_stats.csv")
    held = complexity[complexity["size"] > 0]["complexity"]
    assert np.exp((held.max() - held.min()) / doubling) == pytest.approx(2, rel=1e-2)  # 3 digits printed
    with open(tmp_path / "hot" / "temperature_sweep.csv") as f:
        sweep = {name: np.array([float(row[name]) for row in rows]) for rows in [list(csv.DictReader(f))]
                 for name in rows[0]}
    assert 1000 in sweep["temperature"].tolist()
    table = {name: pd.read_csv(tmp_path / "hot" / "cluster_stats.csv")[name].to_numpy() for name in
             ("complexity", "probability", "quota", "size")}
    plan = du.solve_quotas(table["probability"], table["size"], int(table["quota"].sum()), 0.5)
    figure = quotas_figure(table, sweep, plan, int(table["quota"].sum()), 1000, "t")
    knob = figure.axes[-1]
    marks = [line for line in knob.lines if "this run's T" in line.get_label()]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [1000, 1000]  # the red line stands at the run's T
    assert knob.get_xscale() == "log"
    by_complexity = np.argsort(table["complexity"], kind="stable")  # the middle panel: a bar per cluster, in that order
    sizes, kept = (step.get_data() for step in figure.axes[1].patches)
    assert np.array_equal(sizes.values, table["size"][by_complexity])
    assert np.array_equal(kept.values, table["quota"][by_complexity])
    assert np.array_equal(sizes.edges, np.arange(len(table["size"]) + 1) - 0.5)
    left = figure.axes[0]  # the quotas, all near the equal share at this T: at the top, where the legend goes
    points = np.vstack([c.get_offsets() for c in left.collections] + [line.get_xydata() for line in left.lines
                                                                      if line.get_label().startswith("softmax")])
    assert len(points) > len(table["size"]) and under_legend(left, points) == []
    assert under_legend(figure.axes[1], bar_tops(sizes.edges, sizes.values, log_x=False)) == []
    c = table["complexity"]  # complexities as a tiny model's (the images demo's): their tick labels kept apart
    narrow = quotas_figure({**table, "complexity": 0.003 + 0.0019 * (c - c.min()) / np.ptp(c)}, sweep, plan,
                           int(table["quota"].sum()), 1000, "t")
    renderer = drawn(narrow)
    labels = sorted((t.get_window_extent(renderer) for t in narrow.axes[0].get_xticklabels()
                     if t.get_visible() and t.get_text()), key=lambda b: b.x0)
    assert len(labels) >= 3 and all(a.x1 < b.x0 for a, b in zip(labels, labels[1:]))
    kept = int(table["quota"].sum())  # every axis label inside the picture, with counts of six digits (the widest
    # plain tick labels) as on LAION
    factor = 500_000 // max(int(table["quota"].max()), int(np.ceil((table["probability"] * kept).max())))
    large = {**table, "quota": table["quota"] * factor, "size": table["size"] * factor}
    figure = quotas_figure(large, sweep, plan, kept * factor, 1000, "t")
    renderer = drawn(figure)
    assert all(ax.yaxis.label.get_window_extent(renderer).x0 >= 0 for ax in figure.axes)


def test_the_report_drawn_while_the_trie_is_written_is_the_same(desc_str, scored, tmp_path):
    """From a million kept keys the report is drawn while the trie is written, not beside the selection: the
    same outputs, byte for byte (here with the threshold lowered to every run's size)."""
    import subprocess
    import sys

    from conftest import ROOT

    r = prune(desc_str, scored(desc_str), tmp_path / "beside", "--prune-ratio", 0.3)
    assert r.returncode == 0, r.stderr
    dintra, dinter = scored(desc_str)
    args = ["prune.py", "--num-centroids", desc_str["k"], "--mean_centroid_distances_save_path", dinter,
            "--avg_distance_to_cent_save_path", dintra, "--sorted-clusters-path", desc_str["sorted"],
            "--total-dataset-size", len(desc_str["x"]), "--save-dir", tmp_path / "after", "--prune-ratio", 0.3,
            "--workers", 2]
    code = f"import sys, prune; prune.REPORT_AFTER_KEYS = 1; sys.argv = {[str(a) for a in args]!r}; prune.run()"
    after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert after.returncode == 0, after.stderr
    for name in OUTPUTS:
        if name not in ("params.json", "logs.log") and (tmp_path / "beside" / name).exists():
            assert (tmp_path / "after" / name).read_bytes() == (tmp_path / "beside" / name).read_bytes(), name
