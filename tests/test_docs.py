"""Every relative link in README.md and docs/*.md resolves: the file exists and a `#anchor` names a heading.

Anchors are computed as GitHub renders headings, so a link that works here works on the repository's page.
Pure file reads: no network, no markdown library.
"""
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (fenced lines become empty, so line numbers stay)."""
    out, fence = [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            fence = not fence
            out.append("")
        else:
            out.append("" if fence else line)
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lower-cased, punctuation dropped, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps only its text
    text = re.sub(r"[`*~]|<[^>]+>", "", text)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a markdown file's headings, repeats numbered -1, -2, ... as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(root: Path) -> list[str]:
    """`file:line: target (why)` for each relative link of root's README.md and docs/*.md that does not resolve."""
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        lines = _prose_lines(page.read_text(encoding="utf-8"))
        # inline code is not a link; a link's text may wrap onto the next line
        text = re.sub(r"`[^`\n]*`", lambda m: " " * len(m.group(0)), "\n".join(lines))
        for m in _LINK.finditer(text):
            target = m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            line = text.count("\n", 0, m.start()) + 1
            where = f"{page.relative_to(root)}:{line}: {target}"
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where} (no heading with this anchor in {dest.name})")
    return broken


def test_every_relative_link_resolves():
    assert (REPO / "docs").is_dir()
    assert broken_links(REPO) == []


def test_slugs_as_github_renders_them():
    # expected values written by hand from GitHub's rendering of such headings
    assert github_slug("Supervised fine-tuning (SFT)") == "supervised-fine-tuning-sft"
    assert github_slug("Data: corpora to shards") == "data-corpora-to-shards"
    assert github_slug("`megatron-qwen run` and torchrun") == "megatron-qwen-run-and-torchrun"
    assert github_slug("FP8 / GPU benchmark") == "fp8--gpu-benchmark"
    assert github_slug("keep_last and [links](x.md)") == "keep_last-and-links"


def test_planted_broken_links_are_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# Top\n\n[ok](docs/a.md), [ok too](docs/a.md#two-words), [web](https://example.org/x)\n"
        "[missing file](docs/nope.md)\n"
        "```\n[in code](docs/nope.md)\n```\n`[inline](docs/nope.md)`\n")
    (tmp_path / "docs" / "a.md").write_text(
        "# A\n\n## Two words\n\n## Two words\n\n[back](../README.md#top), [dup](#two-words-1),\n"
        "[wrapped\nlink](#no-such-heading), [self](#a)\n")
    assert broken_links(tmp_path) == [
        "README.md:4: docs/nope.md (no such file)",
        "docs/a.md:8: #no-such-heading (no heading with this anchor in a.md)",
    ]


def _packages(root: Path) -> set[str]:
    """The top-level packages (`name/`) and modules (`name.py`) of megatron_qwen."""
    pkg = root / "megatron_qwen"
    dirs = {f"{p.name}/" for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    mods = {p.name for p in pkg.glob("*.py") if not p.name.startswith("_")}
    return dirs | mods


def test_architecture_page_follows_the_import_layers_and_names_every_package():
    page = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    # the layer table, top to bottom, as the import-linter contract lists them: | N | packages (a \| b) | ... |
    layer_rows = [re.split(r"(?<!\\)\|", line.strip().strip("|")) for line in page.split("\n")
                  if re.match(r"^\| \d+ \|", line)]
    on_page = [sorted(re.findall(r"`([a-z_]+)(?:/|\.py)`", cells[1])) for cells in layer_rows]
    with open(REPO / "pyproject.toml", "rb") as f:
        contract = tomllib.load(f)["tool"]["importlinter"]["contracts"][0]
    in_contract = [sorted(re.findall(r"megatron_qwen\.(\w+)", layer)) for layer in contract["layers"]]
    assert on_page == in_contract
    # and every package and module has its own row in the table of what each owns
    owned = set(re.findall(r"^\| `([a-z_]+(?:/|\.py))` \|", page, re.MULTILINE))
    assert _packages(REPO) - owned == set()
