"""Core ML export of the vision encoder, checked without a Mac: the saved package is read back
with coremltools' own loader and run by tests/mil_interpreter.py, against transformers'
Qwen 3.5 vision model in float64 and against mlxkit's MLX tower.

The two vision fixtures differ in every vision shape: tiny_vision_p4 (patch 4, temporal 2,
merge 2, 4x4 positions, 2 heads) and tiny_vision_p6 (patch 6, temporal 3, merge 3, 5x5
positions, 4 heads). Each is exported with three grids: the grids of its two fixture images
(and of p6's video, one call per temporal group), whose committed float64 references the
outputs are held to, and sides below, equal to and above the position table, so the table
is shrunk, kept and stretched. Random patches on every grid are checked against transformers
run here in float64.
"""

from __future__ import annotations

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.types.symbolic import any_symbolic
from mlxkit.convert.coreml import (
    INPUT_NAME,
    OUTPUT_NAME,
    WEIGHT_FILE,
    check_grids,
    default_grids,
    export_vision_encoder,
    function_name,
    grid_patches,
    nearest_grid,
    parse_grids,
    read_package_spec,
    vision_config,
    weight_file_bytes,
)

import mlxkit
from mlxkit.errors import MlxkitError
from tests import mil_interpreter
from tests.coreml_models import (
    ROTARY_TABLES,
    Reference,
    blob_consts,
    errors,
    file_end,
    random_patches,
    write_converted_layout,
)
from tests.helpers import FIXTURES, reference
from tests.mil_interpreter import Package, UnsupportedOp
from tests.vision_helpers import VISION

# p4: image0 6x10, image1 12x4, and the 4x4 position table itself; p6: image0 6x3, image1 6x9,
# the video's 3x6 (3 rows, fewer than the table's 5)
GRIDS = {"tiny_vision_p4": [(6, 10), (12, 4), (4, 4)], "tiny_vision_p6": [(6, 3), (6, 9), (3, 6)]}
OPS_FLOAT32 = {
    "const",
    "linear",
    "reshape",
    "transpose",
    "upsample_bilinear",
    "add",
    "sub",
    "mul",
    "layer_norm",
    "slice_by_index",
    "split",
    "concat",
    "scaled_dot_product_attention",
    "gelu",
}
OPS_FLOAT16 = OPS_FLOAT32 | {"cast"}  # the float32 input and output, at the edges only


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(tower, precision) -> ExportResult, with the grids of GRIDS."""
    out = tmp_path_factory.mktemp("exports")
    return {
        (name, precision): export_vision_encoder(
            FIXTURES / name,
            out / f"{name}-{precision}.mlpackage",
            GRIDS[name],
            precision=precision,
            quiet=True,
        )
        for name in VISION
        for precision in ("float32", "float16")
    }


@pytest.fixture(scope="module")
def converted_one_grid(tmp_path_factory):
    """tiny_vision_p4's tower in the converted (mlx-vlm) layout, exported for its first grid."""
    out = tmp_path_factory.mktemp("converted")
    converted = write_converted_layout(FIXTURES / "tiny_vision_p4", out / "model")
    grids = GRIDS["tiny_vision_p4"][:1]
    return export_vision_encoder(converted, out / "one.mlpackage", grids, quiet=True)


@pytest.fixture(scope="module")
def references():
    return {name: Reference(FIXTURES / name) for name in VISION}


def run_all(result, references, name):
    """(grid, output, reference) for every function of a package, on random patches."""
    cfg = vision_config(FIXTURES / name)
    package = Package(result.output)
    for i, grid in enumerate(result.grids):
        patches = random_patches(grid, cfg.patch_dim, seed=i)
        out = package.run(function_name(grid), {INPUT_NAME: patches})[OUTPUT_NAME]
        yield grid, out, references[name](patches, grid)


@pytest.mark.parametrize("name", VISION)
def test_float32_program_matches_transformers_float64(exports, references, name):
    for grid, out, ref in run_all(exports[name, "float32"], references, name):
        rel, _ = errors(out, ref)
        assert out.dtype == np.float32 and out.shape == ref.shape
        assert rel <= 1e-5, (grid, rel)


@pytest.mark.parametrize("name", VISION)
def test_float16_program_cosine_per_token(exports, references, name):
    for grid, out, ref in run_all(exports[name, "float16"], references, name):
        rel, cos = errors(out, ref)
        assert cos >= 0.9999, (grid, cos)
        assert rel <= 5e-3, (grid, rel)  # float16 has 11 bits; ~1e-3 is its scale here


@pytest.mark.parametrize("precision", ["float32", "float16"])
@pytest.mark.parametrize("name", VISION)
def test_fixture_images_and_video_match_their_float64_references(exports, name, precision):
    """The fixture's preprocessed images (and p6's video, one temporal group per call) through
    their grids' functions, against the tower output transformers gave in float64."""
    ref, m = reference(name), vision_config(FIXTURES / name).spatial_merge_size
    package = Package(exports[name, precision].output)
    start = 0
    for part in ("image0", "image1", "video"):
        t, h, w = (int(v) for v in ref[f"{part}_grid"])
        tokens = t * h * w // m**2
        expected = ref["tower_f64"][start : start + tokens]
        start += tokens
        if (h, w) not in GRIDS[name]:
            continue  # p4's video grid is not exported
        groups = np.split(ref[f"{part}_patches"], t)  # each temporal group attends on its own
        out = np.concatenate(
            [package.run(function_name((h, w)), {INPUT_NAME: g})[OUTPUT_NAME] for g in groups]
        )
        rel, cos = errors(out, expected)
        if precision == "float32":
            assert rel <= 1e-5, (part, rel)
        else:
            assert cos >= 0.9999, (part, cos)
    assert start == len(ref["tower_f64"])


@pytest.mark.parametrize("precision", ["float32", "float16"])
@pytest.mark.parametrize("name", VISION)
def test_spec_names_dtypes_and_shapes(exports, name, precision):
    result = exports[name, precision]
    cfg = vision_config(FIXTURES / name)
    m = cfg.spatial_merge_size
    spec = ct.models.MLModel(str(result.output), skip_model_load=True).get_spec()
    assert spec.specificationVersion == 9  # iOS 18: multifunction, scaled_dot_product_attention
    functions = {f.name: f for f in spec.description.functions}
    assert list(functions) == [function_name(g) for g in GRIDS[name]] == result.functions
    assert spec.description.defaultFunctionName == function_name(GRIDS[name][0])
    for grid in GRIDS[name]:
        f = functions[function_name(grid)]
        (inp,), (out,) = f.input, f.output
        n = grid[0] * grid[1]
        for feature, name_, shape in (
            (inp, INPUT_NAME, [n, cfg.patch_dim]),
            (out, OUTPUT_NAME, [n // m**2, cfg.out_hidden_size]),
        ):
            array = feature.type.multiArrayType
            assert feature.name == name_ and list(array.shape) == shape
            assert array.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
            assert array.WhichOneof("ShapeFlexibility") is None  # a fixed shape, not a range
    meta = spec.description.metadata.userDefined
    assert meta["mlxkit.grids"] == ",".join(f"{r}x{c}" for r, c in GRIDS[name])
    assert meta["mlxkit.precision"] == precision and meta["mlxkit.version"] == mlxkit.__version__
    assert meta["mlxkit.compute_units"] == "CPU_AND_NE"
    assert meta["mlxkit.spatial_merge_size"] == str(m)


@pytest.mark.parametrize("precision", ["float32", "float16"])
@pytest.mark.parametrize("name", VISION)
def test_op_set_and_static_shapes(exports, name, precision):
    package = Package(exports[name, precision].output)
    side = vision_config(FIXTURES / name).position_grid_side
    for grid in GRIDS[name]:
        function = function_name(grid)
        expected = OPS_FLOAT16 if precision == "float16" else OPS_FLOAT32
        if grid == (side, side):  # the position table itself: no resampling left to do
            expected = expected - {"upsample_bilinear"}
        assert package.op_types(function) == expected
        compute = "fp16" if precision == "float16" else "fp32"
        for op in package.program.functions[function].operations:
            for var in op.outputs:
                assert not any_symbolic(var.shape), (op.name, var.shape)
                if op.op_type not in ("const", "cast") and types.is_tensor(var.sym_type):
                    assert types.builtin_to_string(var.dtype) == compute, op.name


@pytest.mark.parametrize("name", VISION)
def test_one_weight_file_shared_by_every_function(exports, name):
    result = exports[name, "float16"]
    weights_dir = result.output / WEIGHT_FILE.rsplit("/", 1)[0]
    assert [p.name for p in weights_dir.iterdir()] == ["weight.bin"]
    consts = blob_consts(ct.utils.load_spec(str(result.output)))
    assert {f for c in consts.values() for f, _, _, _ in c.values()} == {
        "@model_path/weights/weight.bin"
    }
    # apart from the rotary tables (rows or cols x head_dim/4 each; inline when under ten
    # values), every function refers to the same constants at the same offsets
    tower = [
        {n: v for n, v in c.items() if not n.startswith(ROTARY_TABLES)} for c in consts.values()
    ]
    assert all(t == tower[0] for t in tower)


def test_weights_are_two_bytes_per_parameter_and_do_not_grow_with_grids(
    exports, converted_one_grid
):
    name = "tiny_vision_p4"
    three, one = exports[name, "float16"], converted_one_grid
    consts = blob_consts(ct.utils.load_spec(str(three.output)))
    consts_one = blob_consts(ct.utils.load_spec(str(one.output)))
    assert three.weight_bytes == file_end(consts) and one.weight_bytes == file_end(consts_one)
    first = consts[function_name(GRIDS[name][0])]
    tower = {k: v for k, v in first.items() if not k.startswith(ROTARY_TABLES)}
    # the tower's parameters, each stored once as float16
    assert sum(n for _, _, n, _ in tower.values()) == three.parameters == one.parameters
    assert {size for _, _, _, size in tower.values()} == {2}
    # what more grids add is their rotary tables, nothing else
    first_blobs = {offset for _, offset, _, _ in first.values()}
    extra = {
        (k, offset, n)
        for c in consts.values()
        for k, (_, offset, n, _) in c.items()
        if offset not in first_blobs
    }
    assert all(k.startswith(ROTARY_TABLES) for k, _, _ in extra)
    growth = three.weight_bytes - one.weight_bytes
    tables = {(offset, n) for _, offset, n in extra}
    # (the file's last blob is not padded to 64 bytes: one blob's padding either way)
    assert 0 <= growth <= sum(64 + -(-2 * n // 64) * 64 for _, n in tables) + 64


def test_the_weight_file_is_planned_to_the_byte(exports, converted_one_grid):
    """`weight_file_bytes` (what the planner counts) from the config alone, against the file
    written: three grids that share or do not share rows and cols, and one grid."""
    for (name, precision), result in exports.items():
        cfg = vision_config(FIXTURES / name)
        assert weight_file_bytes(cfg, GRIDS[name], precision) == result.weight_bytes, name
    cfg = vision_config(FIXTURES / "tiny_vision_p4")
    assert weight_file_bytes(cfg, converted_one_grid.grids) == converted_one_grid.weight_bytes
    # a grid adds its tables (4 x 4 values under ten: inline), the same grid twice adds nothing
    assert weight_file_bytes(cfg, [(6, 10), (2, 2)]) == weight_file_bytes(cfg, [(6, 10)])


@pytest.mark.parametrize("name", VISION)
def test_the_spec_says_how_to_make_the_input(exports, name):
    """The metadata an app (and bundle verify) reads: preprocessing, tower config, token ids."""
    import json

    meta = read_package_spec(exports[name, "float16"].output).metadata
    cfg, config = (
        vision_config(FIXTURES / name),
        json.loads((FIXTURES / name / "config.json").read_text()),
    )
    pre = json.loads(meta["mlxkit.preprocessing"])
    assert (pre["patch_size"], pre["temporal_patch_size"], pre["merge_size"]) == (
        cfg.patch_size,
        cfg.temporal_patch_size,
        cfg.spatial_merge_size,
    )
    source = json.loads((FIXTURES / name / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == source["image_mean"] and pre["image_std"] == source["image_std"]
    assert json.loads(meta["mlxkit.vision_config"])["depth"] == cfg.depth
    tokens = json.loads(meta["mlxkit.token_ids"])
    assert tokens["image_token_id"] == config["image_token_id"] and len(tokens) == 4


@pytest.mark.parametrize("name", VISION)
def test_grid_patches_are_transformers_patches_at_the_grid(exports, name):
    """What the Swift glue makes of a picture (grid_patches is its reference) is, at the grid
    smart_resize gives that picture, exactly the patches transformers' processor made for the
    fixture; through the package they give the tower output of the float64 reference."""
    from mlxkit.vision import Preprocessor

    ref, cfg = reference(name), vision_config(FIXTURES / name)
    pre = Preprocessor.from_dir(FIXTURES / name, cfg)
    package = Package(exports[name, "float32"].output)
    _, h, w = (int(v) for v in ref["image1_grid"])
    patches = grid_patches(FIXTURES / name / "image1.png", (h, w), pre)
    np.testing.assert_array_equal(patches, ref["image1_patches"])
    tokens0 = int(np.prod(ref["image0_grid"])) // cfg.spatial_merge_size**2
    expected = ref["tower_f64"][tokens0 : tokens0 + h * w // cfg.spatial_merge_size**2]
    out = package.run(function_name((h, w)), {INPUT_NAME: patches})[OUTPUT_NAME]
    assert errors(out, expected)[0] <= 1e-5
    # another grid bends the picture to its own shape
    assert grid_patches(FIXTURES / name / "image1.png", GRIDS[name][0], pre).shape == (
        GRIDS[name][0][0] * GRIDS[name][0][1],
        cfg.patch_dim,
    )


def test_nearest_grid_by_aspect_then_tokens():
    grids = default_grids(2)  # square, 3:4 and 4:3 (w:h) at 256, 576 and 1,024 tokens
    assert nearest_grid(grids, 3024, 4032, 2) == (72, 54)  # portrait: 72 rows of 54 patches
    assert nearest_grid(grids, 4032, 3024, 2, max_tokens=576) == (40, 54)
    assert nearest_grid(grids, 1000, 1000, 2, max_tokens=300) == (32, 32)
    assert nearest_grid(grids, 1000, 2000, 2, max_tokens=256) == (36, 26)  # 1:2 is nearest 3:4
    assert nearest_grid(grids, 500, 500, 2, max_tokens=10) == (64, 64)  # none within: all
    with pytest.raises(MlxkitError, match="has no aspect ratio"):
        nearest_grid(grids, 0, 10, 2)


def test_converted_layout_exports_the_same_encoder(exports, converted_one_grid):
    grid = GRIDS["tiny_vision_p4"][0]
    patches = random_patches(grid, vision_config(FIXTURES / "tiny_vision_p4").patch_dim, seed=3)
    ours = Package(converted_one_grid.output).run(function_name(grid), {INPUT_NAME: patches})
    hf = Package(exports["tiny_vision_p4", "float16"].output).run(
        function_name(grid), {INPUT_NAME: patches}
    )
    np.testing.assert_array_equal(ours[OUTPUT_NAME], hf[OUTPUT_NAME])


def test_default_grids_are_smart_resize_caps_of_square_and_3_4_photos():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    assert default_grids(2) == [
        (32, 32),
        (36, 26),
        (26, 36),
        (48, 48),
        (54, 40),
        (40, 54),
        (64, 64),
        (72, 54),
        (54, 72),
    ]
    patch, merge = 16, 2
    expected = []
    for tokens in (256, 576, 1024):
        for width, height in ((3024, 3024), (3024, 4032), (4032, 3024)):
            h, w = smart_resize(
                height,
                width,
                factor=patch * merge,
                min_pixels=1,
                max_pixels=tokens * (patch * merge) ** 2,
            )
            expected.append((h // patch, w // patch))
    assert default_grids(merge) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("3x4", "grid 3x4: rows and cols must be positive multiples of the spatial merge size 2"),
        ("0x4", "grid 0x4: rows and cols must be positive multiples"),
        ("32by32", "grid '32by32': write ROWSxCOLS in patches"),
        ("130x130", "grid 130x130: 4225 vision tokens; at most 4096"),
        ("32x32,32x32", "a grid is listed twice"),
    ],
)
def test_unsupported_grids(spec, message):
    with pytest.raises(MlxkitError, match=message):
        check_grids(parse_grids([spec]), 2)


def test_grids_parse_from_several_options():
    assert parse_grids(["32x32, 36x26", "26X36"]) == [(32, 32), (36, 26), (26, 36)]
    assert check_grids([[2, 2]], 1) == [(2, 2)]
    with pytest.raises(
        MlxkitError, match=r"grid \(32.0, 32\): give \(rows, cols\) as two integers"
    ):
        check_grids([(32.0, 32)], 2)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_the_mac_check_runs_here_with_the_interpreter_in_place_of_core_ml(exports, precision):
    """benchmarks/coreml_vision.py's comparison with mlxkit's MLX tower, Core ML emulated."""
    from benchmarks.coreml_vision import MIN_PSNR, compare, mlx_reference

    name = "tiny_vision_p6"
    cfg, package = vision_config(FIXTURES / name), exports[name, precision].output
    interpreter = Package(package)
    rows = compare(
        package,
        cfg,
        lambda f, x: interpreter.run(f, {INPUT_NAME: x})[OUTPUT_NAME],
        mlx_reference(FIXTURES / name, cfg),
    )
    assert [r.function for r in rows] == [function_name(g) for g in GRIDS[name]]
    assert all(r.psnr >= MIN_PSNR and r.min_cosine >= 0.9999 for r in rows), [
        (r.function, r.psnr, r.min_cosine) for r in rows
    ]
    if precision == "float32":  # both are float32: only rounding apart
        assert all(r.max_rel_error <= 1e-5 for r in rows)


def test_interpreter_refuses_an_op_it_does_not_know(exports, monkeypatch):
    package = Package(exports["tiny_vision_p4", "float32"].output)
    monkeypatch.delitem(mil_interpreter.OPS, "gelu")  # as if the exporter had changed the graph
    with pytest.raises(UnsupportedOp, match="op gelu"):
        package.run("grid_4x4", {INPUT_NAME: random_patches((4, 4), 96, 0)})
