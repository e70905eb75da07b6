"""Loading grouped datasets from npz, csv, parquet and image manifests; clear errors on bad input."""

import numpy as np
import pandas as pd
import pytest

from onnxfair.data import load_dataset
from onnxfair.errors import DataError
from tests.conftest import linear_model


def _model():
    return linear_model(np.ones((3, 4)), np.zeros(3))


def test_npz_groups_and_intersections(tiny_linear):
    ds = load_dataset(tiny_linear["data"], tiny_linear["model"], ["race", "sex"])
    assert ds.inputs["x"].shape == (200, 4) and ds.inputs["x"].dtype == np.float32
    assert ds.group_labels == sorted(ds.group_labels)
    got = [ds.group_labels[i] for i in ds.group_ids]
    want = [f"race={r},sex={s}" for r, s in zip(tiny_linear["race"], tiny_linear["sex"])]
    assert got == want
    one = load_dataset(tiny_linear["data"], tiny_linear["model"], "race")
    assert one.group_labels == ["race=A", "race=B", "race=C"]


def test_csv_and_parquet_agree_with_npz(tiny_linear, tmp_path):
    df = pd.DataFrame(tiny_linear["x"], columns=["a", "b", "c", "d"])
    df["label"] = tiny_linear["y"]
    df["race"] = tiny_linear["race"]
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    ref = load_dataset(tiny_linear["data"], tiny_linear["model"], "race")
    for name in ("t.csv", "t.parquet"):
        ds = load_dataset(tmp_path / name, tiny_linear["model"], "race")
        np.testing.assert_allclose(ds.inputs["x"], ref.inputs["x"], rtol=1e-6)
        assert (ds.y == ref.y).all() and (ds.group_ids == ref.group_ids).all()
    # explicit feature order is honoured
    ds = load_dataset(tmp_path / "t.csv", tiny_linear["model"], "race", features=["d", "c", "b", "a"])
    np.testing.assert_allclose(ds.inputs["x"], ref.inputs["x"][:, ::-1], rtol=1e-6)


def test_integer_group_values(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32), y=np.array([0, 1, 2, 0]), g=np.array([1, 2, 1, 2]))
    ds = load_dataset(tmp_path / "d.npz", _model(), "g")
    assert ds.group_labels == ["g=1", "g=2"]


def test_image_manifest(tmp_path):
    from PIL import Image
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    rows = []
    pix = []
    for i in range(5):
        arr = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"im{i}.png")
        pix.append(arr)
        rows.append({"path": f"im{i}.png", "label": i % 2, "tone": "dark" if i == 0 else "light"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    from onnxfair.data import ImageOptions

    ds = load_dataset(tmp_path / "m.csv", model, "tone", image=ImageOptions(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    want = (np.stack(pix).astype(np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(ds.inputs["x"], want.transpose(0, 3, 1, 2), atol=1e-6)
    assert ds.group_labels == ["tone=dark", "tone=light"] and ds.y.tolist() == [0, 1, 0, 1, 0]
    (tmp_path / "im3.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot read image im3.png \(UnidentifiedImageError\); give a PNG, JPEG"):
        load_dataset(tmp_path / "m.csv", model, "tone")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"cannot read empty.csv \(EmptyDataError: .*\); give a CSV with a header row"):
        load_dataset(tmp_path / "empty.csv", model, "tone")


def test_a_manifest_takes_its_image_size_from_input_shape_and_a_clash_is_named_before_reading(tmp_path):
    """Before: with symbolic H and W, --input-shape alone gave 'pass --image-size', and an --image-size against
    a fixed size was found only after every image was read, as 'reshape the data'."""
    from PIL import Image
    from onnx import TensorProto, helper

    from onnxfair.data import ImageOptions
    from onnxfair.errors import UsageError

    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    pd.DataFrame({"path": [f"im{i}.png" for i in range(4)], "label": [0, 1, 2, 0], "tone": list("abab")}).to_csv(
        tmp_path / "m.csv", index=False)

    def model(h, w):
        graph = helper.make_graph(
            [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])],
            "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, h, w])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)

    dynamic = model("H", "W")
    by_shape = load_dataset(tmp_path / "m.csv", dynamic, "tone", input_shapes={"x": (1, 3, 6, 5)})
    by_size = load_dataset(tmp_path / "m.csv", dynamic, "tone", image=ImageOptions(size=(6, 5)))
    assert by_shape.inputs["x"].shape == (4, 3, 6, 5)
    np.testing.assert_array_equal(by_shape.inputs["x"], by_size.inputs["x"])
    with pytest.raises(UsageError, match=r"symbolic; pass --image-size H,W or --input-shape x="):
        load_dataset(tmp_path / "m.csv", dynamic, "tone")
    (tmp_path / "im3.png").unlink()  # the clash must be named before any image is read
    for m, shapes, shown in ((model(6, 5), None, "6x5"), (dynamic, {"x": (1, 3, 6, 5)}, "6x5"),
                             (model("H", 5), None, r"\?x5")):
        with pytest.raises(UsageError, match=rf"--image-size 8,8 differs from the {shown} \(H x W\) that the model or "
                                             r"--input-shape fixes for 'x'; drop --image-size"):
            load_dataset(tmp_path / "m.csv", m, "tone", image=ImageOptions(size=(8, 8)), input_shapes=shapes)


def test_sixteen_bit_grey_images_are_scaled_by_their_depth(tmp_path):
    """Before: Pillow's convert clipped 16-bit grey pixels at 255, so every image read as white (exit 0)."""
    from PIL import Image
    from onnx import TensorProto, helper

    from onnxfair.data import ImageOptions

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (4, 8, 10), dtype=np.uint8)
    for depth in (8, 16):
        rows = []
        for i, g in enumerate(grey):
            im = Image.fromarray(g) if depth == 8 else Image.fromarray(g.astype(np.uint16) * 257)
            im.save(tmp_path / f"{depth}_{i}.png")
            rows.append({"path": f"{depth}_{i}.png", "label": i % 2, "tone": "a"})
        pd.DataFrame(rows).to_csv(tmp_path / f"m{depth}.csv", index=False)
    assert Image.open(tmp_path / "16_0.png").mode.startswith("I;16")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    eight, sixteen = (load_dataset(tmp_path / f"m{d}.csv", model, "tone").inputs["x"] for d in (8, 16))
    want = np.repeat(grey[:, None].astype(np.float32) / 255, 3, axis=1)
    np.testing.assert_allclose(eight, want, atol=1e-7)
    np.testing.assert_allclose(sixteen, want, atol=1e-6)
    # resized, both depths agree to within the 8-bit rounding
    opts = ImageOptions(size=(4, 5))
    small = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 5])]
    model.graph.ClearField("input")
    model.graph.input.extend(small)
    a, b = (load_dataset(tmp_path / f"m{d}.csv", model, "tone", image=opts).inputs["x"] for d in (8, 16))
    np.testing.assert_allclose(a, b, atol=1 / 255)
    Image.fromarray(grey[0].astype(np.float32)).save(tmp_path / "f.tiff")
    pd.DataFrame([{"path": "f.tiff", "label": 0, "tone": "a"}]).to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(DataError, match="image f.tiff has floating-point pixels, whose range onnxfair cannot tell"):
        load_dataset(tmp_path / "f.csv", model, "tone")


@pytest.mark.parametrize(
    "arrays, groups, label, message",
    [
        ({"x": np.zeros((4, 5), np.float32), "y": np.zeros(4, int), "race": np.array(list("abab"))}, "race", None, "expects [N, 4]"),
        ({"x": np.zeros((4, 4), np.float32), "y": np.zeros(4, int)}, "race", None, "group array 'race' not found"),
        ({"x": np.zeros((4, 4), np.float32), "race": np.array(list("abab"))}, "race", None, "label array 'y' not found"),
        ({"inp": np.zeros((4, 4), np.float32), "y": np.zeros(4, int), "race": np.array(list("abab"))}, "race", None, "name it 'x'"),
        ({"x": np.full((4, 4), np.nan, np.float32), "y": np.zeros(4, int), "race": np.array(list("abab"))}, "race", None, "NaN"),
        ({"x": np.zeros((4, 4), np.float32), "y": np.zeros(3, int), "race": np.array(list("abab"))}, "race", None, "rows"),
    ],
)
def test_bad_npz_is_named(tmp_path, arrays, groups, label, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message.replace("[", r"\[")):
        load_dataset(tmp_path / "bad.npz", _model(), groups, label)


def test_missing_column_lists_available(tmp_path):
    pd.DataFrame({"a": [1.0], "b": [2.0], "c": [0.0], "d": [1.0], "label": [0], "sex": ["F"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="group column 'race' not found.*available: a, b, c, d, label, sex"):
        load_dataset(tmp_path / "t.csv", _model(), "race")


def test_split_is_seeded_and_stratified(tiny_linear):
    ds = load_dataset(tiny_linear["data"], tiny_linear["model"], "race")
    a1, b1 = ds.split(0.3, seed=7)
    a2, b2 = ds.split(0.3, seed=7)
    assert (b1.y == b2.y).all() and len(a1) + len(b1) == len(ds)
    for label, n in ds.group_counts().items():
        assert b1.group_counts()[label] == pytest.approx(0.3 * n, abs=1)


@pytest.mark.parametrize("y, classes, message", [
    ([0, 1, 7, 7], 3, "label 'y' has values 7 in 2 rows; class indices must be in 0..2 for a 3-class model output"),
    ([0, -1, 2, 1], 3, "label 'y' has values -1 in 1 rows; class indices must be in 0..2"),
    ([0, 1, 2, 1], 1, "label 'y' has values 2 in 1 rows; class indices must be in 0..1 for a 2-class model output"),
    ([0, -1, 5, 1], "C", "label 'y' has values -1 in 1 rows; class indices must be >= 0"),
])
def test_labels_the_model_cannot_score_are_refused(tmp_path, y, classes, message):
    from onnx import TensorProto, helper

    model = _model() if classes == 3 else linear_model(np.ones((1, 4)), np.zeros(1))
    if classes == "C":  # a symbolic class dim: only negative labels can be refused at load time
        model.graph.output[0].CopyFrom(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "C"]))
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32), y=np.array(y), g=np.array([1, 2, 1, 2]))
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path / "d.npz", model, "g")


def test_evaluation_refuses_labels_beyond_the_outputs_when_the_class_dim_is_symbolic(tmp_path):
    from onnx import TensorProto, helper

    from onnxfair.evaluate import evaluate_models

    model = _model()
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "C"]))
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32), y=np.array([0, 1, 5, 1]), g=np.array([1, 2, 1, 2]))
    ds = load_dataset(tmp_path / "d.npz", model, "g")  # 5 < C cannot be ruled out before running the model
    with pytest.raises(DataError, match="values 5 in 1 rows; class indices must be in 0..2 for a 3-class"):
        evaluate_models([model], ds, latency=False)


def test_a_table_with_an_extra_column_names_it_and_the_fix(tmp_path):
    df = pd.DataFrame(np.zeros((6, 4)), columns=list("abcd"))
    df["label"], df["race"], df["sex"] = [0, 1, 2] * 2, ["A", "B"] * 3, [0, 1] * 3
    df.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"t.csv gives 5 feature columns \(a, b, c, d, sex\), the model input 'x' takes 4; "
                                        "name the feature columns in order with --features"):
        load_dataset(tmp_path / "t.csv", _model(), "race")
    assert load_dataset(tmp_path / "t.csv", _model(), "race,sex").inputs["x"].shape == (6, 4)


def test_classes_are_read_from_the_output_as_the_losses_read_logits():
    from onnxfair.model import classes_of

    assert [classes_of(s) for s in [("N", 3), ("N", 1), ("N",), (5, 10, 1, 1), ("N", None), ("N", "C")]] == \
        [3, 2, 2, 10, None, None]


def test_an_integer_first_output_is_not_read_as_class_scores():
    from onnx import TensorProto, helper

    from onnxfair.model import class_count

    model = _model()
    assert class_count(model) == 3
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("logits", TensorProto.INT64, ["N"]))
    assert class_count(model) is None


def test_csv_reads_na_and_none_as_group_values_and_only_an_empty_cell_as_missing(tiny_linear, tmp_path):
    df = pd.DataFrame(tiny_linear["x"], columns=["a", "b", "c", "d"])
    df["label"] = tiny_linear["y"]
    df["region"] = np.where(np.arange(len(df)) % 3 == 0, "NA", np.where(np.arange(len(df)) % 3 == 1, "None", "EU"))
    df.to_csv(tmp_path / "t.csv", index=False)
    ds = load_dataset(tmp_path / "t.csv", tiny_linear["model"], "region")
    assert ds.group_labels == ["region=EU", "region=NA", "region=None"]
    assert np.bincount(ds.group_ids).tolist() == [(np.arange(len(df)) % 3 == k).sum() for k in (2, 0, 1)]
    df.loc[5, "region"] = ""
    df.to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(DataError, match="'region' is missing in 1 of 200 rows"):
        load_dataset(tmp_path / "e.csv", tiny_linear["model"], "region")


def test_csv_group_codes_are_text_not_numbers(tiny_linear, tmp_path):
    """Before: a csv group column was parsed as numbers, so the codes 01 and 1 (or 1.0 and 1) merged into one
    group with exit 0."""
    df = pd.DataFrame(tiny_linear["x"], columns=["a", "b", "c", "d"])
    df["label"] = tiny_linear["y"]
    df["zone"] = np.array(["1", "01", "1.0", "2"])[np.arange(len(df)) % 4]
    df.to_csv(tmp_path / "t.csv", index=False)
    assert "01" in (tmp_path / "t.csv").read_text()
    ds = load_dataset(tmp_path / "t.csv", tiny_linear["model"], "zone")
    assert ds.group_labels == ["zone=01", "zone=1", "zone=1.0", "zone=2"]
    assert np.bincount(ds.group_ids).tolist() == [50, 50, 50, 50]
    # a group column may also be a feature: it is read as a number there
    ds = load_dataset(tmp_path / "t.csv", _model(), "zone", features=["a", "b", "c", "zone"])
    np.testing.assert_array_equal(ds.inputs["x"][:4, 3], [1, 1, 1, 2])


def test_a_csv_group_column_can_also_be_the_label_or_a_boolean_feature(tiny_linear, tmp_path):
    """Before: every --groups column of a csv was read as text, so naming the label as a group gave 'label has
    dtype object', and a True/False column as group and feature gave 'not numeric' (parquet took both)."""
    df = pd.DataFrame(tiny_linear["x"][:, :3], columns=["a", "b", "c"])
    df["flag"] = np.arange(len(df)) % 3 == 0
    df["label"] = tiny_linear["y"]
    df["race"] = tiny_linear["race"]
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        ds = load_dataset(tmp_path / name, tiny_linear["model"], "race,label", features=["a", "b", "c", "flag"])
        np.testing.assert_array_equal(ds.y, tiny_linear["y"])
        np.testing.assert_array_equal(ds.inputs["x"][:, 3], df["flag"].to_numpy(dtype=np.float32))
        assert ds.group_labels[0] == "race=A,label=0"
        flagged = load_dataset(tmp_path / name, tiny_linear["model"], "flag", features=["a", "b", "c", "flag"])
        assert flagged.group_labels == ["flag=False", "flag=True"]
        assert np.bincount(flagged.group_ids).tolist() == [int((~df["flag"]).sum()), int(df["flag"].sum())]


def test_data_and_eval_data_in_two_formats_each_take_the_options_they_read(tiny_linear, tmp_path):
    """Before: --data and --eval-data got every data option alike, so a csv paired with an npz failed on
    --features ('drop --features'); the advice, taken for manifest options, silently left one file
    unnormalised."""
    from onnxfair.data import load_datasets
    from onnxfair.errors import UsageError

    df = pd.DataFrame(tiny_linear["x"], columns=["a", "b", "c", "d"])
    df["label"] = tiny_linear["y"]
    df["race"] = tiny_linear["race"]
    df["note"] = "x"  # a text column the model does not read: --features is needed
    df.to_csv(tmp_path / "t.csv", index=False)
    ref = load_dataset(tiny_linear["data"], tiny_linear["model"], "race")
    for order in ((tmp_path / "t.csv", tiny_linear["data"]), (tiny_linear["data"], tmp_path / "t.csv")):
        got = load_datasets(list(order), tiny_linear["model"], "race", features=["a", "b", "c", "d"])
        for ds in got:
            np.testing.assert_allclose(ds.inputs["x"], ref.inputs["x"], rtol=1e-6)
            assert (ds.y == ref.y).all() and (ds.group_ids == ref.group_ids).all()
    assert load_datasets([tiny_linear["data"], None], tiny_linear["model"], "race")[1] is None
    with pytest.raises(UsageError, match="--features names table columns, and .* is an npz"):  # read by no file
        load_datasets([tiny_linear["data"], tiny_linear["data"]], tiny_linear["model"], "race", features=["a"])
    with pytest.raises(DataError, match=r"label array 'label' not found in .*; available: .* \(--label names the "
                                        r"label in every data file given\)"):
        load_datasets([tmp_path / "t.csv", tiny_linear["data"]], tiny_linear["model"], "race", label="label",
                      features=["a", "b", "c", "d"])


def test_a_manifest_paired_with_an_npz_takes_the_image_options_alone(tmp_path):
    from PIL import Image
    from onnx import TensorProto, helper

    from onnxfair.data import ImageOptions, load_datasets

    pix = np.random.default_rng(0).integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    for i, arr in enumerate(pix):
        Image.fromarray(arr).save(tmp_path / f"im{i}.png")
    pd.DataFrame({"path": [f"im{i}.png" for i in range(4)], "label": [0, 1, 2, 0], "tone": list("abab")}).to_csv(
        tmp_path / "m.csv", index=False)
    ready = ((pix.astype(np.float32) / 255 - 0.5) / 0.25).transpose(0, 3, 1, 2)
    np.savez(tmp_path / "e.npz", x=ready, y=np.array([0, 1, 2, 0]), tone=np.array(list("abab")))
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    calib, held = load_datasets([tmp_path / "m.csv", tmp_path / "e.npz"], model, "tone",
                                image=ImageOptions(mean=(0.5,), std=(0.25,)))
    np.testing.assert_allclose(calib.inputs["x"], held.inputs["x"], atol=1e-6)


def test_a_column_vector_label_is_taken_and_one_hot_labels_get_the_fix(tmp_path):
    """Before: a label of shape [N, 1] was refused although group arrays of that shape are taken, and one-hot
    rows got no hint of the fix."""
    x = np.zeros((4, 4), np.float32)
    np.savez(tmp_path / "col.npz", x=x, y=np.array([[0], [1], [2], [0]]), g=np.array(list("abab")))
    assert load_dataset(tmp_path / "col.npz", _model(), "g").y.tolist() == [0, 1, 2, 0]
    np.savez(tmp_path / "hot.npz", x=x, y=np.eye(3)[[0, 1, 2, 0]], g=np.array(list("abab")))
    with pytest.raises(DataError, match=r"one row of 3 values per sample; .*save y.argmax\(1\)"):
        load_dataset(tmp_path / "hot.npz", _model(), "g")
    np.savez(tmp_path / "row.npz", x=x, y=np.array([[0, 1, 2, 0]]), g=np.array(list("abab")))
    with pytest.raises(DataError, match=r"one row holding every sample's label; .*save y.ravel\(\)"):
        load_dataset(tmp_path / "row.npz", _model(), "g")


def test_pillows_own_warnings_on_odd_images_stay_off_stderr(tmp_path, recwarn):
    """Before: a palette PNG whose transparency is stored as bytes printed Pillow's two-line UserWarning."""
    from PIL import Image
    from onnx import TensorProto, helper

    for i in range(2):
        im = Image.fromarray(np.arange(24, dtype=np.uint8).reshape(4, 6) % 4).convert("P")
        im.info["transparency"] = bytes([0, 128] + [255] * 14)
        im.save(tmp_path / f"p{i}.png", transparency=bytes([0, 128] + [255] * 14))
    pd.DataFrame({"path": ["p0.png", "p1.png"], "label": [0, 1], "g": ["a", "b"]}).to_csv(tmp_path / "m.csv", index=False)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    assert load_dataset(tmp_path / "m.csv", model, "g").inputs["x"].shape == (2, 3, 4, 6)
    assert not [w for w in recwarn if "PIL" in w.filename or "Palette" in str(w.message)]


def test_intersections_that_would_read_the_same_are_refused(tiny_linear, tmp_path):
    """Before: values holding ',' and '=' made two different intersections one group (exit 0)."""
    df = pd.DataFrame(tiny_linear["x"], columns=["a", "b", "c", "d"])
    df["label"] = tiny_linear["y"]
    odd = np.arange(len(df)) % 2 == 1
    df["race"] = np.where(odd, "x,sex=F", "x")
    df["sex"] = np.where(odd, "M", "F,sex=M")
    df.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="both read as 'race=x,sex=F,sex=M'; remove ',' and '=' from the group values"):
        load_dataset(tmp_path / "t.csv", tiny_linear["model"], "race,sex", features=["a", "b", "c", "d"])


def test_features_refuse_the_label_and_repeated_columns_but_not_a_group_column(tiny_linear, tmp_path):
    df = pd.DataFrame(tiny_linear["x"], columns=["a", "b", "c", "d"])
    df["label"] = tiny_linear["y"]
    df["race"] = tiny_linear["race"]
    df["flag"] = (tiny_linear["race"] == "A").astype(float)
    df.to_csv(tmp_path / "t.csv", index=False)
    m = tiny_linear["model"]
    with pytest.raises(DataError, match="includes the label column 'label'"):
        load_dataset(tmp_path / "t.csv", m, "race", features=["a", "b", "c", "label"])
    with pytest.raises(DataError, match="--features names a more than once"):
        load_dataset(tmp_path / "t.csv", m, "race", features=["a", "a", "c", "d"])
    ds = load_dataset(tmp_path / "t.csv", m, "flag", features=["a", "b", "c", "flag"])  # a group may be a feature
    np.testing.assert_array_equal(ds.inputs["x"][:, 3], df["flag"].to_numpy(np.float32))


def test_groups_named_twice_are_refused(tiny_linear):
    from onnxfair.errors import UsageError

    with pytest.raises(UsageError, match="--groups names race more than once"):
        load_dataset(tiny_linear["data"], tiny_linear["model"], "race,race")


def test_options_the_data_format_would_not_read_are_refused(tiny_linear, tmp_path):
    from onnxfair.data import ImageOptions
    from onnxfair.errors import UsageError

    m = tiny_linear["model"]
    with pytest.raises(UsageError, match="--features names table columns, and .* is an npz"):
        load_dataset(tiny_linear["data"], m, "race", features=["a", "b", "c", "d"])
    with pytest.raises(UsageError, match="apply to image manifests, and .* is an npz"):
        load_dataset(tiny_linear["data"], m, "race", image=ImageOptions(mean=(0.5,)))
    load_dataset(tiny_linear["data"], m, "race", image=ImageOptions())  # the defaults are never in the way
    df = pd.DataFrame(tiny_linear["x"], columns=["a", "b", "c", "d"])
    df["label"], df["race"] = tiny_linear["y"], tiny_linear["race"]
    df.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(UsageError, match=r"is read as a table \(it has no 'path' column\); drop them"):
        load_dataset(tmp_path / "t.csv", m, "race", image=ImageOptions(size=(8, 8)))


def test_no_output_may_overwrite_an_image_the_manifest_lists(tmp_path):
    """Before: --json imgs/0.png replaced the image with JSON (exit 0) and the data set was broken."""
    import subprocess
    import sys

    from PIL import Image

    from tests.conftest import FIXTURES

    MLP = FIXTURES / "adult_mlp.onnx"  # any model: the refusal comes before it is read

    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "imgs" / "0.png")
    pd.DataFrame([{"path": "imgs/0.png", "label": 0, "tone": "a"}]).to_csv(tmp_path / "m.csv", index=False)
    before = (tmp_path / "imgs" / "0.png").read_bytes()
    for args in (["evaluate", MLP, "--data", tmp_path / "m.csv", "--groups", "tone", "--json", tmp_path / "imgs/0.png"],
                 ["prune", MLP, "--data", tmp_path / "m.csv", "--groups", "tone", "--sparsity", "0.5",
                  "-o", tmp_path / "x.onnx", "--report", tmp_path / "imgs" / ".." / "imgs" / "0.png"]):
        r = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().endswith(f"is an image listed in the input --data {tmp_path / 'm.csv'}; refusing to "
                                         "overwrite it, choose another path"), r.stderr
    assert (tmp_path / "imgs" / "0.png").read_bytes() == before
