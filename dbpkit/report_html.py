"""make_report.py's pages: jinja2 templates (autoescaped: keys, captions and urls come from the web) rendered
into static files that open from file:// with no server and no network.

Each page carries a Content-Security-Policy that lets in only the report's own script, style and images:
its files (`'self'`), or, for `--inline`, exactly the inline script and style (by their sha256) and data:
images. A url becomes a link only when it is http(s); anything else is shown as text.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import jinja2

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report_templates")
SCRIPT_FILE, STYLE_FILE = "report.js", "report.css"
INDEX_PAGE, DEDUP_PAGE, CLUSTERS_DIR = "index.html", "dedup.html", "clusters"
FILES_CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'"
CAPTION_CHARS = 200  # of a caption shown under a thumbnail (the full text is its tooltip)


@dataclass
class Thumb:
    """A thumbnail as a page shows it."""

    key: str
    role: str  # kept, pruned, removed, duplicate-of
    cluster: int | None = None
    note: str = ""  # its distance to the centroid
    caption: str | None = None
    url: str | None = None
    image: str | None = None  # the thumbnail's file name under thumbs/
    missing: str | None = None  # why there is no image

    @property
    def link(self) -> str | None:
        """The url, when it may be a link: http(s) only (never javascript:, data: or a file)."""
        return self.url if self.url and urlsplit(self.url).scheme.lower() in ("http", "https") else None

    @property
    def short_caption(self) -> str:
        text = self.caption or ""
        return text if len(text) <= CAPTION_CHARS else text[:CAPTION_CHARS - 1] + "…"


def cluster_page(j: int) -> str:
    return f"{CLUSTERS_DIR}/cluster_{j}.html"


@dataclass
class Site:
    """Where a page finds what it links to: files beside it, or (inline) everything in one page."""

    inline: bool
    thumbs: str  # the folder holding the thumbnails (read back for --inline)
    pages: set[int] = field(default_factory=set)  # clusters that have a page
    has_dedup: bool = False

    def src(self, root: str, name: str) -> str:
        if not self.inline:
            return f"{root}thumbs/{name}"
        return data_uri(os.path.join(self.thumbs, name), "image/jpeg")

    def figure(self, root: str, path: str) -> str:
        return data_uri(path, "image/png") if self.inline else f"{root}{os.path.basename(path)}"

    def cluster_link(self, root: str, j: int) -> str | None:
        if j not in self.pages:
            return None
        return f"#cluster-{j}" if self.inline else f"{root}{cluster_page(j)}"

    def dedup_link(self, root: str) -> str:
        return "#dedup" if self.inline else f"{root}{DEDUP_PAGE}"

    def index_link(self, root: str) -> str:
        return "#top" if self.inline else f"{root}{INDEX_PAGE}"


def data_uri(path: str, mime: str) -> str:
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode("ascii")


def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def asset(name: str) -> str:
    with open(os.path.join(TEMPLATES, name), encoding="utf-8") as f:
        return f.read()


def render(env: jinja2.Environment, site: Site, title: str, root: str, sections: list[dict]) -> str:
    """A page: its sections (each a dict naming its `template` and what that template reads)."""
    script, style = asset(SCRIPT_FILE), asset(STYLE_FILE)
    csp = (f"default-src 'none'; script-src {sha256_source(script)}; style-src {sha256_source(style)}; "
           "img-src data:") if site.inline else FILES_CSP
    return env.get_template("page.html").render(title=title, root=root, csp=csp, site=site, sections=sections,
                                                inline=site.inline, script=script, style=style,
                                                script_file=SCRIPT_FILE, style_file=STYLE_FILE)


def write_page(path: str, html: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(html)


def copy_assets(folder: str) -> None:
    for name in (SCRIPT_FILE, STYLE_FILE):
        shutil.copyfile(os.path.join(TEMPLATES, name), os.path.join(folder, name))


def write_report(folder: str, site: Site, index: dict, clusters: list[dict], dedup: dict | None) -> None:
    """Write the pages into `folder`: index.html, a page per shown cluster and dedup.html, with the script and
    style files; or, inline, everything in index.html."""
    env = environment()
    index_section = dict(index, template="index.html")
    cluster_sections = [dict(c, template="cluster.html") for c in clusters]
    dedup_sections = [dict(dedup, template="dedup.html")] if dedup else []
    if site.inline:
        sections = [index_section, *cluster_sections, *dedup_sections]
        write_page(os.path.join(folder, INDEX_PAGE), render(env, site, index["title"], "", sections))
        return
    copy_assets(folder)
    write_page(os.path.join(folder, INDEX_PAGE), render(env, site, index["title"], "", [index_section]))
    for section in cluster_sections:
        write_page(os.path.join(folder, cluster_page(section["view"].cluster_id)),
                   render(env, site, f"cluster {section['view'].cluster_id}", "../", [section]))
    if dedup_sections:
        write_page(os.path.join(folder, DEDUP_PAGE), render(env, site, "deduplication", "", dedup_sections))
