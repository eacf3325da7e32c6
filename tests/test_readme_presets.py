"""The model preset tables of docs/models.md (DiT, MMDiT, ADM UNet, EDM2 UNet) against the code: every
preset has a row, every row names a preset, and each row's shape columns, parameter count and G MACs per
image are what the preset builds at the input the page states, to the precision the table prints.
Built on the meta device: no memory, no init."""

import functools
import re
from pathlib import Path

import pytest
import torch

from archirf.config import Config, DataConfig, ModelConfig
from archirf.models import ADM_PRESETS, DIT_PRESETS, EDM2_PRESETS, MMDIT_PRESETS, build_model

MODELS = Path(__file__).resolve().parents[1] / "docs" / "models.md"

# Per section: the model name, its presets, the input the section's prose states (checked to be
# there, line breaks aside, so that a change of it fails here first), how the shape columns map to preset
# keys, and the builds behind the number columns (column -> (resolution, channels, num_classes)). All at
# 1000 classes without register tokens, as the Models section says above the tables.
INTRO = "G MACs per image at the stated input, 1000 classes, no register tokens"
TABLES = {
    "DiT": dict(name="dit", presets=DIT_PRESETS, stated="For 32×32×4 latents (256² images):",
                shape={"width": "hidden_size", "depth": "depth", "heads": "num_heads", "patch": "patch_size"},
                builds={"params": (32, 4, 1000), "G MACs / image": (32, 4, 1000)}),
    "MMDiT": dict(name="mmdit", presets=MMDIT_PRESETS,
                  stated="For 32×32×4 latents (256² images) with 4 label tokens:",
                  shape={"width": "hidden_size", "double": "depth", "single": "depth_single_blocks",
                         "heads": "num_heads", "patch": "patch_size"},
                  builds={"params": (32, 4, 1000), "G MACs / image": (32, 4, 1000)}),
    "ADM UNet": dict(name="adm_unet", presets=ADM_PRESETS, stated="",   # each row states its input
                     shape={"channels": "channels", "channel_mult": "channel_mult", "res blocks": "num_res_blocks",
                            "attention at": "attn_resolutions"},
                     builds={"params": "input", "G MACs / image": "input"}),
    "EDM2 UNet": dict(name="edm2_unet", presets=EDM2_PRESETS,
                      stated="parameters and forward multiply-adds per image at 64×64×4 latents "
                             "(and 64×64×3 pixels), 1000 classes:",
                      shape={"channels": "channels", "dropout": "dropout"},
                      builds={"params": (64, 4, 1000), "G MACs / image (latents)": (64, 4, 1000),
                              "(pixels)": (64, 3, 1000)}),
}


def models_section() -> str:
    return MODELS.read_text()


def section(title: str) -> str:
    """The text of `## title` in docs/models.md, up to the next heading."""
    return re.split(r"\n## ", models_section().split(f"\n## {title}\n", 1)[1], maxsplit=1)[0]


def table(text: str) -> list[dict[str, str]]:
    """The one preset table of a section: a dict per row, keyed by the header cells."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines and lines[0].startswith("| preset |"), "no '| preset |' table"
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    assert all(len(r) == len(header) for r in rows), "a row has more or fewer cells than the header"
    return [dict(zip(header, r)) for r in rows]


@functools.cache
def build(name: str, preset: str, resolution: int, channels: int, num_classes: int):
    extra = {"dit": dict(num_register_tokens=0), "mmdit": dict(num_register_tokens=0, label_tokens=4)}.get(name, {})
    cfg = Config(model=ModelConfig(name=name, preset=preset, **extra),
                 data=DataConfig(resolution=resolution, channels=channels, num_classes=num_classes))
    with torch.device("meta"):
        return build_model(cfg)


def assert_printed(printed: str, value: float, what: str) -> None:
    """`value` rounds to `printed` (a number with d decimals): within half a unit of its last digit."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    assert abs(value - float(printed)) <= 0.5 * 10 ** -decimals + 1e-9, f"{what}: docs {printed}, code {value:.4f}"


def cases():
    for title in TABLES:
        for row in table(section(title)):
            yield pytest.param(title, row, id=row["preset"].split()[0])


def test_every_preset_has_one_row():
    assert INTRO in " ".join(models_section().split()), "docs/models.md: the tables' stated setting changed"
    for title, spec in TABLES.items():
        text = section(title)
        assert spec["stated"] in " ".join(text.split()), f"docs/models.md {title}: the stated input changed; update TABLES"
        names = [row["preset"].split()[0] for row in table(text)]   # "ADM-64 (ADM's ImageNet-64 model ...)"
        assert sorted(names) == sorted(spec["presets"]), f"docs/models.md {title} table rows vs presets in the code"


@pytest.mark.parametrize("title,row", list(cases()))
def test_row_matches_the_code(title, row):
    spec = TABLES[title]
    preset = row["preset"].split()[0]
    shape = spec["presets"][preset]
    for column, key in spec["shape"].items():
        value = shape[key]
        expected = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        assert row[column] == expected, f"{preset} {column}: docs {row[column]}, code {expected}"
    for column, inputs in spec["builds"].items():
        if inputs == "input":                                  # "32×32×3": side, side, channels
            side, side2, channels = map(int, row["input"].split("×"))
            assert side == side2, row["input"]
            inputs = (side, channels, 1000)
        model = build(spec["name"], preset, *inputs)
        if column == "params":
            # "57.6M (57.1M with 10 classes)": the first at 1000 classes, the bracket at its own count
            m = re.fullmatch(r"([\d.]+)M(?: \(([\d.]+)M with (\d+) classes\))?", row[column])
            assert m, f"{preset}: cannot read params '{row[column]}'"
            assert_printed(m[1], model.num_params() / 1e6, f"{preset} params (M)")
            if m[2]:
                other = build(spec["name"], preset, inputs[0], inputs[1], int(m[3]))
                assert_printed(m[2], other.num_params() / 1e6, f"{preset} params with {m[3]} classes (M)")
        else:
            assert re.fullmatch(r"[\d.]+", row[column]), f"{preset}: cannot read G MACs '{row[column]}'"
            assert_printed(row[column], model.flops_per_image() / 1e9, f"{preset} {column}")


def test_mmdit_notes_under_the_table():
    # The two sentences under the MMDiT table quote sizes at other inputs: MMDiT-S/2 as its recipe runs it
    # (32×32×3, 10 classes, 4 label tokens; with and without 4 registers) and MMDiT-XL/2 against DiT-XL/2.
    text = " ".join(section("MMDiT").split())
    m = re.search(r"MMDiT-S/2 on 32×32×3 pixels with 10 classes \(its recipe\) is ([\d.]+)M parameters and "
                  r"([\d.]+) G MACs per image \(([\d.]+) with the recipe's 4 registers\)", text)
    assert m, "docs/models.md MMDiT: the MMDiT-S/2 sentence changed; update this test"
    small = build("mmdit", "MMDiT-S/2", 32, 3, 10)
    assert_printed(m[1], small.num_params() / 1e6, "MMDiT-S/2, 10 classes: params (M)")
    assert_printed(m[2], small.flops_per_image() / 1e9, "MMDiT-S/2, 10 classes: G MACs")
    cfg = Config(model=ModelConfig(name="mmdit", preset="MMDiT-S/2", num_register_tokens=4, label_tokens=4),
                 data=DataConfig(resolution=32, channels=3, num_classes=10))
    with torch.device("meta"):
        assert_printed(m[3], build_model(cfg).flops_per_image() / 1e9, "MMDiT-S/2 with 4 registers: G MACs")
    m = re.search(r"MMDiT-XL/2 costs about what DiT-XL/2 costs per image \(([\d.]+) vs ([\d.]+) G MACs\)", text)
    assert m, "docs/models.md MMDiT: the MMDiT-XL/2 sentence changed; update this test"
    assert_printed(m[1], build("mmdit", "MMDiT-XL/2", 32, 4, 1000).flops_per_image() / 1e9, "MMDiT-XL/2 G MACs")
    assert_printed(m[2], build("dit", "DiT-XL/2", 32, 4, 1000).flops_per_image() / 1e9, "DiT-XL/2 G MACs")
