"""make_report.py: the report of a real pipeline run (images -> embeddings -> SemDeDup -> k-means -> DBP), checked
against the runs' own outputs, and in a real browser (Debian's chromium driven by Playwright): pages load from
file:// with no error and no request leaving the report, images decode and show their own picture, the table
sorts, hostile keys, captions and urls run nothing.

Without chromium or Playwright the browser tests skip, unless DBP_REQUIRE_BROWSER is set (as .ci/run sets it):
then they fail.
"""

import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CLUSTER_SCRIPT,
    CPUS,
    DEADLINE,
    DINTER_SCRIPT,
    DINTRA_SCRIPT,
    PRUNE_SCRIPT,
    ROOT,
    STOPS,
    error_line,
    run_script,
    session_is_empty,
    stalled_stream,
    start_script,
    wait_paused,
    wait_until,
)

sys.path.insert(0, os.path.join(ROOT, "examples"))
import make_toy_images  # noqa: E402

REPORT_SCRIPT = "make_report.py"
PER_STRIP = 6
HOSTILE_CAPTIONS = ("<img src=x onerror=alert(1)>", "</title><script>window.pwned = 1</script>")
HOSTILE_KEYS = ("k<img src=x onerror=alert(1)>", "k\"'><svg onload=alert(2)>", "k&amp;<b>bold</b>x")
HOSTILE_URLS = ("javascript:window.pwned=1", "\" onmouseover=\"alert(3)")


def add_samples(path: str, samples: list[tuple[str, dict]]) -> None:
    with tarfile.open(path, "a") as tar:
        for key, payloads in samples:
            for ext, payload in payloads.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def jpeg(seed: int) -> bytes:
    return make_toy_images.encoded(make_toy_images.make_image(np.random.default_rng(seed)), "jpg")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The five steps on 160 synthetic images in 4 shards (near-repeats among them); shard 3 also holds hostile
    keys, captions and urls, and an image that cannot be decoded."""
    root = tmp_path_factory.mktemp("report")
    shards = make_toy_images.make_shards(str(root / "shards"), 160, 40, seed=2)
    hostile = [(key, {"jpg": jpeg(100 + i), "txt": HOSTILE_CAPTIONS[i % 2].encode(),
                      "json": json.dumps({"url": HOSTILE_URLS[i % 2]}).encode()}) for i, key in enumerate(HOSTILE_KEYS)]
    add_samples(shards[3], [*hostile, ("broken", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"broken"})])
    model = make_toy_images.save_tiny_dinov2(str(root / "model"))
    pattern = str(root / "shards" / "{00000..00003}.tar")
    steps = [
        ("compute_embeddings.py", "--shards", pattern, "--output_folder", root / "emb", "--model", model,
         "--batch-size", 32),
        (CLUSTER_SCRIPT, "--embeddings", root / "emb" / "img_emb", "--num_clusters", 6, "--save_folder", root / "c1"),
        ("deduplicate.py", "--sorted_clusters_path", root / "c1" / "sorted_clusters", "--eps", 0.001, 0.01,
         "--save_folder", root / "dedup"),
        (CLUSTER_SCRIPT, "--embeddings", root / "emb" / "img_emb", "--subset",
         root / "dedup" / "eps_0.001" / "kept_keys.npy", "--num_clusters", 4, "--save_folder", root / "c2"),
        (DINTRA_SCRIPT, "--sorted_clusters_path", root / "c2" / "sorted_clusters",
         "--avg_distance_to_cent_save_path", root / "dintra.npy"),
        (DINTER_SCRIPT, "--sorted_clusters_path", root / "c2" / "sorted_clusters",
         "--mean_centroid_distances_save_path", root / "dinter.npy", "--num_NNs", 2),
        (PRUNE_SCRIPT, "--sorted-clusters-path", root / "c2" / "sorted_clusters", "--avg_distance_to_cent_save_path",
         root / "dintra.npy", "--mean_centroid_distances_save_path", root / "dinter.npy", "--prune-ratio", 0.5,
         "--save-dir", root / "run"),
    ]
    for script, *args in steps:
        r = run_script(script, *args)
        assert r.returncode == 0, (script, r.stderr)
    return {"root": root, "shards": shards, "pattern": pattern, "run": root / "run", "dedup": root / "dedup",
            "sorted": root / "c2" / "sorted_clusters"}


def report(pipeline, out, *extra, shards=True, dedup=True, workers=2):
    args = ["--prune-dir", pipeline["run"], "--save_folder", out, "--per-strip", PER_STRIP, "--workers", workers,
            *extra]
    if shards:
        args += ["--shards", pipeline["pattern"] if shards is True else shards]
    if dedup:
        args += ["--dedup-dir", pipeline["dedup"]]
    r = run_script(REPORT_SCRIPT, *args)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def made(pipeline):
    out = pipeline["root"] / "report"
    return out, report(pipeline, out)


@pytest.fixture(scope="module")
def everyone(pipeline):
    """A report whose strips hold every member of every cluster (so the hostile samples are shown)."""
    out = pipeline["root"] / "report_all"
    report(pipeline, out, "--per-strip", 100)
    return out


class Marked(HTMLParser):
    """The elements of a page that carry the markup contract's attributes, in document order."""

    def __init__(self):
        super().__init__()
        self.thumbs, self.pairs, self.eps = [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-eps" in attrs:
            self.eps = attrs["data-eps"]
        if "data-similarity" in attrs:
            self.pairs.append({"similarity": attrs["data-similarity"], "eps": self.eps, "thumbs": []})
        if "data-role" in attrs:
            item = dict(attrs, tag=tag)
            self.thumbs.append(item)
            if self.pairs and item["data-role"] in ("removed", "duplicate-of") and len(self.pairs[-1]["thumbs"]) < 2:
                self.pairs[-1]["thumbs"].append(item)


def marked(path) -> Marked:
    parser = Marked()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    return parser


def cluster_rows(sorted_dir, j):
    table = np.load(os.path.join(sorted_dir, f"cluster_{j}.npy"))
    return [str(k) for k in table[:, 0]], table[:, 2].astype(np.float64)


def prune_stats(run):
    with open(run / "cluster_stats.csv", newline="") as f:
        return list(csv.DictReader(f))


def kept_paths(run) -> set:
    return set((run / "kept_paths.txt").read_text(encoding="utf-8").splitlines())


# ---- the pages' content, against the runs' own outputs (no browser needed) ----

def test_cluster_pages_show_prunes_kept_and_pruned_members_in_the_right_strips(pipeline, made):
    out, r = made
    stats, kept = prune_stats(pipeline["run"]), kept_paths(pipeline["run"])
    assert len(list((out / "clusters").iterdir())) == len(stats) == 4
    for j, row in enumerate(stats):
        keys, distances = cluster_rows(pipeline["sorted"], j)
        by_key = dict(zip(keys, distances))
        ascending = [keys[i] for i in np.argsort(distances, kind="stable")]
        page = marked(out / "clusters" / f"cluster_{j}.html")
        strips = {"nearest": [], "cut": [], "farthest": []}
        strip_of = iter(["nearest"] * PER_STRIP + ["cut"] * PER_STRIP + ["farthest"] * PER_STRIP)
        for t in page.thumbs:
            assert t["data-cluster"] == str(j) and t["tag"] == "img" and "data-missing" not in t
            assert (t["data-role"] == "kept") == (t["data-key"] in kept), t  # prune's own kept set of cluster j
            strips[next(strip_of)].append(t["data-key"])
        assert strips["nearest"] == ascending[:PER_STRIP]  # by distance, brute force
        assert strips["farthest"] == ascending[-PER_STRIP:]
        # hard keeps the farthest: the cut strip shows the farthest pruned members and the nearest kept ones
        members_kept = sorted((k for k in keys if k in kept), key=by_key.get)
        members_pruned = sorted((k for k in keys if k not in kept), key=by_key.get)
        assert len(members_kept) == int(row["quota"])
        shown_pruned = [k for k in strips["cut"] if k not in kept]
        shown_kept = [k for k in strips["cut"] if k in kept]
        assert shown_pruned == members_pruned[len(members_pruned) - len(shown_pruned):]
        assert shown_kept == members_kept[:len(shown_kept)]
        assert len(shown_pruned) == len(shown_kept) == PER_STRIP // 2
        assert strips["cut"] == shown_pruned + shown_kept  # nearer first


def test_dedup_pairs_are_lines_of_removed_paths_nearest_the_threshold_first(pipeline, made):
    out, _ = made
    page = marked(out / "dedup.html")
    for eps in ("0.001", "0.01"):
        lines = (pipeline["dedup"] / f"eps_{eps}" / "removed_paths.txt").read_text(encoding="utf-8").splitlines()
        triples = [tuple(line.split("\t")) for line in lines]
        assert triples, "the toy data has near-repeats at every eps"
        shown = [p for p in page.pairs if p["eps"] == eps]
        assert len(shown) == min(100, len(triples))  # --pairs 100: every pair here
        for pair in shown:
            removed, duplicate = pair["thumbs"]
            assert (removed["data-role"], duplicate["data-role"]) == ("removed", "duplicate-of")
            assert (removed["data-key"], duplicate["data-key"], pair["similarity"]) in triples
        near = sorted(float(t[2]) for t in triples)[:50]
        assert [float(p["similarity"]) for p in shown[:len(near)]] == near
    html = (out / "dedup.html").read_text(encoding="utf-8")
    pairs = re.findall(r'<div class="pair" data-similarity="([^"]*)">(.*?)</div>', html, re.S)
    assert len(pairs) == len(page.pairs)
    for similarity, inner in pairs:  # the similarity is read once per pair, not under a thumbnail as well
        assert re.sub(r"<[^>]*>", " ", inner).split().count(similarity) == 1, inner
    with open(pipeline["dedup"] / "dedup_stats.csv") as f:
        for row in csv.DictReader(f):
            assert f"removed {row['removed']}, kept {row['kept']}" in (out / "dedup.html").read_text()


def test_index_has_the_funnel_the_extremes_and_every_cluster(pipeline, made):
    out, r = made
    html = (out / "index.html").read_text(encoding="utf-8")
    params = json.loads((pipeline["run"] / "params.json").read_text())
    embedded = json.loads((pipeline["root"] / "emb" / "params.json").read_text())
    assert embedded["rows"] == 163 and embedded["failed"] == 1  # 160 + the hostile three; the broken jpg failed
    for label, count in (("images embedded", 163), ("failed to decode (not embedded)", 1),
                         ("kept by DBP", params["kept_samples"])):
        assert f"<td>{label}</td><td class=\"num\">{count}</td>" in html
    with open(pipeline["dedup"] / "dedup_stats.csv") as f:
        for row in csv.DictReader(f):
            assert f"<td>kept by deduplication at eps {row['eps']}</td><td class=\"num\">{row['kept']}</td>" in html
    clustered = re.findall(r"<td>kept by deduplication at eps ([^<]*)</td>.*?<td>([^<]*); these rows were clustered "
                           r"for DBP</td>", html)
    assert [eps for eps, _ in clustered] == ["0.001"]  # c2 clustered eps_0.001/kept_keys.npy
    assert (out / "quotas.png").read_bytes() == (pipeline["run"] / "quotas.png").read_bytes()
    assert (out / "similarity.png").read_bytes() == (pipeline["dedup"] / "similarity.png").read_bytes()
    page = marked(out / "index.html")
    complexity = {int(s["cluster_id"]): float(s["complexity"]) for s in prune_stats(pipeline["run"])}
    shown = list(dict.fromkeys(int(t["data-cluster"]) for t in page.thumbs))
    by_complexity = sorted(complexity, key=complexity.get)
    assert shown == by_complexity[::-1][:2] + by_complexity[:2]  # k = 4: the 2 most complex, then the 2 simplest
    # what the headings say of them: the softmax's shares (not the fraction each keeps, which its size moves)
    assert "The 2 most complex clusters (the largest shares of the kept samples)" in html
    assert "The 2 simplest clusters (the smallest shares)" in html
    share = {int(s["cluster_id"]): float(s["probability"]) for s in prune_stats(pipeline["run"])}
    assert sorted(share[j] for j in shown[:2]) == sorted(share.values())[-2:]
    assert sorted(share[j] for j in shown[2:]) == sorted(share.values())[:2]
    for j in shown:  # each strip: members evenly spread from the nearest to the farthest
        keys, distances = cluster_rows(pipeline["sorted"], j)
        ascending = [keys[i] for i in np.argsort(distances, kind="stable")]
        spread = [ascending[round(i * (len(keys) - 1) / (PER_STRIP - 1))] for i in range(PER_STRIP)]
        assert [t["data-key"] for t in page.thumbs if t["data-cluster"] == str(j)] == spread
    assert html.count("<tr><td data-value=") == 4


def test_report_json_lists_every_thumbnail_shown(made):
    out, _ = made
    entries = json.loads((out / "report.json").read_text())
    for page in ["index.html", "dedup.html", *(f"clusters/{p.name}" for p in (out / "clusters").iterdir())]:
        on_page = [(e["key"], e["role"], e["cluster"]) for e in entries if e["page"] == page]
        in_markup = [(t["data-key"], t["data-role"], int(t["data-cluster"]) if "data-cluster" in t else None)
                     for t in marked(out / page).thumbs]
        assert on_page == in_markup and on_page
    for e in entries:
        assert (out / e["image"]).is_file()


@pytest.mark.parametrize("workers,streamed", [(1, False), (2, True)])
def test_the_same_bytes_for_any_number_of_workers_and_from_pipe_commands(pipeline, made, tmp_path, workers, streamed):
    """One worker, or the shards streamed from pipe: commands (each in a worker leading a process group of its own,
    with the command in it): the same report, byte for byte."""
    out, _ = made
    shards = f"pipe:cat {pipeline['pattern']}" if streamed else True
    report(pipeline, tmp_path / "one", workers=workers, shards=shards)
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert files == {p.relative_to(tmp_path / "one"): p.read_bytes() for p in (tmp_path / "one").rglob("*")
                     if p.is_file()}


def test_without_shards_every_image_is_a_placeholder_saying_why(pipeline, tmp_path):
    r = report(pipeline, tmp_path / "r", shards=False)
    thumbs = [t for page in (tmp_path / "r").rglob("*.html") for t in marked(page).thumbs]
    assert thumbs and all(t["tag"] == "div" and t["data-missing"] == "no --shards given: images not shown"
                          for t in thumbs)
    assert not list((tmp_path / "r" / "thumbs").iterdir())
    keys = {t["data-key"] for t in thumbs}
    index = (tmp_path / "r" / "index.html").read_text()
    assert f"{len(keys)} image(s) shown as placeholders: no --shards given" in index
    assert len(thumbs) > len(keys)  # (some shown twice: the count of placeholders is of images, said so)
    assert f"{len(thumbs)} thumbnails of {len(keys)} images ({len(keys)} of them placeholders)" in r.stdout


def shards_read_for(tmp_path, wanted: set[str]) -> tuple[set[str], list[str]]:
    """make_report's gather_images over shards 00000..00003 of img2dataset's keys (the shard's 5 digits, then 4),
    where shards 1 and 3 are not tars at all and shard 0 is cut short in its last sample (so any shard read to its
    end is named unreadable), and 000020009 sits in shard 0 instead of its own. Returns the keys found and the
    shards named unreadable: those read to the end."""
    from dbpkit import tasks, thumbs

    folder = tmp_path / "shards"
    folder.mkdir(parents=True)
    add_samples(str(folder / "00000.tar"), [("000000001", {"jpg": jpeg(1)}), ("000020009", {"jpg": jpeg(9)}),
                                            ("k-of-no-shard", {"jpg": jpeg(5)}), ("000000004", {"jpg": jpeg(4)}),
                                            ("000000005", {"jpg": jpeg(6)})])
    with tarfile.open(folder / "00000.tar") as tar:
        last = tar.getmembers()[-1]
    os.truncate(folder / "00000.tar", last.offset_data + last.size // 2)  # (cut in the middle of the last image)
    add_samples(str(folder / "00002.tar"), [("000020002", {"jpg": jpeg(2)}), ("000020003", {"jpg": jpeg(3)})])
    for n in (1, 3):
        (folder / f"0000{n}.tar").write_bytes(b"not a tar " * 100)
    urls = [str(folder / f"0000{n}.tar") for n in range(4)]
    (tmp_path / "thumbs").mkdir(exist_ok=True)
    with tasks.TaskPool(1) as pool:
        found, unreadable = thumbs.gather_images(urls, wanted, 64, str(tmp_path / "thumbs"), pool)
    assert all(found[key].jpeg is None and found[key].missing is None for key in found)  # (thumbnails on disk)
    return set(found), sorted(os.path.basename(url) for url, _ in unreadable)


def test_a_key_naming_its_shard_is_read_from_that_shard_alone(tmp_path):
    """A LAION report wants a few thousand samples of 40,000 shards: only the shards its keys name are read, each
    up to its last wanted sample; a key not in its own shard, or of no known shard, is looked for everywhere."""
    assert shards_read_for(tmp_path / "a", {"000000001", "000020002", "00002/000020003"}) == (
        {"000000001", "000020002", "00002/000020003"}, [])  # shards 1 and 3 never opened, 0 and 2 not to the end
    assert shards_read_for(tmp_path / "b", {"000020002", "000020009"}) == (
        {"000020002", "000020009"}, ["00001.tar", "00003.tar"])  # 000020009 not in 00002.tar: the others read
    assert shards_read_for(tmp_path / "c", {"000000001", "k-of-no-shard", "000099999"}) == (
        {"000000001", "k-of-no-shard"}, ["00000.tar", "00001.tar", "00003.tar"])  # (no shard 00009: everywhere)


def test_undecodable_images_and_a_truncated_shard_become_placeholders(pipeline, made, tmp_path):
    """Shard 0 where no image decodes, shard 2 cut short: the report still shows the rest and says why."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for path in pipeline["shards"]:
        shutil.copy(path, folder)
    with tarfile.open(pipeline["shards"][0]) as src, tarfile.open(folder / "00000.tar", "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.rsplit(".", 1)[1] in ("jpg", "png", "webp"):
                data = b"\x00garbage" * 10
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    size = os.path.getsize(folder / "00002.tar")
    with open(folder / "00002.tar", "r+b") as f:
        f.truncate(size // 2 + 100)
    report(pipeline, tmp_path / "r", shards=str(folder / "{00000..00003}.tar"))
    good = {t["data-key"]: t for page in (made[0]).rglob("*.html") for t in marked(page).thumbs}
    thumbs = {t["data-key"]: t for page in (tmp_path / "r").rglob("*.html") for t in marked(page).thumbs}
    assert thumbs.keys() == good.keys()
    truncated = set()
    for key, t in thumbs.items():
        if key.startswith("00000"):
            assert t["tag"] == "div" and t["data-missing"].split(" cannot be decoded (")[0] in ("jpg", "png", "webp")
        elif key.startswith("00002") and t["tag"] == "div":
            assert t["data-missing"] == ("not found in the shards given (--shards) (1 shard(s) could not be read to "
                                         "the end)")
            truncated.add(key)
        else:
            assert t["tag"] == "img", t
    assert truncated  # the cut took some of shard 2's samples shown
    index = (tmp_path / "r" / "index.html").read_text()
    assert f"shard {folder / '00002.tar'} could not be read to the end" in index


# ---- bad input: one line, a non-zero exit, nothing written ----

def fails(*args) -> str:
    r = run_script(REPORT_SCRIPT, *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    line = error_line(r.stderr)
    assert line.startswith("error: ")
    return line.removeprefix("error: ")


def test_bad_input_is_one_line_and_writes_nothing(pipeline, made, tmp_path):
    out = tmp_path / "out"
    run = ("--prune-dir", pipeline["run"])
    cases = [
        (("--prune-dir", tmp_path / "nowhere"), "--prune-dir: " + str(tmp_path / "nowhere") + " does not exist"),
        (("--prune-dir", pipeline["dedup"]), f"--prune-dir: {pipeline['dedup']} holds no cluster_stats.csv"),
        ((*run, "--dedup-dir", pipeline["run"]), f"--dedup-dir: {pipeline['run']} holds no dedup_stats.csv"),
        ((*run, "--shards", str(tmp_path / "{00000..00003}.tar")), "--shards: "),
        ((*run, "--per-strip", 0), "--per-strip: 0 is less than 1"),
        ((*run, "--thumb-size", 8), "--thumb-size: 8 is less than 16"),
        # its tasks mostly wait on remote shards: up to 16 workers a CPU, not the 4 of the other scripts
        ((*run, "--workers", 16 * CPUS + 1), f"--workers: {16 * CPUS + 1} is more than 16 for each of this "
                                             f"machine's {CPUS} CPUs (pass at most {16 * CPUS}"),
    ]
    for args, expected in cases:
        assert fails(*args, "--save_folder", out).startswith(expected), args
        assert not out.exists()
    # a removed_paths.txt whose line far down is damaged
    dedup = tmp_path / "dedup"
    shutil.copytree(pipeline["dedup"], dedup)
    lines = (dedup / "eps_0.01" / "removed_paths.txt").read_text().splitlines()
    lines[-1] = lines[-1].replace("\t", " ", 1)
    (dedup / "eps_0.01" / "removed_paths.txt").write_text("\n".join(lines) + "\n")
    line = fails(*run, "--dedup-dir", dedup, "--save_folder", out)
    assert line.startswith(f"{dedup / 'eps_0.01' / 'removed_paths.txt'}: line {len(lines)} has 2 tab-separated fields")
    assert not out.exists()
    # a dedup folder missing an eps folder its table names
    shutil.rmtree(dedup / "eps_0.01")
    assert fails(*run, "--dedup-dir", dedup, "--save_folder", out) == \
        f"--dedup-dir: {dedup} holds no eps_0.01/removed_paths.txt (pass the output folder of a completed " \
        "deduplicate.py run)"
    # a prune folder whose params.json is another script's
    other = tmp_path / "other_run"
    shutil.copytree(pipeline["run"], other)
    (other / "params.json").write_text(json.dumps({"num_clusters": 4}))
    assert fails("--prune-dir", other, "--save_folder", out).startswith(
        f"--prune-dir: {other / 'params.json'} is not prune.py's")
    assert not out.exists()
    # the clusters the run read, changed or gone since
    sorted_copy, run_copy = tmp_path / "sorted", tmp_path / "run"
    shutil.copytree(pipeline["sorted"], sorted_copy)
    shutil.copytree(pipeline["run"], run_copy)
    params = json.loads((run_copy / "params.json").read_text())
    (run_copy / "params.json").write_text(json.dumps(dict(params, sorted_clusters_path=str(sorted_copy))))
    np.save(sorted_copy / "cluster_1.npy", np.load(sorted_copy / "cluster_1.npy")[:-1])
    assert "changed since the run" in fails("--prune-dir", run_copy, "--save_folder", out)
    shutil.rmtree(sorted_copy)
    assert f"read the sorted clusters in {sorted_copy}, which no longer exists" in fails(
        "--prune-dir", run_copy, "--save_folder", out)
    assert not out.exists()


def test_a_dedup_dir_that_did_not_make_the_clustered_rows_is_refused(pipeline, tmp_path):
    """The funnel chains deduplication's counts to those of the pruned clusters: from a deduplication whose kept keys
    were not the rows clustered, it chained two unrelated runs. A copy of the right one, elsewhere, is taken."""
    other = tmp_path / "other"
    r = run_script("deduplicate.py", "--sorted_clusters_path", pipeline["root"] / "c1" / "sorted_clusters", "--eps",
                   0.3, "--save_folder", other)
    assert r.returncode == 0, r.stderr
    line = fails("--prune-dir", pipeline["run"], "--dedup-dir", other, "--save_folder", tmp_path / "r")
    subset = pipeline["dedup"] / "eps_0.001" / "kept_keys.npy"
    assert line == f"--dedup-dir: {other} did not deduplicate the rows of the pruned clusters: they were clustered " \
                   f"from {subset} (as clustering.json says), none of its eps_<e>/kept_keys.npy (pass the " \
                   "deduplicate.py --save_folder whose kept keys were clustered, or leave --dedup-dir out)"
    assert not (tmp_path / "r").exists()
    shutil.copytree(pipeline["dedup"], tmp_path / "copy")
    report(pipeline, tmp_path / "r", "--dedup-dir", tmp_path / "copy", shards=False, dedup=False)
    assert "; these rows were clustered for DBP" in (tmp_path / "r" / "index.html").read_text(encoding="utf-8")


def test_clusters_of_every_row_under_a_dedup_dir_are_said_to_be(pipeline, tmp_path):
    """Clusters made without --subset, shown under a --dedup-dir: the funnel's dedup rows did not go on to DBP."""
    save, run = tmp_path / "c", tmp_path / "run"
    shutil.copytree(pipeline["sorted"].parent, save)
    shutil.copytree(pipeline["run"], run)
    clustering = json.loads((save / "clustering.json").read_text())
    (save / "clustering.json").write_text(json.dumps(dict(clustering, subset=None)))
    params = json.loads((run / "params.json").read_text())
    (run / "params.json").write_text(json.dumps(dict(params, sorted_clusters_path=str(save / "sorted_clusters"))))
    note = "The clusters pruned hold every embedded row, not the rows deduplication kept: cluster_embeddings.py ran " \
           "without --subset"
    for dedup, said in ((True, True), (False, False)):
        out = tmp_path / f"r{dedup}"
        report(dict(pipeline, run=run), out, shards=False, dedup=dedup)
        html = (out / "index.html").read_text(encoding="utf-8")
        assert (f"<li>{note}</li>" in html) == said
        assert "these rows were clustered for DBP" not in html


def test_a_completed_report_is_refused_without_overwrite(pipeline, made, tmp_path):
    out = tmp_path / "r"
    report(pipeline, out, shards=False, dedup=False, workers=4 * CPUS + 1)  # (more than the other scripts take)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = fails("--prune-dir", pipeline["run"], "--save_folder", out)
    assert line == f"--save_folder: {out} already holds the outputs of a completed run (pass --overwrite to replace " \
                   "them, or choose another --save_folder)"
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    report(pipeline, out, "--overwrite", dedup=False)
    assert not (out / "dedup.html").exists() and (out / "report.json").is_file()
    assert any((out / "thumbs").iterdir())


def test_a_full_disk_names_the_report_folder_not_the_file_copied_into_it(pipeline, small_disk):
    """shutil names a failed copy's source first: the line blamed this project's own report.css."""
    subprocess.run(["mount", "-o", "remount,size=8k", small_disk], check=True)
    out = small_disk / "r"
    line = fails("--prune-dir", pipeline["run"], "--save_folder", out)
    assert line.startswith(f"{out}") and "No space left on device" in line, line
    assert not out.exists()


@pytest.mark.parametrize("signum,status,said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_a_stopped_report_ends_in_one_line_and_leaves_the_earlier_one(pipeline, made, tmp_path, signum, status, said):
    out = tmp_path / "r"
    report(pipeline, out, shards=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    stage = "reading shards under way"  # the first shard's thumbnails are in; the other shards' still being read
    proc = start_script(REPORT_SCRIPT, "--prune-dir", pipeline["run"], "--shards", pipeline["pattern"],
                        "--save_folder", out, "--overwrite", "--workers", 2, pause=stage)
    wait_paused(proc, stage)
    os.killpg(proc.pid, signum)  # the whole group, as a terminal or a scheduler sends it
    os.killpg(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == status and said in error_line(err)
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("workers,fault", [(1, "sigterm"), (2, "ctrl-c"), (2, "kill -9")])
def test_a_stalled_pipe_command_does_not_hold_a_report_that_is_stopped(pipeline, tmp_path, workers, fault):
    """A shard from a pipe: command that stalls (cat of a FIFO no one writes to; a download that hangs): SIGTERM to
    the run (what kill sends) or Ctrl-C (to the process group, as a terminal sends it) ends it in one line, with its
    workers and the commands they started; so does kill -9 of the run alone, without a line. Before, one task ran
    in the run's own process, whose read of the stalled stream had no safe point: the run waited for it without
    end; and later the run ended but left the command behind (its worker killed, the command ignoring Ctrl-C as
    the workers do), waiting for ever."""
    send, sig, status, message = STOPS[fault]
    with stalled_stream(tmp_path) as (shard, read_by):
        proc = start_script(REPORT_SCRIPT, "--prune-dir", pipeline["run"], "--shards", shard, "--save_folder",
                            tmp_path / "r", "--workers", workers, stderr=open(tmp_path / "err", "w"))
        try:
            read_by(proc)
            send(proc.pid, sig)
            assert proc.wait(timeout=DEADLINE) == status
            wait_until(lambda: session_is_empty(proc.pid), what="the workers and their commands to end")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    if message is None:  # (kill -9)
        assert not (tmp_path / "r" / "index.html").exists()  # (a killed run's staging may stay, for its rerun)
    else:
        assert message in error_line((tmp_path / "err").read_text())
        assert not (tmp_path / "r").exists()


# ---- the pieces, against brute force ----

def test_pick_pairs_takes_the_lowest_similarities_then_a_seeded_sample_in_any_chunking(tmp_path, monkeypatch):
    from dbpkit import report_data

    rng = np.random.default_rng(5)
    sims = np.round(rng.uniform(0.99, 1, 300), 4)  # rounded: ties among them
    path = tmp_path / "removed_paths.txt"
    path.write_text("".join(f"a{i}\tb{i}\t{s:g}\n" for i, s in enumerate(sims)))
    near, sampled = report_data.pick_pairs(str(path), 20, seed=3)
    order = sorted(range(300), key=lambda i: (sims[i], i))
    assert [p.removed for p in near] == [f"a{i}" for i in order[:10]]
    rest = {f"a{i}" for i in order[10:]}
    assert len(sampled) == 10 and {p.removed for p in sampled} <= rest
    monkeypatch.setattr(report_data, "PAIR_LINES", 7)
    assert report_data.pick_pairs(str(path), 20, seed=3) == (near, sampled)
    assert report_data.pick_pairs(str(path), 20, seed=4)[1] != sampled
    small_near, small_rest = report_data.pick_pairs(str(path), 1000, seed=3)
    assert len(small_near) == 300 and small_rest == []  # fewer lines than asked: all, lowest first


def test_choose_clusters_keeps_both_ends_and_a_seeded_middle():
    from dbpkit import report_data

    complexity = np.random.default_rng(0).permutation(50).astype(float)
    complexity[7] = np.nan
    sizes = np.full(50, 10)
    sizes[3] = 0
    shown, left_out = report_data.choose_clusters(complexity, sizes, 12, seed=1)
    valid = [j for j in np.argsort(complexity, kind="stable") if sizes[j] and not np.isnan(complexity[j])]
    assert left_out == 49 - 12 and len(shown) == len(set(shown)) == 12 and 3 not in shown
    assert shown[:3] == valid[:3] and shown[-3:] == [*valid[-2:], 7]  # NaN counts as most complex (sorted last)
    assert report_data.choose_clusters(complexity, sizes, 12, seed=1) == (shown, left_out)
    assert report_data.choose_clusters(complexity, sizes, 100, seed=1) == ([*valid, 7], 0)


# ---- in the browser ----

CHROMIUM = os.environ.get("DBP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright, why = None, "Playwright is not installed (pip install -r requirements-dev.txt)"
    else:
        why = None if CHROMIUM else "no chromium on PATH (apt-get install chromium, or set DBP_CHROMIUM)"
    if why:
        if os.environ.get("DBP_REQUIRE_BROWSER"):
            pytest.fail(f"the browser tests cannot run: {why}")
        pytest.skip(why)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


class Visit:
    """A page opened from file://, with what it did: console messages, page errors, requests, dialogs."""

    def __init__(self, browser, path):
        self.context = browser.new_context(viewport={"width": 1200, "height": 900})
        self.page = self.context.new_page()
        self.console, self.errors, self.requests, self.dialogs = [], [], [], []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(Path(path).as_uri(), wait_until="load")

    def js(self, expression: str):
        return self.page.evaluate(expression)

    def close(self):
        self.context.close()


def check_clean(visit: Visit, folder: Path, inline: bool = False) -> None:
    """No console message or error, no dialog, nothing requested from outside the report, every <img> decoded,
    no hostile script run."""
    assert visit.console == [] and visit.errors == [] and visit.dialogs == []
    inside = folder.as_uri() + "/"
    assert all(url.startswith(inside) or (inline and url.startswith("data:")) for url in visit.requests), \
        [u[:100] for u in visit.requests if not u.startswith(inside)]
    assert visit.js("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert visit.js("document.querySelectorAll('img:not([data-role]):not(.plot)').length") == 0
    assert visit.js("window.pwned") is None


def test_every_page_loads_clean_from_file_urls(browser, made):
    out, _ = made
    pages = [out / "index.html", out / "dedup.html", *sorted((out / "clusters").iterdir())]
    for page in pages:
        visit = Visit(browser, page)
        check_clean(visit, out)
        assert visit.js("document.querySelectorAll('img[data-role]').length") == len(marked(page).thumbs) > 0
        visit.close()


def test_a_thumbnail_shows_its_own_image(browser, pipeline, made):
    """The rendered thumbnail's mean colour is its source image's (and closer to it than to any other shown)."""
    from PIL import Image

    out, _ = made
    sources = {}
    for path in pipeline["shards"]:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext in ("jpg", "png", "webp") and key != "broken":
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    sources[key] = np.asarray(image, np.float64).mean(axis=(0, 1))
    visit = Visit(browser, out / "clusters" / "cluster_0.html")
    images = visit.page.locator("img[data-role]")
    shown = [images.nth(i).get_attribute("data-key") for i in range(images.count())]
    for i, key in enumerate(shown):
        element = images.nth(i)
        # shown at its natural size with no border or letterbox, so the screenshot is the picture alone
        element.evaluate("i => Object.assign(i.style, {width: i.naturalWidth + 'px', height: i.naturalHeight + 'px',"
                         " border: '0', padding: '0', objectFit: 'fill'})")
        rendered = np.asarray(Image.open(io.BytesIO(element.screenshot())).convert("RGB"), np.float64).mean(axis=(0, 1))
        distance = {other: np.abs(rendered - sources[other]).max() for other in set(shown)}
        assert distance[key] < 6, (key, rendered, sources[key])
        assert min(distance, key=distance.get) == key or distance[key] == min(distance.values())
    visit.close()


def test_clicking_a_header_sorts_the_clusters_table(browser, pipeline, made):
    out, _ = made
    stats = prune_stats(pipeline["run"])
    visit = Visit(browser, out / "index.html")
    ids = "Array.from(document.querySelectorAll('#clusters tbody tr')).map(r => r.cells[0].dataset.value)"
    header = visit.page.locator("#clusters th", has_text="d_intra")
    assert visit.js("Array.from(document.querySelectorAll('#clusters th')).map(h => h.textContent)") == \
        list(stats[0].keys())
    header.click()
    by_dintra = [s["cluster_id"] for s in sorted(stats, key=lambda s: float(s["d_intra"]))]
    assert visit.js(ids) == by_dintra
    header.click()
    assert visit.js(ids) == by_dintra[::-1]
    visit.page.locator("#clusters th", has_text="quota").click()
    quotas = "Array.from(document.querySelectorAll('#clusters tbody tr')).map(r => Number(r.cells[7].dataset.value))"
    assert visit.js(quotas) == sorted(int(s["quota"]) for s in stats)
    check_clean(visit, out)
    visit.close()


def test_hostile_keys_captions_and_urls_show_as_text_and_run_nothing(browser, pipeline, everyone):
    shown_keys, texts = set(), ""
    for page in [everyone / "index.html", everyone / "dedup.html", *sorted((everyone / "clusters").iterdir())]:
        visit = Visit(browser, page)
        visit.page.mouse.move(300, 300)  # (would fire an injected onmouseover under it)
        check_clean(visit, everyone)
        shown_keys |= set(visit.js("Array.from(document.querySelectorAll('[data-key]')).map(e => e.dataset.key)"))
        texts += visit.js("document.body.innerText")
        hrefs = visit.js("Array.from(document.querySelectorAll('a')).map(a => a.getAttribute('href'))")
        assert not [h for h in hrefs if ":" in h and not h.startswith(("https://", "http://"))]
        assert visit.js("document.querySelectorAll('script').length") == 1
        visit.close()
    assert set(HOSTILE_KEYS) <= shown_keys
    for text in (*HOSTILE_KEYS, *HOSTILE_CAPTIONS, *HOSTILE_URLS):
        assert text in texts


def test_inline_is_one_file_with_the_same_content(browser, pipeline, made, tmp_path):
    out, _ = made
    report(pipeline, tmp_path / "inline", "--inline")
    assert sorted(p.name for p in (tmp_path / "inline").iterdir()) == ["index.html", "report.json"]
    inline = marked(tmp_path / "inline" / "index.html")
    pages = [out / "index.html", *sorted((out / "clusters").iterdir(), key=lambda p: int(p.stem.split("_")[1])),
             out / "dedup.html"]
    split = [t for page in pages for t in marked(page).thumbs]
    contract = ("data-key", "data-role", "data-cluster", "data-missing")
    assert [{a: t.get(a) for a in contract} for t in inline.thumbs] == [{a: t.get(a) for a in contract} for t in split]
    assert [(p["similarity"], p["eps"]) for p in inline.pairs] == [(p["similarity"], p["eps"])
                                                                   for p in marked(out / "dedup.html").pairs]
    visit = Visit(browser, tmp_path / "inline" / "index.html")
    check_clean(visit, tmp_path / "inline", inline=True)
    assert visit.js("Array.from(document.images).every(i => i.src.startsWith('data:'))")
    visit.page.locator("#clusters th", has_text="size").click()  # the inline script runs (its hash is allowed)
    sizes = visit.js("Array.from(document.querySelectorAll('#clusters tbody tr'))"
                     ".map(r => Number(r.cells[1].dataset.value))")
    assert sizes == sorted(sizes)
    visit.close()


def test_the_readme_screenshot_is_made_by_readme_figures(browser, made, tmp_path):
    """examples/readme_figures.py takes the README's screenshot of a report (here the test's own)."""
    import subprocess

    from PIL import Image

    png = tmp_path / "report.png"
    path = os.path.dirname(CHROMIUM) + os.pathsep + os.environ.get("PATH", "")  # (it finds chromium on PATH)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "readme_figures.py"), "--report", made[0],
                        "--screenshot", png], capture_output=True, text=True, env={**os.environ, "PATH": path})
    assert r.returncode == 0, r.stderr
    import readme_figures

    assert Image.open(png).size == readme_figures.SCREENSHOT_SIZE
    # the strips of the most complex cluster are in the picture: its first row holds both borders' colours
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    assert ((np.abs(pixels - (0xc0, 0x39, 0x2b)).max(axis=1) < 8).any() and
            (np.abs(pixels - (0x2a, 0x8f, 0x3c)).max(axis=1) < 8).any())  # report.css: pruned red, kept green
    readme = Path(ROOT, "README.md").read_text(encoding="utf-8")
    assert "](examples/report.png)" in readme
    assert Image.open(os.path.join(ROOT, "examples", "report.png")).size == readme_figures.SCREENSHOT_SIZE
