"""Bad or unusual --data refused with one line naming the problem and the fix, or read exactly as written."""

import json

import numpy as np
import onnx
import pandas as pd
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from cli.main import app
from onnxfair.data import ImageOptions, load_dataset
from onnxfair.errors import DataError
from tests.conftest import linear_model


def _cli_error(*args) -> str:
    """The one stderr line of a run that must end with exit code 2."""
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def _linear(tmp_path):
    model = linear_model(np.ones((3, 4)), np.zeros(3))
    onnx.save(model, tmp_path / "lin.onnx")
    return model


def _image_model(tmp_path, shape=("N", 3, 6, 5)):
    """Mean colour per channel as 3 class scores: runs on any image batch of the declared shape."""
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, tmp_path / "img.onnx")
    return model


def _manifest(tmp_path, images, name="m.csv", paths=None):
    from PIL import Image

    rows = []
    for i, arr in enumerate(images):
        Image.fromarray(arr).save(tmp_path / f"im{i}.png")
        rows.append({"path": f"im{i}.png" if paths is None else paths[i], "label": i % 3, "tone": "ab"[i % 2]})
    pd.DataFrame(rows).to_csv(tmp_path / name, index=False)
    return tmp_path / name


def _rgb(n, rng):
    return [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(n)]


# 1. empty path cells


def test_a_manifest_with_empty_path_cells_names_the_rows(tmp_path):
    _image_model(tmp_path)
    m = _manifest(tmp_path, _rgb(4, np.random.default_rng(0)), paths=["im0.png", "", "im2.png", None])
    line = _cli_error("evaluate", tmp_path / "img.onnx", "--data", m, "--groups", "tone", "--no-latency")
    assert line == ("error: m.csv has an empty 'path' cell in 2 rows (data rows 2, 4, counting from 1); "
                    "fill in the image paths or drop those rows")


# 2. --mean / --std / --image-size


@pytest.mark.parametrize("opts, message", [
    (["--mean", "0.5,0.5"], "error: --mean has 2 values but the model's images have 3 channels; give one value or 3"),
    (["--std", "0.2,0.2,0.2,0.2"], "error: --std has 4 values but the model's images have 3 channels; give one value or 3"),
    (["--mean", "nan"], "error: --mean 'nan' has a non-finite value; give finite numbers, e.g. --mean 0.5,0.5,0.5"),
    (["--std", "0.3,inf,0.3"], "error: --std '0.3,inf,0.3' has a non-finite value; give finite numbers"),
    (["--std", "0.3,0,0.3"], "error: --std '0.3,0,0.3' has a value <= 0; give positive standard deviations"),
    (["--mean", "a"], "error: --mean 'a' is not a comma-separated list of numbers"),
    (["--image-size", "0,0"], "error: --image-size '0,0' must be two positive whole numbers H,W; give e.g. --image-size 224,224"),
    (["--image-size", "-5,32"], "error: --image-size '-5,32' must be two positive whole numbers H,W"),
    (["--image-size", "32.7,32"], "error: --image-size '32.7,32' must be two positive whole numbers H,W"),
    (["--image-size", "32"], "error: --image-size '32' must be two positive whole numbers H,W"),
])
def test_image_options_are_checked_before_the_images_are_read(tmp_path, opts, message):
    _image_model(tmp_path)
    m = _manifest(tmp_path, _rgb(3, np.random.default_rng(0)))
    assert _cli_error("evaluate", tmp_path / "img.onnx", "--data", m, "--groups", "tone", "--no-latency", *opts).startswith(message)


def test_one_mean_and_std_value_still_applies_to_every_channel(tmp_path):
    pix = _rgb(3, np.random.default_rng(1))
    ds = load_dataset(_manifest(tmp_path, pix), _image_model(tmp_path), "tone", image=ImageOptions(mean=(0.5,), std=(0.25,)))
    want = (np.stack(pix).astype(np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(ds.inputs["x"], want.transpose(0, 3, 1, 2), atol=1e-6)


# 3. --layout


def test_a_wrong_layout_points_at_layout(tmp_path):
    _image_model(tmp_path)
    m = _manifest(tmp_path, _rgb(3, np.random.default_rng(0)))
    line = _cli_error("evaluate", tmp_path / "img.onnx", "--data", m, "--groups", "tone", "--layout", "NHWC", "--no-latency")
    assert line == ("error: model input 'x' ['N', 3, 6, 5] has 5 channels under --layout NHWC; images need 1, 3 or 4: "
                    "check --layout (NCHW puts channels second, NHWC last)")


# 4. converted / resized images


def test_converted_and_resized_images_are_counted_in_one_notice(tmp_path, capsys):
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    big = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    m = _manifest(tmp_path, [gray, rgba, big, rgb], name="mixed_notice.csv")
    ds = load_dataset(m, _image_model(tmp_path), "tone")
    err = capsys.readouterr().err
    assert err == ("warning: mixed_notice.csv: of 4 images, converted 2 to RGB (from L, RGBA) and resized 1 to 6x5 "
                   "(H x W, the model's input)\n")
    x = ds.inputs["x"].transpose(0, 2, 3, 1) * 255
    np.testing.assert_allclose(x[0], np.repeat(gray[..., None], 3, axis=2), atol=1e-3)  # grey copied to R, G, B
    np.testing.assert_allclose(x[1], rgba[..., :3], atol=1e-3)
    np.testing.assert_allclose(x[3], rgb, atol=1e-3)


def test_images_already_in_the_model_format_print_no_notice(tmp_path, capsys):
    load_dataset(_manifest(tmp_path, _rgb(3, np.random.default_rng(3)), name="plain.csv"), _image_model(tmp_path), "tone")
    assert capsys.readouterr().err == ""


# 5. integer model inputs from tables


def _int_model(tmp_path, dtype=TensorProto.INT64):
    """Token ids in, cast to float, one Gemm: enough to check ids arrive unchanged and the model runs."""
    w = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["t"], ["f"], to=TensorProto.FLOAT), helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1)],
        "ids", [helper.make_tensor_value_info("t", dtype, ["N", 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, tmp_path / "ids.onnx")
    return model


def _ids_table(tmp_path, a, b):
    df = pd.DataFrame({"a": a, "b": b, "label": [0, 1, 2, 0], "grp": list("xyxy")})
    df.to_csv(tmp_path / "ids.csv", index=False)
    df.to_parquet(tmp_path / "ids.parquet")


@pytest.mark.parametrize("name", ["ids.csv", "ids.parquet"])
def test_tables_feed_integer_model_inputs_exactly(tmp_path, name):
    _ids_table(tmp_path, [3, 2**40 + 1, 0, 7], [1, 2, 3, 4])  # 2**40 + 1 survives no float32 round trip
    ds = load_dataset(tmp_path / name, _int_model(tmp_path), "grp")
    assert ds.inputs["t"].dtype == np.int64
    assert ds.inputs["t"].tolist() == [[3, 1], [2**40 + 1, 2], [0, 3], [7, 4]]
    _ids_table(tmp_path, [3.0, 5.0, 0.0, 7.0], [1, 2, 3, 4])  # whole floats are ids too
    assert load_dataset(tmp_path / name, _int_model(tmp_path, TensorProto.INT32), "grp").inputs["t"].dtype == np.int32


def test_an_integer_model_runs_on_a_csv(tmp_path):
    _ids_table(tmp_path, [3, 1, 1, 7], [1, 2, 3, 4])
    _int_model(tmp_path)
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "ids.onnx"), "--data", str(tmp_path / "ids.csv"), "--groups", "grp",
                                 "--no-latency", "--json", "-"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    # logits [a, b, a + b] with a, b > 0: every row picks class 2, against labels 0, 1, 2, 0
    assert json.loads(r.stdout)["overall"] == {"n": 4, "accuracy": 0.25}


@pytest.mark.parametrize("a, dtype, message", [
    ([3.5, 5.0, 0.0, 7.25], TensorProto.INT64,
     "the model input 't' is int64 but the feature columns of ids.csv hold non-integral values in 2 rows; give whole numbers"),
    ([3, 2**31, 0, 7], TensorProto.INT32,
     r"the feature columns of ids.csv hold values outside int32 \(-2147483648..2147483647\) in 1 rows"),
])
def test_integer_model_inputs_refuse_what_would_change(tmp_path, a, dtype, message):
    _ids_table(tmp_path, a, [1, 2, 3, 4])
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path / "ids.csv", _int_model(tmp_path, dtype), "grp")


@pytest.mark.parametrize("ids, dtype", [(np.array([[3, 1], [2**32 + 3, 2], [0, 3], [-1, 4]], np.int64), np.int32),
                                        (np.array([[3, 1], [2**63, 2], [0, 3], [7, 4]], np.uint64), np.int64)])
def test_npz_integer_inputs_out_of_the_model_dtype_are_refused_not_wrapped(tmp_path, ids, dtype):
    """Before: int64 2**32 + 3 became int32 3 (and a uint64 2**63 a negative id), exit 0 with other numbers."""
    elem = {np.int32: TensorProto.INT32, np.int64: TensorProto.INT64}[dtype]
    np.savez(tmp_path / "ids.npz", t=ids, y=np.array([0, 1, 2, 0]), grp=np.array(list("xyxy")))
    info = np.iinfo(dtype)
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / "ids.npz", _int_model(tmp_path, elem), "grp")
    assert str(err.value) == (f"input 't' holds values outside {np.dtype(dtype)} ({info.min}..{info.max}) in 1 rows, "
                              "which the model input cannot take (a cast would wrap them); fix those values")
    ids[1, 0] = 5  # in range: cast exactly
    np.savez(tmp_path / "ids.npz", t=ids, y=np.array([0, 1, 2, 0]), grp=np.array(list("xyxy")))
    got = load_dataset(tmp_path / "ids.npz", _int_model(tmp_path, elem), "grp").inputs["t"]
    assert got.dtype == dtype and got.tolist() == ids.tolist()


# 6. / 7. group arrays


def _npz(tmp_path, **groups):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32), y=np.array([0, 1, 2, 0]), **groups)
    return tmp_path / "d.npz"


def test_a_one_column_group_array_is_read_as_one_value_per_row(tmp_path):
    ds = load_dataset(_npz(tmp_path, race=np.array([["A"], ["B"], ["A"], ["B"]])), _linear(tmp_path), "race")
    assert ds.group_labels == ["race=A", "race=B"] and ds.group_ids.tolist() == [0, 1, 0, 1]


def test_a_group_array_with_several_columns_is_refused(tmp_path):
    _linear(tmp_path)
    line = _cli_error("evaluate", tmp_path / "lin.onnx", "--data", _npz(tmp_path), "--groups", "x", "--no-latency")
    assert line == ("error: group attribute 'x' has shape [4, 4]; expected one value per row (a 1-D array): "
                    "pick the right --groups or save the attribute as a 1-D array")


MISSING = ("group attribute 'race' is missing in {n} of 4 rows of {f}; "
           "fill them with an explicit value such as 'unknown', or drop those rows")


@pytest.mark.parametrize("race, n", [
    (np.array([0.0, np.nan, 1.0, np.nan]), 2),
    (np.array(["A", "", "B", "  "]), 2),
    (np.array([b"A", b"B", b"", b"B"]), 1),
])
def test_missing_group_values_in_npz_are_refused(tmp_path, race, n):
    with pytest.raises(DataError, match=MISSING.format(n=n, f="d.npz")):
        load_dataset(_npz(tmp_path, race=race), _linear(tmp_path), "race")


@pytest.mark.parametrize("race, n", [(["A", None, "B", "B"], 1), (["A", "", "B", None], 2), ([1.0, None, 2.0, 1.0], 1)])
@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_missing_group_values_in_tables_are_refused(tmp_path, race, n, suffix):
    _linear(tmp_path)
    df = pd.DataFrame(np.zeros((4, 4)), columns=list("abcd"))
    df["label"], df["race"] = [0, 1, 2, 0], race
    f = tmp_path / f"t.{suffix}"
    df.to_csv(f, index=False) if suffix == "csv" else df.to_parquet(f)
    line = _cli_error("evaluate", tmp_path / "lin.onnx", "--data", f, "--groups", "race", "--no-latency")
    assert line == "error: " + MISSING.format(n=n, f=f.name)


# 8. labels


@pytest.mark.parametrize("bad, message", [
    (np.inf, "label 'y' has NaN or infinite values in 1 rows; drop or fill those rows"),
    (np.nan, "label 'y' has NaN or infinite values in 1 rows; drop or fill those rows"),
    (1e20, ("label 'y' has values such as 1e+20 in 1 rows, far outside any class index; "
            "fix the labels or pick the right column with --label")),
])
def test_labels_are_checked_before_the_integer_cast(tmp_path, bad, message):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32), y=np.array([0.0, 1.0, bad, 2.0]), g=np.array([1, 2, 1, 2]))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("+", r"\+")):
        load_dataset(tmp_path / "d.npz", _linear(tmp_path), "g")


def test_huge_unsigned_labels_are_not_wrapped(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4), np.float32), y=np.array([0, 2**63 + 5], np.uint64), g=np.array([1, 2]))
    with pytest.raises(DataError, match="label 'y' has values such as 9.22337e\\+18 in 1 rows, far outside any class index"):
        load_dataset(tmp_path / "d.npz", _linear(tmp_path), "g")


# 9. / 10. unreadable or empty files


def test_an_npz_with_object_arrays_says_why_and_how_to_save_it(tmp_path):
    _linear(tmp_path)
    np.savez(tmp_path / "o.npz", x=np.zeros((2, 4), np.float32), y=np.array([0, 1]), race=np.array(["A", "B"], dtype=object))
    line = _cli_error("evaluate", tmp_path / "lin.onnx", "--data", tmp_path / "o.npz", "--groups", "race", "--no-latency")
    assert line == ("error: array 'race' in o.npz holds Python objects, which onnxfair refuses to unpickle for safety; "
                    "fill in missing values, then save strings with a fixed-width dtype, e.g. "
                    "numpy.savez(..., race=arr.astype(str))")


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_a_table_with_no_rows_says_so(tmp_path, suffix):
    _linear(tmp_path)
    df = pd.DataFrame({c: pd.Series([], dtype=float) for c in "abcd"} | {"label": pd.Series([], dtype=object),
                                                                         "race": pd.Series([], dtype=object)})
    f = tmp_path / f"t.{suffix}"
    df.to_csv(f, index=False) if suffix == "csv" else df.to_parquet(f)
    line = _cli_error("evaluate", tmp_path / "lin.onnx", "--data", f, "--groups", "race", "--no-latency")
    assert line == f"error: t.{suffix} has a header but no rows; give a file with at least one labelled row"


# 11. a `path` column in a plain table


def test_features_make_a_table_with_a_path_column_a_table(tmp_path):
    _linear(tmp_path)
    df = pd.DataFrame(np.arange(16, dtype=float).reshape(4, 4), columns=["path", "b", "c", "d"])
    df["label"], df["race"] = [0, 1, 2, 0], list("ABAB")
    df.to_csv(tmp_path / "t.csv", index=False)
    ds = load_dataset(tmp_path / "t.csv", _linear(tmp_path), "race", features=["path", "b", "c", "d"], image=ImageOptions())
    np.testing.assert_array_equal(ds.inputs["x"], np.arange(16, dtype=np.float32).reshape(4, 4))
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "lin.onnx"), "--data", str(tmp_path / "t.csv"), "--groups", "race",
                                 "--features", "path,b,c,d", "--no-latency"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    line = _cli_error("evaluate", tmp_path / "lin.onnx", "--data", tmp_path / "t.csv", "--groups", "race", "--no-latency")
    assert line.endswith("(t.csv was read as a manifest for its 'path' column: pass --features to read it as a table)")


def test_a_string_model_input_is_told_to_take_numbers(tmp_path):
    """Before: 'has dtype <U1, the model expects object; convert the data', which an npz cannot hold."""
    np.savez(tmp_path / "s.npz", t=np.array([["a", "b"]] * 4), y=np.array([0, 1, 2, 0]), grp=np.array(list("xyxy")))
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / "s.npz", _int_model(tmp_path, TensorProto.STRING), "grp")
    assert str(err.value) == ("model input 't' takes strings, which onnxfair does not feed; export the model with "
                              "numeric inputs (token ids or encoded features, say)")


@pytest.mark.parametrize("elem", [TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN])
def test_an_input_type_numpy_files_cannot_hold_gets_a_fix_that_can_be_followed(tmp_path, elem):
    """Before: 'convert the data' to bfloat16, which no npz, csv or parquet file can hold."""
    np.savez(tmp_path / "f.npz", t=np.ones((4, 2), np.float32), y=np.array([0, 1, 2, 0]), grp=np.array(list("xyxy")))
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / "f.npz", _int_model(tmp_path, elem), "grp")
    assert str(err.value).startswith(f"model input 't' takes {np.dtype(helper.tensor_dtype_to_np_dtype(elem))}, ")
    assert str(err.value).endswith("; export the model with float32 (or float16) inputs")


def test_inputs_that_share_a_named_dim_must_agree_on_its_size(tmp_path):
    """Token ids of 12 and a mask of 10 failed inside onnxruntime on a broadcast that named neither array."""
    g = helper.make_graph([helper.make_node("Mul", ["ids", "mask"], ["y"])], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["batch", "seq"]),
                           helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "seq"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    rng = np.random.default_rng(0)
    common = {"y": np.zeros(8, np.int64), "g": np.array(["a", "b"] * 4)}
    np.savez(tmp_path / "ok.npz", ids=rng.random((8, 12)), mask=np.ones((8, 12)), **common)
    np.savez(tmp_path / "bad.npz", ids=rng.random((8, 12)), mask=np.ones((8, 10)), **common)
    assert load_dataset(tmp_path / "ok.npz", m, "g").inputs["mask"].shape == (8, 12)
    with pytest.raises(DataError, match="inputs 'ids' and 'mask' share the model's dim 'seq', and the data gives it 12 "
                                        "and 10; give both arrays one size there"):
        load_dataset(tmp_path / "bad.npz", m, "g")


@pytest.mark.parametrize("name", ["ids.csv", "ids.parquet"])
def test_an_integer_column_stays_exact_beside_a_float_one(tmp_path, name):
    """Before: one float column made the whole table float64, and id 2**53 + 1 arrived as 2**53."""
    _ids_table(tmp_path, [3.0, 5.0, 0.0, 7.0], [1, 2**53 + 1, 3, 4])
    ds = load_dataset(tmp_path / name, _int_model(tmp_path), "grp")
    assert ds.inputs["t"].tolist() == [[3, 1], [5, 2**53 + 1], [0, 3], [7, 4]]


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    """pandas renames the second `label` to `label.1`, which was then fed to the model as a feature."""
    _linear(tmp_path)
    (tmp_path / "d.csv").write_text("f0,f1,f2,label,label,g\n" + "0,1,2,1,1,a\n" * 3 + "0,1,2,0,0,b\n")
    assert _cli_error("evaluate", tmp_path / "lin.onnx", "--data", tmp_path / "d.csv", "--groups", "g") == \
        "error: d.csv names the column 'label' twice in its header; rename or drop one of them"


@pytest.mark.parametrize("values", [
    np.array(["2020-01-01", "NaT", "2020-01-02", "2020-01-01"], "datetime64[D]"),
    np.array([1, "NaT", 2, 1], "timedelta64[s]"),
    np.array([1 + 1j, complex("nan"), 2, 1]),
])
def test_a_missing_datetime_duration_or_complex_group_value_is_refused(tmp_path, values):
    """NaT and complex NaN formed a group of their own."""
    _linear(tmp_path)
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32), y=np.array([0, 1, 2, 0]), g=values)
    assert _cli_error("evaluate", tmp_path / "lin.onnx", "--data", tmp_path / "d.npz", "--groups", "g").startswith(
        "error: group attribute 'g' is missing in 1 of 4 rows of d.npz")


def test_group_values_that_are_not_utf8_bytes_stay_distinct(tmp_path):
    """A UnicodeDecodeError traceback, before."""
    model = _linear(tmp_path)
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32), y=np.array([0, 1, 2, 0]),
             g=np.array([b"\xff", b"\xfe", b"\xff", b"a"]))
    assert load_dataset(tmp_path / "d.npz", model, "g").group_labels == ["g=\\xfe", "g=\\xff", "g=a"]


def test_finite_values_beyond_the_models_float_type_are_named_as_such(tmp_path):
    """Before: numpy's overflow RuntimeWarning on stderr, then 'NaN or infinite values', which the data had not."""
    _linear(tmp_path)
    x = np.ones((4, 4))
    x[1, 2] = 1e300
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 0]), g=np.array(list("abab")))
    assert _cli_error("evaluate", tmp_path / "lin.onnx", "--data", tmp_path / "d.npz", "--groups", "g", "--no-latency") == (
        "error: input 'x' holds values beyond float32's range (largest 3.403e+38) in 1 rows, which the model input "
        "cannot take; rescale the data or export the model with wider float inputs")


def test_mean_and_std_that_overflow_the_pixels_are_named(tmp_path):
    from PIL import Image

    _image_model(tmp_path)
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "0.png")
    pd.DataFrame([{"path": "0.png", "label": 0, "tone": "a"}]).to_csv(tmp_path / "m.csv", index=False)
    said = _cli_error("evaluate", tmp_path / "img.onnx", "--data", tmp_path / "m.csv", "--groups", "tone",
                      "--no-latency", "--mean", "1e38", "--std", "1e-38")
    assert said.startswith("error: --mean 1e+38 and --std 1e-38 take the pixels (scaled to [0, 1]) beyond float32")


def test_an_empty_label_or_feature_name_is_refused(tmp_path):
    """--label "" read the default column and --features "" the default features, silently."""
    _linear(tmp_path)
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32), y=np.array([0, 1, 2, 0]), g=np.array(list("abab")))
    base = ["evaluate", tmp_path / "lin.onnx", "--data", tmp_path / "d.npz", "--groups", "g", "--no-latency"]
    assert _cli_error(*base, "--label", "") == \
        "error: --label is empty; give the label column's name (default: label in a table, y in an npz)"
    assert _cli_error(*base, "--features", "f0,,f1") == \
        "error: --features 'f0,,f1' has an empty column name; list the feature columns, comma-separated"


def test_a_model_input_named_like_the_label_is_refused_by_that_cause(tmp_path):
    """Before: the labels were fed as the input, and the error asked to reshape the data."""
    model = linear_model(np.ones((3, 4)), np.zeros(3))
    model.graph.input[0].name = "y"
    model.graph.node[0].input[0] = "y"
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32), y=np.array([0, 1, 2, 0]), g=np.array(list("abab")))
    with pytest.raises(DataError, match="the model input 'y' has the label array's name in d.npz; save the labels under "
                                        "another name and pass it with --label"):
        load_dataset(tmp_path / "d.npz", model, "g")


def test_a_bool_model_input_takes_0_1_columns_of_a_table(tmp_path):
    """Refused before with 'has dtype float64', which a csv's user cannot change."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["b"], ["f"], to=TensorProto.FLOAT), helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1)],
        "flags", [helper.make_tensor_value_info("b", TensorProto.BOOL, ["N", 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.eye(2, dtype=np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    pd.DataFrame({"a": [0, 1, 1, 0], "c": [1, 0, 1, 0], "label": [1, 0, 0, 1], "g": list("xyxy")}).to_csv(
        tmp_path / "f.csv", index=False)
    ds = load_dataset(tmp_path / "f.csv", model, "g")
    assert ds.inputs["b"].dtype == np.bool_ and ds.inputs["b"].tolist() == [[False, True], [True, False], [True, True],
                                                                            [False, False]]
    pd.DataFrame({"a": [0, 2, 1, 0], "c": [1, 0, 1, 0], "label": [1, 0, 0, 1], "g": list("xyxy")}).to_csv(
        tmp_path / "f.csv", index=False)
    with pytest.raises(DataError, match="the model input 'b' is bool but the feature columns of f.csv hold values other "
                                        "than 0 and 1 in 1 rows"):
        load_dataset(tmp_path / "f.csv", model, "g")
