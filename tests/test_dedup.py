"""deduplicate.py: SemDeDup's scores and kept sets against a float64 reference from the definition."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (
    DEADLINE,
    ROOT,
    bar_tops,
    error_line,
    finished,
    limit_file_size,
    outputs,
    run_script,
    signal_main_thread,
    start_script,
    under_legend,
    wait_paused,
)

from dbpkit import dedup as scoring
from dbpkit.dedup import max_earlier_similarity

DEDUP_SCRIPT = "deduplicate.py"
DIM = 8
SIZES = [0, 1, 5, 40, 2100, 60, 3]  # empty, a singleton, small, one larger than two blocks (1024 rows)
ASCENDING, UNSORTED = 5, 6  # cluster 5's file is sorted nearest first; cluster 6's not at all
EPS = [0.01, 0.05, 0.2]


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_cluster(path, rows):
    """As SemDeDup's sort_clusters.py saves a cluster: np.save of a list of (path, index, distance, id) tuples."""
    np.save(path, rows if rows else [])


def make_data(root):
    """Embeddings with near-duplicate groups inside clusters, SemDeDup's cluster files, centroids beside them."""
    rng = np.random.default_rng(0)
    x, start = [], 0
    os.makedirs(root / "save" / "sorted_clusters")
    centroids = unit(rng.standard_normal((len(SIZES), DIM))).astype(np.float32)
    for j, size in enumerate(SIZES):
        members = unit(centroids[j] + 0.6 * rng.standard_normal((size, DIM)))
        for i in range(1, size):  # a third of the members nearly repeat an earlier one
            if rng.random() < 0.33:
                noise = rng.choice([0.02, 0.1, 0.25]) * rng.standard_normal(DIM)
                members[i] = unit(members[rng.integers(0, i)] + noise)
        members *= rng.uniform(0.5, 2, (size, 1))  # not unit length on disk: normalised as read
        distance = 1 - unit(members) @ centroids[j].astype(np.float64)
        order = np.argsort(-distance, kind="stable")
        if j == ASCENDING:
            order = order[::-1]
        elif j == UNSORTED:
            order = order[[1, 0, 2]]  # the second farthest, the farthest, the nearest
        rows = [(f"{j:05d}/{start + i:09d}.jpg", start + i, repr(float(np.float32(distance[i]))), j) for i in order]
        write_cluster(root / "save" / "sorted_clusters" / f"cluster_{j}.npy", rows)
        x.append(members)
        start += size
    x = np.concatenate(x).astype(np.float32)
    perm = rng.permutation(len(x))  # rows of the embeddings in another order than the clusters'
    inverse = np.argsort(perm)
    for j in range(len(SIZES)):
        path = root / "save" / "sorted_clusters" / f"cluster_{j}.npy"
        rows = np.load(path)
        if rows.size:
            rows[:, 1] = inverse[rows[:, 1].astype(int)].astype(str)
            np.save(path, rows)
    np.save(root / "emb.npy", x[perm])
    np.save(root / "save" / "kmeans_centroids.npy", centroids)
    return {"x": x[perm].astype(np.float64), "sorted": root / "save" / "sorted_clusters", "emb": root / "emb.npy"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("dedup_data"))


def reference(data, j, which, seed=1234):
    """SemDeDup's definition, in float64 on the full matrix: (scores, matches) in the file's row order."""
    rows = np.load(data["sorted"] / f"cluster_{j}.npy")
    n = len(rows)
    if n == 0:
        return np.zeros(0), np.zeros(0, int)
    distance, steps = rows[:, 2].astype(np.float64), np.diff(rows[:, 2].astype(np.float64))
    if which == "random":
        order = np.random.default_rng([seed, j]).permutation(n)
    elif (steps <= 0).all() or (steps >= 0).all():  # sorted: ascending only if it rises somewhere
        descending = (steps <= 0).all()
        order = np.arange(n) if (which == "hard") == descending else np.arange(n)[::-1]
    else:  # an unsorted file is sorted first
        order = np.argsort(-distance if which == "hard" else distance, kind="stable")
    emb = unit(data["x"][rows[:, 1].astype(int)])[order]
    sims = emb @ emb.T
    scores, matches = np.zeros(n), np.full(n, -1)
    for i in range(1, n):
        best = int(np.argmax(sims[i, :i]))
        if sims[i, best] > 0:
            scores[i], matches[i] = sims[i, best], order[best]
    out_scores, out_matches = np.zeros(n), np.full(n, -1)
    out_scores[order], out_matches[order] = scores, matches
    return out_scores, out_matches


def dedup(data, out, *extra, script=DEDUP_SCRIPT):
    r = run_script(script, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                   "--eps", *EPS, "--save_folder", out, *extra)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def deduplicated(data, tmp_path_factory):
    """One run per --which-to-keep (two workers), shared by the tests that check or compare against it."""
    runs = {}

    def get(which):
        if which not in runs:
            out = tmp_path_factory.mktemp(f"dedup_{which}") / "d"
            runs[which] = out, dedup(data, out, "--which-to-keep", which)
        return runs[which]
    return get


@pytest.mark.parametrize("which", ["hard", "easy", "random"])
def test_scores_and_kept_sets_are_semdedups(data, deduplicated, which):
    out, r = deduplicated(which)
    assert ("warning: 1 cluster file(s) are not sorted" in r.stderr) == (which != "random")  # cluster 6
    kept_ref = {eps: set() for eps in EPS}
    borderline = {eps: set() for eps in EPS}  # within float32's reach of the threshold: either side is right
    for j in range(len(SIZES)):
        scores = np.load(out / "scores" / f"cluster_{j}.npy")
        matches = np.load(out / "matches" / f"cluster_{j}.npy")
        ref_scores, ref_matches = reference(data, j, which)
        assert scores.dtype == np.float32 and len(scores) == SIZES[j]
        np.testing.assert_allclose(scores, ref_scores, atol=2e-6)
        assert (matches == ref_matches).all()
        keys = [k.rsplit(".", 1)[0].encode() for k in np.load(data["sorted"] / f"cluster_{j}.npy")[:, 0]] \
            if SIZES[j] else []
        for eps in EPS:
            kept_ref[eps] |= {k for k, s in zip(keys, ref_scores) if s <= 1 - eps}
            borderline[eps] |= {k for k, s in zip(keys, ref_scores) if abs(s - (1 - eps)) < 1e-5}
    for eps in EPS:
        kept = np.load(out / f"eps_{eps:g}" / "kept_keys.npy").tolist()
        assert kept == sorted(set(kept))  # prune.py's format: sorted, unique
        assert set(kept) - borderline[eps] == kept_ref[eps] - borderline[eps]
        assert len(borderline[eps]) < 3
    assert 0 < len(kept_ref[0.2]) < len(kept_ref[0.05]) <= len(kept_ref[0.01]) < sum(SIZES)


def test_removed_paths_name_the_member_they_duplicate(data, deduplicated):
    out = deduplicated("hard")[0]
    lines = (out / "eps_0.2" / "removed_paths.txt").read_text().splitlines()
    stats = list(csv_rows(out / "dedup_stats.csv"))
    assert len(lines) == int(stats[2]["removed"]) > 0
    x = unit(data["x"])
    index = {}
    for j in range(len(SIZES)):
        rows = np.load(data["sorted"] / f"cluster_{j}.npy")
        index.update({k: int(i) for k, i in zip(rows[:, 0].tolist(), rows[:, 1].tolist())} if rows.size else {})
    for line in lines:
        path, duplicated, similarity = line.split("\t")
        assert float(similarity) > 0.8
        assert abs(x[index[path]] @ x[index[duplicated]] - float(similarity)) < 2e-6


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_semdedups_quirks(tmp_path):
    """The first member scores 0; a negative similarity counts as 0; a removed member still removes later ones;
    easy is the reversed file; a similarity exactly at 1 - eps is kept (SemDeDup's strict >)."""
    root = tmp_path
    angle = np.arccos(0.99)
    chain = [[np.cos(t), np.sin(t)] + [0] * (DIM - 2) for t in (0, angle, 2 * angle)]  # a~b, b~c, a!~c
    tie = [[1, 0, 0, 0, 0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0]]  # exactly 0.5
    opposite = [[0, 0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, -1, 0]]
    x = np.array(chain + tie + opposite, np.float32)
    np.save(root / "emb.npy", x)
    (root / "sorted").mkdir()
    for j, members in enumerate([[0, 1, 2], [3, 4], [5, 6]]):
        write_cluster(root / "sorted" / f"cluster_{j}.npy", [(f"s/{i}.jpg", i, 0.9 - 0.1 * r, j)
                                                             for r, i in enumerate(members)])
    for which, expected in (("hard", [0, 0.99, 0.99]), ("easy", [0.99, 0.99, 0])):
        r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", root / "sorted", "--embeddings", root / "emb.npy",
                       "--eps", 0.02, 0.5, 0.50001, "--which-to-keep", which, "--save_folder", root / which)
        assert r.returncode == 0, r.stderr
        np.testing.assert_allclose(np.load(root / which / "scores" / "cluster_0.npy"), expected, atol=1e-6)
        assert np.load(root / which / "scores" / "cluster_1.npy").tolist() == ([0, 0.5] if which == "hard" else
                                                                               [0.5, 0])
        assert np.load(root / which / "scores" / "cluster_2.npy").tolist() == [0, 0]
        assert np.load(root / which / "matches" / "cluster_2.npy").tolist() == [-1, -1]
        kept = {eps: set(np.load(root / which / f"eps_{eps}" / "kept_keys.npy").tolist())
                for eps in ("0.02", "0.5", "0.50001")}
        assert kept["0.02"] & {b"s/0", b"s/1", b"s/2"} == ({b"s/0"} if which == "hard" else {b"s/2"})
        assert {b"s/3", b"s/4"} <= kept["0.5"]  # 0.5 is not > 1 - 0.5: a tie is kept
        assert len({b"s/3", b"s/4"} & kept["0.50001"]) == 1


def test_blocks_of_any_size_give_the_full_matrix_answer():
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((53, 5)))
    x[17] = x[4]  # an exact repeat: its earliest copy is the match
    x[30] = x[4]
    sims = x @ x.T
    expected = np.array([max(0, sims[i, :i].max()) if i else 0 for i in range(53)])
    for block in (1, 7, 17, 53, 64):
        scores, matches = max_earlier_similarity(torch.from_numpy(x.astype(np.float32)), block)
        np.testing.assert_allclose(scores, expected, atol=1e-6)
        assert matches[17] == 4 and matches[30] == 4 and matches[0] == -1


def whole_blocks(x, block=1024):
    """The scores as deduplicate.py worked them out before the diagonal blocks were cut into strips: each block
    of rows against each earlier block of columns and its own whole diagonal block, one GEMM each."""
    best, match = np.zeros(len(x), np.float32), np.full(len(x), -1)
    for r0 in range(0, len(x), block):
        for c0 in range(0, r0 + 1, block):
            sims = torch.mm(x[r0:r0 + block], x[c0:min(c0 + block, r0 + block)].T).numpy()
            if c0 == r0:
                sims = np.tril(sims, -1)
            for i, row in enumerate(sims):
                if row.max() > best[r0 + i]:
                    best[r0 + i], match[r0 + i] = row.max(), c0 + row.argmax()
    return best, match


@pytest.mark.parametrize("rows,dim,offset", [(1024, 256, 0), (2500, 33, 1), (2048, 64, 0), (1100, 768, 3)])
def test_diagonal_strips_give_the_same_bits_as_whole_blocks(rows, dim, offset, monkeypatch):
    """Scores are the same bytes as before the strips: the probe's verdict on this machine's GEMM holds for real
    rows, and the scores taken either way (forced) equal the whole blocks' wherever the probe says so."""
    rng = np.random.default_rng(rows)
    x = torch.from_numpy(unit(rng.standard_normal((rows + offset, dim))).astype(np.float32))[offset:]
    x[rows // 2] = x[7]  # an exact repeat, across blocks
    expected = whole_blocks(x)
    scores, matches = max_earlier_similarity(x)
    assert scores.tobytes() == expected[0].tobytes() and matches.tolist() == expected[1].tolist()
    probe = scoring.strips_match(1024, dim, x.dtype, x.device)
    for forced in (True, False):
        monkeypatch.setattr(scoring, "strips_match", lambda *args, verdict=forced: verdict)
        scores, matches = max_earlier_similarity(x)
        same = scores.tobytes() == expected[0].tobytes() and matches.tolist() == expected[1].tolist()
        assert same if not forced else same == probe
    assert matches[rows // 2] == 7


def test_same_bytes_for_any_workers_and_a_new_eps_reuses_the_scores(data, deduplicated, tmp_path):
    dedup(data, tmp_path / "1", "--which-to-keep", "random", "--workers", 1)
    assert outputs(tmp_path / "1") == outputs(deduplicated("random")[0])
    scores = tmp_path / "1" / "scores" / "cluster_4.npy"
    before = os.stat(scores)
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"], "--eps", 0.3,
                   "--which-to-keep", "random", "--save_folder", tmp_path / "1")
    assert r.returncode == 0, r.stderr
    assert f"scores reused for {len(SIZES)} clusters" in r.stdout
    after = os.stat(scores)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not recomputed
    eps_folders = sorted(p.name for p in (tmp_path / "1").glob("eps_*") if p.is_dir())
    assert eps_folders == ["eps_0.01", "eps_0.05", "eps_0.2", "eps_0.3"]
    params = json.loads((tmp_path / "1" / "params.json").read_text())
    assert params["eps"] == [0.01, 0.05, 0.2, 0.3]
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"], "--eps", 0.3,
                   "--which-to-keep", "easy", "--save_folder", tmp_path / "1")
    assert r.returncode == 2 and "already holds the outputs of a completed run" in r.stderr


def test_another_seed_reuses_the_scores_of_hard_and_easy(data, deduplicated, tmp_path):
    """--seed draws only under random: under hard a rerun with another seed and a new eps reuses the scores, also
    those of a params.json whose fingerprint held the seed (as every one did before)."""
    shutil.copytree(deduplicated("hard")[0], tmp_path / "d")
    scores = tmp_path / "d" / "scores" / "cluster_4.npy"
    before = os.stat(scores)
    r = dedup(data, tmp_path / "d", "--seed", 7, "--eps", 0.3)  # (the last --eps given counts)
    assert f"scores reused for {len(SIZES)} clusters" in r.stdout
    params = json.loads((tmp_path / "d" / "params.json").read_text())
    assert params["seed"] == 7 and params["fingerprint"]["seed"] is None and params["eps"] == [*EPS, 0.3]
    params["fingerprint"]["seed"] = 1234
    (tmp_path / "d" / "params.json").write_text(json.dumps(params))
    r = dedup(data, tmp_path / "d", "--eps", 0.4)
    assert f"scores reused for {len(SIZES)} clusters" in r.stdout
    after = os.stat(scores)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # never recomputed
    r = dedup(data, tmp_path / "r", "--which-to-keep", "random", "--seed", 1, "--eps", 0.3)
    assert "scores reused" not in r.stdout
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"], "--eps", 0.4,
                   "--which-to-keep", "random", "--seed", 2, "--save_folder", tmp_path / "r")
    assert r.returncode == 2 and "already holds the outputs of a completed run" in error_line(r.stderr)


def test_a_killed_run_is_finished_by_a_rerun(data, deduplicated, tmp_path):
    expected = deduplicated("hard")[0]
    proc = start_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                        "--eps", *EPS, "--save_folder", tmp_path / "d", "--workers", 2, pause="score under way")
    wait_paused(proc, "score under way")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "d" / "params.json").exists()
    staged = {name for name in os.listdir(tmp_path / "d" / ".dbp_staging" / "matches")
              if not name.startswith(".")}  # (not a .partial file of a task killed as it wrote)
    assert staged  # the largest cluster, scored first
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                   "--eps", *EPS, "--save_folder", tmp_path / "d", "--which-to-keep", "easy")
    assert r.returncode == 2 and "holds the unfinished work of a stopped run that differs in --which_to_keep (rerun " \
        "that run's command to finish it, or pass --overwrite" in error_line(r.stderr)  # its scores kept for it:
    r = dedup(data, tmp_path / "d")
    assert f"scores reused for {len(staged)} clusters" in r.stdout
    assert outputs(tmp_path / "d") == outputs(expected)


def test_a_rerun_reusing_completed_scores_keeps_the_stopped_work_of_another_run(data, deduplicated, tmp_path):
    """A completed run under hard, then one under easy with --overwrite, killed as it scores: rerunning the hard
    command would reuse the completed scores, and must not discard the easy run's staged scores to do so."""
    shutil.copytree(deduplicated("hard")[0], tmp_path / "d")
    completed = outputs(tmp_path / "d")
    proc = start_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                        "--eps", *EPS, "--save_folder", tmp_path / "d", "--workers", 2, "--which-to-keep", "easy",
                        "--overwrite", pause="score under way")
    wait_paused(proc, "score under way")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    staging = tmp_path / "d" / ".dbp_staging"
    staged = sorted(name for name in os.listdir(staging / "matches") if not name.startswith("."))
    assert staged
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                   "--eps", 0.3, "--save_folder", tmp_path / "d")
    assert r.returncode == 2 and "holds the unfinished work of a stopped run that differs in --which_to_keep" \
        in error_line(r.stderr)
    assert sorted(name for name in os.listdir(staging / "matches") if not name.startswith(".")) == staged
    assert {name: data for name, data in outputs(tmp_path / "d").items() if name.parts[0] != ".dbp_staging"} \
        == completed  # (the completed run's outputs untouched)
    r = dedup(data, tmp_path / "d", "--which-to-keep", "easy", "--overwrite")  # the easy run, finished
    assert f"scores reused for {len(staged)} clusters" in r.stdout
    assert outputs(tmp_path / "d") == outputs(deduplicated("easy")[0])


def test_a_full_disk_ends_in_one_line_and_the_rerun_goes_on_from_the_scores_written(data, deduplicated, tmp_path):
    """Files may not grow past 3000 bytes, as on a full disk: numpy's write of the largest cluster's scores stops
    short (an OSError without an errno). One line naming the folder and the fix, nothing published, the scores
    written kept for the rerun, which writes what a run with room writes."""
    out = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, DEDUP_SCRIPT), "--sorted_clusters_path", data["sorted"],
                             "--embeddings", data["emb"], "--eps", *map(str, EPS), "--save_folder", out,
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit_file_size(3000))
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 1
    said = re.fullmatch(rf"error: {re.escape(str(out))}: a write stopped short \((\d+) of (\d+) items written\) "
                        r"\(check the path, its permissions and free disk space\)", error_line(err))
    assert said and int(said[1]) < int(said[2]), err  # (the 2100-row cluster's)
    assert sorted(os.listdir(out)) == [".dbp_staging"]
    scored = [name for name in os.listdir(out / ".dbp_staging" / "matches") if not name.startswith(".")]
    r = dedup(data, out)
    assert f"scores reused for {len(scored)} clusters" in r.stdout if scored else "scores reused" not in r.stdout
    assert outputs(out) == outputs(deduplicated("hard")[0])


def test_a_run_killed_before_its_parts_are_gathered_is_finished_by_a_rerun_with_other_eps(data, tmp_path):
    """The killed run leaves the part files its scoring tasks wrote (one per cluster and eps) in the staging folder;
    the rerun, with other eps, goes on from the scores and writes only its own eps, as a fresh run with those eps
    does."""
    proc = start_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                        "--eps", *EPS, "--save_folder", tmp_path / "d", "--workers", 2, pause="scored")
    wait_paused(proc, "scored")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    parts = os.listdir(tmp_path / "d" / ".dbp_staging" / ".parts")  # what the rerun must not trip over
    assert sorted(parts) == sorted(f"eps_{eps:g}_{j}" for eps in EPS for j in range(len(SIZES)))
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"], "--eps", 0.3,
                   "--save_folder", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    assert f"scores reused for {len(SIZES)} clusters" in r.stdout
    fresh = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                       "--eps", 0.3, "--save_folder", tmp_path / "fresh")
    assert fresh.returncode == 0, fresh.stderr
    assert outputs(tmp_path / "d") == outputs(tmp_path / "fresh")


@pytest.mark.parametrize("stage,fault", [("score under way", "ctrl-c"), ("scored", "ctrl-c"), ("scored", "sigterm"),
                                         ("writing the report", "sigterm")])
def test_an_interrupted_run_ends_in_one_line_and_its_rerun_goes_on_from_its_scores(data, deduplicated, tmp_path,
                                                                                   stage, fault):
    """Ctrl-C (to the run and its workers, as a terminal sends it) or SIGTERM (to the run) while it scores, once
    every cluster is scored and selected (before the selections are gathered), or as it begins its report: one
    line, nothing published, the scores kept for the rerun, which writes what an uninterrupted run writes."""
    expected = outputs(deduplicated("hard")[0])
    out = tmp_path / "d"
    proc = start_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                        "--eps", *EPS, "--save_folder", out, "--workers", 2, pause=stage)
    wait_paused(proc, stage)
    if fault == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        signal_main_thread(proc.pid, signal.SIGTERM)  # (the report's warning stands after the stage's safe point)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=DEADLINE)
    status, message = (130, "interrupted (Ctrl-C)") if fault == "ctrl-c" else (143, "terminated (SIGTERM)")
    assert proc.returncode == status and message in error_line(err), err
    assert not (out / "params.json").exists() and not any((out / p).exists() for p in ("scores", "eps_0.01"))
    matches = os.listdir(out / ".dbp_staging" / "matches")
    scored = sum(not name.startswith(".") for name in matches)  # (not a .partial file of a worker stopped mid-write)
    assert scored == len(SIZES) if stage != "score under way" else scored >= 1
    r = dedup(data, out)
    assert f"scores reused for {scored} clusters" in r.stdout
    assert outputs(out) == expected


def test_every_stage_has_its_progress_bar(data, tmp_path):
    """A fresh run scores (and selects as it scores), then gathers the selections; a rerun with a new eps
    selects from the scores it reuses. Each under a bar of its own (drawn at once here: TQDM_DELAY=0)."""
    def bars(*extra):
        proc = start_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                            "--save_folder", tmp_path / "d", "--workers", 2, *extra, env={"TQDM_DELAY": "0"})
        _, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err
        return {line.split(":")[0].strip("\r") for line in err.splitlines() if ":" in line}

    fresh = bars("--eps", *EPS)
    assert {"score", "gather"} <= fresh and "select" not in fresh
    rerun = bars("--eps", 0.3)
    assert "select" in rerun and "gather" not in rerun  # (its score bar counts no cluster)


def bad_file(j, rows):
    return lambda data, root: write_cluster(root / "sorted" / f"cluster_{j}.npy", rows)


BAD = [  # (id, change to a copy of the data, extra flags, what the one line says)
    ("eps-same-folder", None, ["--eps", ["0.5", "0.5000001"]], "would both be written to eps_0.5"),
    ("eps-zero", None, ["--eps", 0], "--eps: 0.0 is outside (0, 1)"),
    ("eps-one", None, ["--eps", 1], "--eps: 1.0 is outside (0, 1)"),
    ("eps-nan", None, ["--eps", "nan"], "--eps: nan is outside (0, 1)"),
    ("index-past-rows", bad_file(2, [("a/1.jpg", 0, 0.5, 2), ("a/2.jpg", 99999, 0.4, 2)]), [],
     "row 1: index 99999 is past the 2209 rows of the embeddings"),
    ("index-not-a-number", bad_file(2, [("a/1.jpg", "x", 0.5, 2)]), [], "row 0: index 'x' is not a row number"),
    ("duplicate-paths", bad_file(2, [("a/1.jpg", 0, 0.5, 2), ("a/1.jpg", 1, 0.4, 2)]), [],
     "key 'a/1.jpg' appears twice (rows 0 and 1)"),
    ("index-not-a-number-far-in", bad_file(2, [(f"a/{i}.jpg", -3 if i == 80 else i, 0.5, 2) for i in range(100)]), [],
     "row 80: index '-3' is not a row number"),  # (100 rows: parsed by Arrow, which hands the column to numpy)
    ("duplicate-paths-far-apart", bad_file(2, [(f"a/{3 if i == 90 else i}.jpg", i, 0.5, 2) for i in range(100)]), [],
     "key 'a/3.jpg' appears twice (rows 3 and 90)"),
    ("three-columns", bad_file(2, [("a/1.jpg", 0.5, 2)]), [], "has 3 columns (NeMo Curator 0.x)"),
    ("remove-fraction-of-nothing", lambda data, root: [write_cluster(path, []) for path in (root / "sorted").iterdir()],
     ["--eps", None, "--remove-fraction", 0.1], "--remove-fraction: the clusters hold no rows"),
    ("clusters-flag-empty", None, ["--sorted_clusters_path", ""], "--sorted_clusters_path: is required"),
    ("save-folder-empty", None, ["--save_folder", ""], "--save_folder: is required"),
    ("other-dimension", lambda data, root: np.save(root / "kmeans_centroids.npy", np.ones((7, 3), np.float32)), [],
     "have dimension 8 but the centroids"),
    ("no-embeddings", None, ["--embeddings", None], "--embeddings: is required: there is no clustering.json"),
    ("embeddings-moved", lambda data, root: (root / "clustering.json").write_text(json.dumps(
        {"embeddings": str(root / "moved" / "emb.npy")})), ["--embeddings", None],
     "moved/emb.npy, the embeddings "),
    ("seed-negative", None, ["--seed", -1], "--seed: -1 is negative"),
]


@pytest.mark.parametrize("change,extra,expect", [pytest.param(c, e, x, id=i) for i, c, e, x in BAD])
def test_bad_input_is_one_line_and_writes_nothing(data, tmp_path, change, extra, expect):
    import shutil

    shutil.copytree(data["sorted"], tmp_path / "sorted")
    shutil.copy(data["sorted"].parent / "kmeans_centroids.npy", tmp_path / "kmeans_centroids.npy")
    if change:
        change(data, tmp_path)
    args = {"--sorted_clusters_path": tmp_path / "sorted", "--embeddings": data["emb"], "--eps": 0.1,
            "--save_folder": tmp_path / "out"}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    r = run_script(DEDUP_SCRIPT, *[a for flag, value in args.items() if value is not None
                                   for a in (flag, *(value if isinstance(value, list) else [value]))])
    assert r.returncode == 2 and expect in error_line(r.stderr), r.stderr
    assert not (tmp_path / "out").exists()


def test_help_names_every_flag_in_both_spellings(tmp_path):
    r = run_script(DEDUP_SCRIPT, "--help")
    assert r.returncode == 0
    for flag in ("--sorted_clusters_path", "--sorted-clusters-path", "--eps", "--which-to-keep", "--which_to_keep",
                 "--embeddings", "--npz-key", "--device", "--save_folder", "--save-folder", "--workers"):
        assert flag in r.stdout, flag
    assert os.path.exists(os.path.join(ROOT, DEDUP_SCRIPT))


def copy_data(data, root):
    """A copy of the data set the tests may change: its cluster files, centroids and embeddings."""
    import shutil

    shutil.copytree(data["sorted"].parent, root / "save")
    shutil.copy2(data["emb"], root / "emb.npy")
    return {**data, "sorted": root / "save" / "sorted_clusters", "emb": root / "emb.npy"}


def test_reuse_follows_the_content_not_size_and_mtime(data, deduplicated, tmp_path):
    mine = copy_data(data, tmp_path)
    dedup(mine, tmp_path / "d")
    params = json.loads((tmp_path / "d" / "params.json").read_text())
    assert params["fingerprint"]["files"].startswith("sha256:") and len(json.dumps(params["fingerprint"])) < 200
    assert params["save_folder"] == str(tmp_path / "d") and params["distributor"] == "local"
    # Other embeddings behind the same size and mtime, as `cp -p` of another file leaves them.
    x = np.load(mine["emb"])
    stat = os.stat(mine["emb"])
    changed = x[::-1].copy()
    np.save(tmp_path / "other.npy", changed)
    os.replace(tmp_path / "other.npy", mine["emb"])
    os.utime(mine["emb"], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(mine["emb"]) == stat.st_size
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", mine["sorted"], "--embeddings", mine["emb"],
                   "--eps", 0.3, "--save_folder", tmp_path / "d")
    assert r.returncode == 2 and "already holds the outputs of a completed run" in error_line(r.stderr)
    dedup(mine, tmp_path / "d", "--overwrite")  # scored afresh: the rows the clusters index now hold others
    fresh = copy_data(data, tmp_path / "again")
    np.save(fresh["emb"], changed)
    dedup(fresh, tmp_path / "fresh")
    assert outputs(tmp_path / "d") == outputs(tmp_path / "fresh") != outputs(deduplicated("hard")[0])


def test_embeddings_other_than_those_the_clusters_were_made_from_are_refused(data, deduplicated, tmp_path):
    """Beside cluster_embeddings.py's clusters (a clustering.json naming their embeddings), embeddings of the same
    shape but another model's were scored without a word; a copy of the right ones, elsewhere, is taken."""
    mine = copy_data(data, tmp_path)
    (mine["sorted"].parent / "clustering.json").write_text(json.dumps({"embeddings": str(mine["emb"])}))
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(1).standard_normal(np.load(mine["emb"]).shape).astype(np.float32))
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", mine["sorted"], "--embeddings", other, "--eps", 0.3,
                   "--save_folder", tmp_path / "d")
    j = next(j for j in range(len(SIZES)) if SIZES[j])  # the first row of the first cluster with rows
    first = np.load(mine["sorted"] / f"cluster_{j}.npy")[0]
    row, centroid = int(first[1]), unit(np.load(mine["sorted"].parent / "kmeans_centroids.npy")[j].astype(float))
    distance = 1 - unit(np.load(other)[row].astype(float)) @ centroid
    assert r.returncode == 2 and error_line(r.stderr) == (
        f"error: --embeddings: row {row} is not the embedding {mine['sorted'] / f'cluster_{j}.npy'} was made from: "
        f"its cosine distance to centroid {j} is {distance:.6f}, the cluster file says {float(first[2]):.6f} (pass "
        f"the embeddings the clusters were made from ({mine['emb']}, as clustering.json names them))"), r.stderr
    assert not (tmp_path / "d").exists()
    os.rename(mine["emb"], tmp_path / "moved.npy")
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", mine["sorted"], "--embeddings", tmp_path / "moved.npy",
                   "--eps", *EPS, "--save_folder", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    assert outputs(tmp_path / "d") == outputs(deduplicated("hard")[0])
    np.save(tmp_path / "half.npy", np.load(tmp_path / "moved.npy").astype(np.float16))  # stored smaller since
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", mine["sorted"], "--embeddings", tmp_path / "half.npy",
                   "--eps", 0.3, "--save_folder", tmp_path / "half")
    assert r.returncode == 0, r.stderr


def test_overwrite_starts_clean_and_replaces_every_earlier_eps(data, deduplicated, tmp_path):
    out = tmp_path / "d"
    dedup(data, out)
    before = os.stat(out / "scores" / "cluster_4.npy").st_ino
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                   "--eps", 0.3, "--save_folder", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "reused" not in r.stdout and os.stat(out / "scores" / "cluster_4.npy").st_ino != before
    assert sorted(p.name for p in out.glob("eps_*") if p.is_dir()) == ["eps_0.3"]  # the earlier run's eps: gone
    assert json.loads((out / "params.json").read_text())["eps"] == [0.3]


def test_missing_scores_are_computed_again(data, deduplicated, tmp_path):
    import shutil

    expected = outputs(deduplicated("hard")[0])
    out = tmp_path / "d"
    shutil.copytree(deduplicated("hard")[0], out)
    os.remove(out / "scores" / "cluster_4.npy")
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                   "--eps", EPS[0], "--save_folder", out)
    assert r.returncode == 0, r.stderr
    assert f"scores reused for {len(SIZES) - 1} clusters" in r.stdout
    assert outputs(out) == expected
    shutil.rmtree(out / "scores")
    shutil.rmtree(out / "matches")
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                   "--eps", EPS[0], "--save_folder", out)
    assert r.returncode == 0 and "reused" not in r.stdout, r.stderr
    assert outputs(out) == expected
    log = (out / "logs.log").read_text()
    assert log.count("density-based-pruning") == 3  # the first run's log, and each rerun's after it


def test_a_rerun_mixing_reused_and_new_scores_and_a_late_eps_writes_what_fresh_runs_write(data, deduplicated,
                                                                                          tmp_path):
    """Every way a cluster's part file comes about in one run: cluster 4 is scored again (its scoring task writes
    its parts at the earlier run's eps), the others' scores are reused (their parts written from the scores), and
    --remove-fraction adds an eps once all are scored (everyone's part for it written from the scores). Each eps
    folder holds what a fresh run of that eps alone writes."""
    import shutil

    out = tmp_path / "d"
    shutil.copytree(deduplicated("hard")[0], out)
    os.remove(out / "matches" / "cluster_4.npy")
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                   "--remove-fraction", 0.15, "--save_folder", out)
    assert r.returncode == 0, r.stderr
    assert f"scores reused for {len(SIZES) - 1} clusters" in r.stdout
    fraction = tmp_path / "fraction"
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                   "--remove-fraction", 0.15, "--save_folder", fraction)
    assert r.returncode == 0, r.stderr
    fraction_eps = json.loads((fraction / "params.json").read_text())["eps"]
    assert json.loads((out / "params.json").read_text())["eps"] == sorted(EPS + fraction_eps)
    for fresh in (deduplicated("hard")[0], fraction):
        for path, content in outputs(fresh).items():
            if path.parts[0].startswith("eps_") or path.parts[0] in ("scores", "matches", "eps_curve.csv"):
                assert (out / path).read_bytes() == content, path
        stats = list(csv_rows(out / "dedup_stats.csv"))
        assert all(row in stats for row in csv_rows(fresh / "dedup_stats.csv"))  # its eps's rows, among the others
        for row, fresh_row in zip(csv_rows(out / "dedup_cluster_stats.csv"),
                                  csv_rows(fresh / "dedup_cluster_stats.csv"), strict=True):
            assert fresh_row.items() <= row.items()  # each cluster's size and what its eps remove of it


def test_a_new_eps_past_the_6th_digit_replaces_the_earlier_one(data, deduplicated, tmp_path):
    import shutil

    out = tmp_path / "d"
    shutil.copytree(deduplicated("hard")[0], out)
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                   "--eps", 0.05000001, "--save_folder", out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("eps_*") if p.is_dir()) == ["eps_0.01", "eps_0.05", "eps_0.2"]
    assert json.loads((out / "params.json").read_text())["eps"] == [0.01, 0.05000001, 0.2]


def make_ties(root):
    """Clusters holding exact copies (scores of exactly 1, tied) beside near and far members."""
    rng = np.random.default_rng(3)
    base = unit(rng.standard_normal((3, DIM)))
    x, start = [], 0
    os.makedirs(root / "save" / "sorted_clusters")
    for j in range(3):
        members = unit(base[j] + 0.5 * rng.standard_normal((30, DIM)))
        members[5:11] = members[4]  # six copies of one member: tied at the top score
        members[20] = unit(members[19] + 0.05 * rng.standard_normal(DIM))
        distance = 1 - members @ base[j]
        order = np.argsort(-distance, kind="stable")
        rows = [(f"{j}/{start + i}.jpg", start + i, repr(float(distance[i])), j) for i in order]
        write_cluster(root / "save" / "sorted_clusters" / f"cluster_{j}.npy", rows)
        x.append(members)
        start += len(members)
    np.save(root / "emb.npy", np.concatenate(x).astype(np.float32))
    np.save(root / "save" / "kmeans_centroids.npy", base.astype(np.float32))
    return {"sorted": root / "save" / "sorted_clusters", "emb": root / "emb.npy"}


def test_an_eps_within_the_rounding_of_1_is_warned_about_and_a_larger_one_removes_every_copy(tmp_path):
    """Identical embeddings score 1 only up to float32's rounding (x . x of a unit row): an eps below 1e-5 is
    warned about as it can keep some exact copies; at 1e-5 a member and its six copies keep one of the seven,
    whatever the rounding."""
    data = make_ties(tmp_path)
    out = tmp_path / "d"
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                   "--eps", 1e-9, 1e-5, 0.01, "--save_folder", out)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: eps")]
    assert warnings == ["warning: eps 1e-09 is within float32's rounding of a similarity of 1: identical embeddings "
                        "can score below 1 - eps and be kept; eps 1e-05 or more removes every exact copy"]
    assert f"WARNING {warnings[0].removeprefix('warning: ')}" in (out / "logs.log").read_text()
    kept = {key.decode() for key in np.load(out / "eps_1e-05" / "kept_keys.npy")}
    for j in range(3):  # make_ties: rows 4..10 of cluster j (30 rows each) hold one member and its six copies
        copies = {f"{j}/{30 * j + i}" for i in range(4, 11)}
        assert len(copies & kept) == 1
    x = np.load(data["emb"])
    assert any(np.float32(x[i] @ x[i]) != 1 for i in range(len(x)))  # (the rounding is there to be warned about)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_remove_fraction_removes_the_top_scores_ties_included(tmp_path, fraction):
    import csv
    import math

    data = make_ties(tmp_path)
    out = tmp_path / "d"
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                   "--remove-fraction", fraction, "--save_folder", out)
    assert r.returncode == 0, r.stderr
    scores = np.concatenate([np.load(out / "scores" / f"cluster_{j}.npy") for j in range(3)])
    m = math.ceil(fraction * len(scores))
    mth = np.sort(scores)[::-1][m - 1]  # by hand: the m-th largest score
    expected = int((scores >= mth).sum())  # every row at least as high, ties included
    assert expected >= m
    params = json.loads((out / "params.json").read_text())
    eps = params["remove_fraction_eps"]
    assert params["remove_fraction"] == fraction and params["eps"] == [eps]
    assert params["removed"] == {f"{eps:g}": expected}
    kept = np.load(out / f"eps_{eps:g}" / "kept_keys.npy")
    assert len(kept) == len(scores) - expected
    with open(out / "dedup_stats.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["eps"]) == eps and int(row["removed"]) == expected
    with open(out / "eps_curve.csv") as f:
        curve = list(csv.DictReader(f))
    for point in curve[::20]:  # the curve: what each eps of the grid removes, by hand
        assert int(point["removed"]) == int((scores > np.float32(1 - float(point["eps"]))).sum())


def test_remove_fraction_past_the_scores_above_zero_is_one_line_and_keeps_the_scores(tmp_path):
    """Only the finished scores show that F is too large: the run says so, publishes nothing, and keeps them
    staged; the rerun with a smaller F scores nothing again and writes what a fresh run writes."""
    data = make_ties(tmp_path)
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                   "--remove-fraction", 0.99, "--save_folder", tmp_path / "d")
    assert r.returncode == 2 and "--remove-fraction: 0.99 asks for 90 rows, but only" in error_line(r.stderr)
    assert "the scores are kept, and the rerun uses them" in error_line(r.stderr)
    assert os.listdir(tmp_path / "d") == [".dbp_staging"]  # nothing published
    pause = {"DBP_PAUSE_AT": f"task score_cluster {tmp_path / 'a cluster was scored again'}"}
    rerun = start_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                         "--remove-fraction", 0.2, "--save_folder", tmp_path / "d", env=pause)
    _, err = finished(rerun)
    assert rerun.returncode == 0, err
    assert not (tmp_path / "a cluster was scored again").exists()
    fresh = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                       "--remove-fraction", 0.2, "--save_folder", tmp_path / "fresh")
    assert fresh.returncode == 0, fresh.stderr
    eps = json.loads((tmp_path / "fresh" / "params.json").read_text())["remove_fraction_eps"]
    for name in (f"eps_{eps:g}/kept_keys.npy", f"eps_{eps:g}/removed_paths.txt", "dedup_stats.csv"):
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    r = run_script(DEDUP_SCRIPT, "--sorted_clusters_path", data["sorted"], "--embeddings", data["emb"],
                   "--remove-fraction", 0.2, "--eps", 0.1, "--save_folder", tmp_path / "d")
    assert r.returncode == 2 and "not allowed with argument" in error_line(r.stderr)


def test_the_histogram_is_of_one_minus_the_score_on_a_log_axis():
    from dbpkit.dedup import DISTANCE_FLOOR, EPS_GRID, HISTOGRAM_BINS
    from dbpkit.dedup_report import similarity_figure

    histogram = np.zeros(len(HISTOGRAM_BINS) - 1, int)
    histogram[10] = 5
    left = similarity_figure([0.001], np.array([3]), histogram, np.zeros(len(EPS_GRID)), 10).axes[0]
    assert left.get_xscale() == "log" and HISTOGRAM_BINS[0] == DISTANCE_FLOOR
    (line,) = [line for line in left.lines if "eps 0.001" in line.get_label()]
    assert line.get_xdata()[0] == pytest.approx(0.001, rel=1e-3)  # the threshold stands at 1 - (1 - eps)


def test_the_legend_hides_no_bar_when_exact_copies_are_the_tallest():
    """A LAION run: exact copies (1 - score at the floor, the far left, where the legend stands) the tallest bar,
    five eps in the legend; every bar's top is read back from the drawn figure, clear of it."""
    from dbpkit.dedup import EPS_GRID, HISTOGRAM_BINS
    from dbpkit.dedup_report import similarity_figure

    histogram = np.zeros(len(HISTOGRAM_BINS) - 1, np.int64)
    histogram[0], histogram[1:8], histogram[60:120] = 5_000_000, 40_000, np.arange(60) * 50_000 + 10_000
    eps = [0.0001, 0.001, 0.01, 0.05, 0.1]
    figure = similarity_figure(eps, np.array([1, 2, 3, 4, 5]) * 10**6, histogram, np.zeros(len(EPS_GRID), np.int64),
                               int(histogram.sum()))
    left = figure.axes[0]
    assert len(left.get_legend().get_texts()) == len(eps)
    assert under_legend(left, bar_tops(HISTOGRAM_BINS, histogram)) == []
    assert left.get_ylim()[0] < 1  # a bin of one member shows


def test_similarity_png_drawn_in_two_goes_is_the_image_drawn_at_once():
    """deduplicate.py draws similarity.png's frame while its workers start and the scores into it at the end: the
    same bytes as the figure drawn in one go, for eps inside and outside the curve's grid, with and without rows."""
    from dbpkit.dedup import EPS_GRID, HISTOGRAM_BINS
    from dbpkit.dedup_report import SimilarityFigure, similarity_figure

    rng = np.random.default_rng(0)
    histogram = rng.integers(0, 5000, len(HISTOGRAM_BINS) - 1)
    curve = np.sort(rng.integers(0, 300_000, len(EPS_GRID)))[::-1]
    for eps, removed, total in (([0.01, 0.05, 0.1], [10, 200, 3000], 300_000), ([1e-6, 0.5], [0, 7], 300_000),
                                ([0.05], [0], 0)):
        images = []
        for figure in (similarity_figure(eps, np.array(removed), histogram * (total > 0), curve * (total > 0), total),
                       SimilarityFigure(total).draw_frame().draw(eps, np.array(removed), histogram * (total > 0),
                                                                 curve * (total > 0))):
            image = io.BytesIO()
            figure.savefig(image, format="png")
            images.append(image.getvalue())
        assert images[0] == images[1]


def test_every_eps_keeps_and_removes_by_its_own_threshold(tmp_path):
    """One cluster, several eps in any order: each eps's part holds the stripped keys of the rows it keeps,
    sorted, no wider than the longest of them (a long key removed at that eps does not widen it), then one
    line per row it removes, in file order: path, the path it duplicates, the similarity as float32 prints."""
    from dbpkit import dedup
    from dbpkit.clusters import read_cluster_header

    paths = ["a/1.jpg", "bb/22.png", "a/333333333333333.jpg", "c/4.jpg", "d/5", "a/6.jpg"]
    scores = np.array([0.0, 0.995, 0.999, 0.5, 0.95, 0.9999], np.float32)
    matches = np.array([-1, 0, 1, -1, 3, 2])
    write_cluster(tmp_path / "cluster_3.npy", [(p, i, "0.5", 3) for i, p in enumerate(paths)])
    for folder, values in ((dedup.SCORES_DIR, scores), (dedup.MATCHES_DIR, matches)):
        os.makedirs(tmp_path / folder)
        np.save(tmp_path / folder / "cluster_3.npy", values)
    eps_list = [0.01, 0.5, 0.001, 0.06]
    os.makedirs(tmp_path / "parts")
    cluster = read_cluster_header(str(tmp_path / "cluster_3.npy"))
    removed = dedup.select_eps((cluster, 3, str(tmp_path), eps_list, str(tmp_path / "parts")))
    for eps, count in zip(eps_list, removed.removed):
        gone = [i for i, s in enumerate(scores) if s > np.float32(1 - eps)]
        kept = sorted(p.rsplit(".", 1)[0].encode() for i, p in enumerate(paths) if i not in gone)
        with open(dedup.eps_part(str(tmp_path / "parts"), eps, 3), "rb") as f:
            keys, lines = np.load(f), f.read().decode()
        assert count == len(gone)
        assert keys.tolist() == kept and keys.dtype == np.dtype(f"S{max(len(k) for k in kept)}")
        assert lines == "".join(f"{paths[i]}\t{paths[matches[i]]}\t{str(scores[i])}\n" for i in gone)
    assert removed.removed == [3, 4, 1, 4]  # by hand; at eps 0.001, 0.999 is the threshold itself: kept
