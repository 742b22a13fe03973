"""The checkout installs as a package: dbp_utils imports from anywhere, the scripts run as commands."""

import os
import shutil
import subprocess
import sys

from conftest import ROOT

import dbpkit

COMMANDS = ("dbp-cluster", "dbp-dintra", "dbp-dinter", "dbp-prune", "dbp-dedup", "dbp-embed", "dbp-report")


def test_pip_install_gives_the_module_and_the_commands(tmp_path, desc_str):
    source = tmp_path / "source"  # a copy, so that the build leaves the checkout alone
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".ci", "tests", "benchmarks", "examples",
                                                                "__pycache__", "build", "*.egg-info"))
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", site, source], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    elsewhere = tmp_path / "training_code"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", "import dbp_utils; print(dbp_utils.__version__, dbp_utils.__file__)"],
                       capture_output=True, text=True, cwd=elsewhere, env=env)
    assert r.returncode == 0 and r.stdout.split() == [dbpkit.__version__, str(site / "dbp_utils.py")], r.stderr
    templates = {p.name for p in (site / "dbpkit" / "report_templates").iterdir()}
    assert templates == {p.name for p in (source / "dbpkit" / "report_templates").iterdir()}  # the report's, shipped
    for command in COMMANDS:
        r = subprocess.run([site / "bin" / command, "--version"], capture_output=True, text=True, env=env)
        assert r.returncode == 0 and r.stdout.split()[-1] == dbpkit.__version__, r.stderr
    r = subprocess.run([site / "bin" / "dbp-dintra", "--sorted_clusters_path", desc_str["sorted"],
                        "--avg_distance_to_cent_save_path", elsewhere / "dintra.npy"], capture_output=True, text=True,
                       cwd=elsewhere, env=env)
    assert r.returncode == 0 and "d_intra of" in r.stdout, r.stderr
