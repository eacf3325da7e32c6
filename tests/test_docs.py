"""The docs stay true: the config reference (docs/config.md) lists every key of the schema with the
code's default and choices, the README stays a front page, and every relative link resolves."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from archirf.config import MODEL_DEFAULTS, Config

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT_BYTES = 15 * 1024


def schema(cls=Config, prefix=""):
    """{dotted key: (type, default)} of every leaf field of the config dataclasses. A model.* key's
    default is the one it takes when neither the config nor a preset sets it (MODEL_DEFAULTS)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(schema(type(default), f"{prefix}{f.name}."))
        elif prefix == "model." and f.name in MODEL_DEFAULTS:
            hint = [a for a in typing.get_args(hints[f.name]) if a is not type(None)][0]  # Optional[X] -> X
            out[prefix + f.name] = (hint, MODEL_DEFAULTS[f.name])
        else:
            out[prefix + f.name] = (hints[f.name], default)
    return out


def reference_rows() -> dict[str, tuple[str, str]]:
    """{key: (type cell, default cell)} of the table in docs/config.md."""
    rows = {}
    for line in (ROOT / "docs" / "config.md").read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and re.fullmatch(r"`[a-z][a-z0-9_.]*`", cells[0]):
            key = cells[0].strip("`")
            assert key not in rows, f"docs/config.md lists {key} twice"
            rows[key] = (cells[1].replace("\\|", "|"), cells[2].strip("`"))
    return rows


def parse_default(cell: str, default):
    """The table's spelling of a default (`160_000`, `null`, `True`, `[1, 2]`) as a value like `default`."""
    if cell == "null":
        return None
    if isinstance(default, bool):
        return {"true": True, "false": False}.get(cell.lower(), cell)
    if isinstance(default, (int, float)):
        return type(default)(float(cell.replace("_", "")))
    if isinstance(default, list):
        return yaml.safe_load(cell)
    return cell


def test_config_reference_lists_every_key_once_and_nothing_else():
    documented, code = set(reference_rows()), set(schema())
    assert not code - documented, f"docs/config.md lacks {sorted(code - documented)}"
    assert not documented - code, f"docs/config.md lists keys the config does not have: {sorted(documented - code)}"


@pytest.mark.parametrize("key", sorted(schema()))
def test_config_reference_default_and_choices_are_the_codes(key):
    hint, default = schema()[key]
    type_cell, default_cell = reference_rows()[key]
    assert parse_default(default_cell, default) == default, (
        f"docs/config.md: {key} default `{default_cell}`, the code's is {default!r}")
    if typing.get_origin(hint) is typing.Literal:
        choices = [c.strip() for c in type_cell.split("|")]
        assert choices == list(typing.get_args(hint)), f"docs/config.md: {key} choices {choices}, code {typing.get_args(hint)}"


def test_readme_is_a_front_page():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes; move detail to docs/*.md (limit {README_LIMIT_BYTES})"


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+://", target):
            yield target


@pytest.mark.parametrize("page", ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_resolve(page):
    source = ROOT / page
    for target in links(source):
        path, _, anchor = target.partition("#")
        dest = (source.parent / path).resolve() if path else source
        assert dest.is_file(), f"{page}: link {target} names no file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", dest.read_text(), flags=re.S), re.M)
            assert anchor in {slug(h) for h in headings}, f"{page}: link {target}: no such heading"


def test_readme_links_every_docs_page():
    linked = {Path(t.partition("#")[0]).name for t in links(ROOT / "README.md") if t.startswith("docs/")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert not pages - linked, f"README.md does not link {sorted(pages - linked)}"


def test_readme_recipe_table_lists_every_recipe():
    listed = re.findall(r"^\| `(configs/[\w.]+\.yaml)` \|", (ROOT / "README.md").read_text(), re.M)
    shipped = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml"))
    assert sorted(listed) == shipped, f"README recipes {sorted(listed)} vs configs/ {shipped}"


def test_models_page_lists_the_keys_each_family_reads():
    from archirf.families import FAMILY_KEYS

    text = (ROOT / "docs" / "models.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (`.+`) \|$", text, re.M))
    assert set(rows) == set(FAMILY_KEYS), f"docs/models.md families {sorted(rows)} vs {sorted(FAMILY_KEYS)}"
    for name, keys in FAMILY_KEYS.items():
        assert re.findall(r"`(\w+)`", rows[name]) == list(keys), f"docs/models.md: the keys {name} reads"
