"""The README's figures, from a run of the demo: the temperature table (docs/scripts.md, "Choosing the temperature")
and the picture at the top of the README (the run's quotas.png). A test checks the table in the docs against what
this script computes from the demo's run, so the figures cannot go stale.

Reads RUN (a prune.py --save-dir: cluster_stats.csv and params.json); prints the table in Markdown; with
--picture, copies RUN/quotas.png there. With --report and --screenshot, the README's screenshot of a
make_report.py report (the images demo's), taken in Debian's chromium through Playwright (requirements-dev.txt).

    DEMO_ROWS=5000 bash examples/demo.sh /tmp/demo
    python examples/readme_figures.py --run /tmp/demo/run --picture examples/quotas.png
    bash examples/images_demo.sh /tmp/images_demo
    python examples/readme_figures.py --report /tmp/images_demo/report --screenshot examples/report.png
"""

import argparse
import json
import os
import shutil
import sys

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dbp_utils as du  # noqa: E402

TEMPERATURES = (1.0, 0.5, 0.25, 0.1, 0.05)  # the paper's default, 0.5, and around it


def temperature_table(run: str) -> list[str]:
    """The Markdown lines of the table: per T, the largest / smallest share, the quotas' range and the clusters
    kept whole, as prune.py would give them at that T."""
    stats = pd.read_csv(os.path.join(run, du.STATS_FILE))
    with open(os.path.join(run, du.PARAMS_FILE)) as f:
        params = json.load(f)
    sizes, complexity = stats["size"].to_numpy(), stats["complexity"].to_numpy()
    target = params["target_size"]
    held = complexity[sizes > 0]
    lines = [f"On the demo data (`DEMO_ROWS=5000`: C from {held.min():.3f} to {held.max():.3f}, keep "
             f"{params['prune_ratio']:g}, default `--cls-bal-ratio`):", "",
             "| T | P largest / smallest | quotas N_j, smallest .. largest | clusters kept whole |",
             "| --- | --- | --- | --- |"]
    for t in TEMPERATURES:
        probs = du.cluster_probabilities(params["density"], complexity, t)
        quotas = du.solve_quotas(probs, sizes, target, params["cls_bal_ratio"]).quotas
        whole = int(((quotas == sizes) & (sizes > 0)).sum())
        name = f"{t:g} (default)" if t == 0.5 else f"{t:g}"
        lines.append(f"| {name} | {du.p_ratio(probs, sizes):.3g}x | {quotas.min()} .. {quotas.max()} | {whole} |")
    return lines


SCREENSHOT_SIZE = (1200, 1000)  # pixels: the index page from its strips of the most complex clusters


def report_screenshot(report: str, png: str, chromium: str | None = None) -> None:
    """A screenshot of REPORT/index.html as Chromium renders it from file://: the most complex clusters' strips."""
    from pathlib import Path

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium or shutil.which("chromium"))
        width, height = SCREENSHOT_SIZE
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(Path(report, "index.html").resolve().as_uri(), wait_until="load")
        top = page.locator("h2", has_text="most complex").bounding_box()["y"]  # the strips, below the plots
        page.screenshot(path=png, full_page=True, clip={"x": 0, "y": top, "width": width, "height": height})
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="the demo's prune.py --save-dir")
    parser.add_argument("--report", help="a make_report.py report (the images demo's) to take the screenshot of")
    parser.add_argument("--screenshot", help="with --report: the PNG to write")
    parser.add_argument("--picture", help="copy the run's quotas.png here (the README's picture)")
    args = parser.parse_args()
    if not args.run and not (args.report and args.screenshot):
        parser.error("pass --run, or --report with --screenshot")
    if args.run:
        print("\n".join(temperature_table(args.run)))
    if args.run and args.picture:
        shutil.copyfile(os.path.join(args.run, du.PLOT_FILE), args.picture)
        print(f"{os.path.join(args.run, du.PLOT_FILE)} -> {args.picture}", file=sys.stderr)
    if args.report and args.screenshot:
        report_screenshot(args.report, args.screenshot)
        print(f"{args.report}/index.html -> {args.screenshot}", file=sys.stderr)


if __name__ == "__main__":
    main()
