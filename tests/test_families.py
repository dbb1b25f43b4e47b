"""The family layer is the only place that knows which family is which: code outside
``pipeline/families/`` asks a family (a method or a declared capability) and never compares
family names; every family answers the whole interface; a family is its module plus its presets."""

from __future__ import annotations

import ast
import pkgutil
from types import SimpleNamespace

import pytest

import pipeline.families
import pipeline.flops
from conftest import REPO
from pipeline.families import CAPABILITIES, DEFAULT_FAMILY, FAMILIES, Family, UnknownFamilyError, family_named
from pipeline.presets import PRESETS, SIZED_PRESETS, sized_preset_from_dict

# Every spelling of a family's identity: its short name and its transformers model_type.
IDS = {s for f in FAMILIES.values() for s in (f.name, f.model_type)}
CONSTANTS = {"LLAVA_NEXT", "LLAVA_ONEVISION"}
IDENTITY_ATTRS = {"name", "model_type", "label"}


def _mentions_family(node: ast.AST) -> bool:
    return "family" in ast.unparse(node).lower()


def family_compares(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, why) of every place ``tree`` tells families apart by identity:

    - the ``LLAVA_NEXT`` / ``LLAVA_ONEVISION`` constants, imported or named at all;
    - a string equal to a family's name or model_type ("llava-next", "llava_onevision"), anywhere
      (a comparison, a ``.get`` default, an argument default, a dict key) except where a preset class
      declares the family it builds (``model_type = "llava_next"`` in a class body); help texts and
      hub ids (``llava-hf/llava-onevision-qwen2-7b-ov-hf``) are not equal to one and pass;
    - a comparison of a family's ``.name`` / ``.model_type`` / ``.label``, and an ``is`` test of a
      family against anything but None.
    """
    declared: set[int] = set()
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for stmt in cls.body:
            if isinstance(stmt, ast.Assign) and [getattr(t, "id", None) for t in stmt.targets] == ["model_type"]:
                declared.add(id(stmt.value))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in CONSTANTS:
            bad.append((node.lineno, f"names {node.id}"))
        elif isinstance(node, ast.Attribute) and node.attr in CONSTANTS:
            bad.append((node.lineno, f"names {node.attr}"))
        elif isinstance(node, ast.ImportFrom) and CONSTANTS & {a.name for a in node.names}:
            bad.append((node.lineno, "imports a family constant"))
        elif isinstance(node, ast.Constant) and node.value in IDS and id(node) not in declared:
            bad.append((node.lineno, f"spells out the family {node.value!r}"))
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, (a, b) in zip(node.ops, zip(operands, operands[1:])):
                for x, y in ((a, b), (b, a)):
                    if isinstance(x, ast.Attribute) and x.attr in IDENTITY_ATTRS and _mentions_family(x.value):
                        bad.append((node.lineno, f"compares {ast.unparse(x)}"))
                    elif isinstance(op, (ast.Is, ast.IsNot)) and _mentions_family(x) and \
                            not (isinstance(y, ast.Constant) and y.value is None):
                        bad.append((node.lineno, f"tests {ast.unparse(node)}"))
    return sorted(set(bad))


def _sources():
    for pkg in ("pipeline", "storage", "flows"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO)
            if rel.parts[:2] == ("pipeline", "families") or path.name.startswith("test_"):
                continue
            yield rel, path


def test_no_code_outside_the_families_compares_family_names():
    found = [f"{rel}:{line} {why}" for rel, path in _sources()
             for line, why in family_compares(ast.parse(path.read_text(), str(rel)))]
    assert not found, "ask the family (a method or a capability) instead:\n" + "\n".join(found)


@pytest.mark.parametrize("code, flagged", [
    ('one_view = family_of(model).name == "llava-onevision"', True),
    ("x = None if family is LLAVA_NEXT else processor", True),
    ("from pipeline.families import LLAVA_ONEVISION", True),
    ("ov = preset.family is other", True),
    ('if facts.get("family") != "llava-onevision": pass', True),
    ('name = d.get("family", "llava-next")', True),
    ('def f(family="llava_next"): pass', True),
    ("same = family.model_type == other", True),
    ("if family is None: pass", False),
    ('if expect_family is not None and family != expect_family: pass', False),
    ('help = "e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf"', False),
    ('class P:\n    model_type = "llava_onevision"', False),
    ("one_view = not family_of(model).multi_image_anyres", False),
])
def test_the_scan_flags_comparisons_and_passes_declarations_and_help_texts(code, flagged):
    assert bool(family_compares(ast.parse(code))) is flagged


def test_families_are_discovered_from_their_modules():
    modules = {m.name for m in pkgutil.iter_modules(pipeline.families.__path__)
               if m.name != "base" and not m.name.startswith("_")}
    assert {type(f).__module__.rsplit(".", 1)[1] for f in FAMILIES.values()} == modules
    assert all(model_type == f.model_type for model_type, f in FAMILIES.items())
    assert family_named(DEFAULT_FAMILY).name == DEFAULT_FAMILY
    with pytest.raises(UnknownFamilyError) as err:
        family_named("qwen-vl")
    assert "\n" not in str(err.value) and all(f.name in str(err.value) for f in FAMILIES.values())


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=lambda f: f.name)
def test_every_family_answers_the_whole_interface(family):
    cls = type(family)
    assert issubclass(cls, Family) and not cls.__abstractmethods__
    for attr in ("name", "label", "model_type", "tower", "chat_template", "tiny_text_model", "corpus_line"):
        assert isinstance(getattr(family, attr), str) and getattr(family, attr), attr
    for capability in CAPABILITIES:  # declared in the family's own class body, never inherited by accident
        assert capability in vars(cls) and isinstance(getattr(family, capability), bool), capability
    assert set(family.corpus_line.replace("{image}", "").replace("{text}", "").replace("{answer}", "")) \
        .isdisjoint("{}")
    tokens = family.tokenizer_tokens("<image>")
    assert set(tokens) == {"special", "bos", "eos", "extra"} and tokens["extra"]["image_token"] == "<image>"
    family.text_config_class(family.tiny_text_model)

    # every question about geometry, packing and cost, on the config of each of its presets
    from pipeline.builders import build_tiny, on_meta

    presets = [p for p in (*PRESETS.values(), *SIZED_PRESETS.values()) if p.family is family]
    assert presets, f"{family.name} has no presets in pipeline.presets"
    for preset in presets:
        model = on_meta(preset) if preset in SIZED_PRESETS.values() else build_tiny(preset)[0]
        cfg = model.config
        assert isinstance(model, family.model_class()) and family.describe(cfg)["family"] == family.name
        assert family.describe(cfg)["model_type"] == family.model_type
        assert isinstance(family.has_cls(cfg), bool)
        assert 0 < family.covered(cfg) <= 1 and family.max_crops(cfg) >= 1
        assert isinstance(family.interpolation(cfg), bool)
        assert family.interpolation(cfg) <= family.can_interpolate  # only a family that can interpolate does
        assert (family.off_value(cfg) is not None) == family.can_interpolate
        if family.has_crops:  # fixed crops: the crop geometry, and the tower's tokens per crop in the cost model
            assert family.tokens_per_crop(cfg) > 0
            assert family.flops_dims(cfg).vision.tokens == family.side(cfg) ** 2 + family.has_cls(cfg)
        else:
            _answers_without_crops(family, preset, cfg)
        if not (family.own_runtime and not hasattr(pipeline.flops, "qwen_dims")):
            # (Qwen-VL's cost model, pipeline.flops.qwen_dims, is added beside this work; until it is there only
            # this assertion is skipped for the families whose flops_dims calls it)
            lm = family.flops_dims(cfg).lm
            assert (lm.layers, lm.hidden) == (cfg.text_config.num_hidden_layers, cfg.text_config.hidden_size)


def _answers_without_crops(family, preset, cfg):
    """A family without crops (Qwen-VL: one dynamic-resolution grid per image) refuses the crop questions in one
    line, covers the whole image as its one "crop", and counts an image's tokens from geometry exactly as its
    preset's image processor does (image_grid_thw / merge^2), with no row newlines."""
    from PIL import Image

    from pipeline.errors import UserError

    for question in (family.tokens_per_crop, family.side):
        with pytest.raises(UserError) as err:
            question(cfg)
        assert "\n" not in str(err.value) and str(err.value)
    assert family.covered(cfg) == 1 and family.max_crops(cfg) == 1
    processor = family.preset_image_processor(preset)
    family.note_processor(SimpleNamespace(config=cfg), SimpleNamespace(image_processor=processor))
    merge = cfg.vision_config.spatial_merge_size
    for height, width in ((64, 64), (100, 150), (600, 512), (77, 1300)):
        grid = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"][0]
        tokens = family.visual_tokens(cfg, (height, width))
        assert tokens.newlines == 0 and tokens.total == int(grid.prod()) // merge ** 2 > 0, (height, width)


def test_every_preset_rebuilds_from_its_dict_in_its_own_class():
    """What the prepare-model stage and a sized dir's marker do: the preset's own class, by family."""
    for preset in (*PRESETS.values(), *SIZED_PRESETS.values()):
        again = type(preset).from_dict(preset.to_dict())
        assert again.hash() == preset.hash() and again.family is preset.family
    for preset in SIZED_PRESETS.values():
        again = sized_preset_from_dict(preset.to_dict(), preset.family.name)
        assert type(again) is type(preset) and again.hash() == preset.hash()


def test_prepare_model_builds_a_onevision_preset(tmp_path):
    """``tiny-ov`` through the stage (it once rebuilt every preset as a NeXT ``TinyPreset`` and failed)."""
    from flows.stages.prepare_model import prepare_model
    from storage.home import Home

    stage = prepare_model(Home.resolve(tmp_path / "home"), "tiny-ov")
    assert stage.manifest["describe"]["family"] == PRESETS["tiny-ov"].family.name
    assert stage.manifest["describe"]["tokens_per_crop"] == 49
