"""Central property: the physically pruned model equals the masked dense model in onnxruntime.

Architectures: torch models exported by the legacy exporter at opsets 11/13/17 and by the dynamo
exporter, plus the committed fixtures when present. Keep-sets are random (seeded).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxfair.graph import analyze, mask_channels, model_cost, prune_channels, round_keep
from tests.test_graph_support import (
    check_prune_equals_mask,
    ort_run,
    random_feeds,
    random_keep,
    torch_export,
    torch_models,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FIXTURE_FILES = [
    "adult_mlp.onnx", "adult_mlp.legacy.onnx", "resnet_digits.onnx", "resnet_digits.legacy.onnx",
    "mobilenet_digits.onnx", "mobilenet_digits.legacy.onnx",
]

CASES = [(name, 13, False) for name in ("resnet", "mobile", "branches", "flat", "mlp", "tokens", "dense")]
CASES += [("resnet", 11, False), ("branches", 11, False), ("flat", 11, False), ("flat", 17, False),
          ("mobile", 17, False), ("branches", 17, False), ("mobile", 18, True), ("upsample", 9, False),
          ("upsample", 13, False)]


DECLINED = [("shuffle", 13, False), ("attention", 13, False)]


@pytest.fixture(scope="module")
def exported() -> dict:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    models = torch_models()
    out = {}
    for name, opset, dynamo in CASES + DECLINED:
        module, example = models[name]
        out[(name, opset, dynamo)] = torch_export(module, example, opset=opset, dynamo=dynamo)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-op{c[1]}{'-dynamo' if c[2] else ''}")
def test_pruned_equals_masked_on_exported_models(exported, case):
    model = exported[case]
    an = analyze(model)
    assert an.groups, "every test architecture has prunable channels"
    feeds = random_feeds(an.model, batch=3, seed=1)
    dense = ort_run(model, feeds)[0]
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    changed = False
    for _ in range(3):
        keep = random_keep(an, rng)
        check_prune_equals_mask(an, keep, feeds)
        changed |= not np.allclose(ort_run(mask_channels(an, keep), feeds)[0], dense, atol=1e-6)
    assert changed, "random keep-sets must change the model (else the comparison proves nothing)"


EXPECTED_GROUPS = {
    # residual stages: stem+stage1, stage2, stage3 each one coupled group, plus the inner conv of each block
    "resnet": 4,
    "mobile": 4,
    "branches": 6,
    "mlp": 2,
    "dense": 4,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_GROUPS))
def test_group_counts_and_couplings(exported, name):
    an = analyze(exported[(name, 13, False)])
    assert len(an.groups) == EXPECTED_GROUPS[name]
    # the classifier output is never prunable
    assert any("graph output" in f["reason"] for f in an.frozen)
    d = json.loads(json.dumps(an.to_dict()))
    assert [g["id"] for g in d["groups"]] == list(range(len(an.groups)))
    assert all(0 < g["macs_share"] <= 1 and 0 < g["params_share"] <= 1 for g in d["groups"])


def test_residual_couples_all_adds(exported):
    an = analyze(exported[("resnet", 13, False)])
    dims = {i.name: tuple(i.dims) for i in an.model.graph.initializer}

    def conv_producers(g):
        return sorted(m.initializer for m in g.producers() if len(dims[m.initializer]) == 4)

    # stem conv and block-1 second conv feed one residual Add; block-2 second conv and its 1x1 shortcut too
    by_size = {}
    for g in an.groups:
        by_size.setdefault(g.size, []).append(len(conv_producers(g)))
    assert sorted(by_size[8]) == [1, 2] and sorted(by_size[16]) == [1, 2]


def test_depthwise_and_se_are_coupled(exported):
    an = analyze(exported[("mobile", 13, False)])
    expand = next(g for g in an.groups if g.size == 32)
    roles = {m.role for m in expand.members}
    assert roles == {"producer", "param", "consumer"}  # depthwise weights are pass-through params
    dw = [n for n in an.model.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i == 32
                                                                        for a in n.attribute)]
    assert dw
    keep = {expand.id: np.arange(0, 32, 2)}
    pruned = prune_channels(an, keep)
    groups = [a.i for n in pruned.graph.node for a in n.attribute if n.op_type == "Conv" and a.name == "group"]
    assert 16 in groups and 32 not in groups


def test_keep_all_is_identity(exported):
    model = exported[("branches", 13, False)]
    an = analyze(model)
    pruned = prune_channels(an, {})
    feeds = random_feeds(model, seed=3)
    np.testing.assert_allclose(ort_run(pruned, feeds)[0], ort_run(model, feeds)[0], rtol=1e-5, atol=1e-6)
    assert model_cost(pruned).params == model_cost(model).params


def test_half_channels_round8_reduces_macs(exported):
    an = analyze(exported[("mobile", 13, False)])
    keep = {g.id: np.arange(round_keep(round(0.5 * g.size), g.size, 8)) for g in an.groups}
    pruned = check_prune_equals_mask(an, keep, random_feeds(an.model, seed=4))
    dense, small = model_cost(an.model), model_cost(pruned)
    assert small.macs < 0.6 * dense.macs and small.params < dense.params and small.bytes < dense.bytes


@pytest.mark.parametrize("fname", FIXTURE_FILES)
def test_fixture_files(fname):
    path = FIXTURES / fname
    if not path.exists():
        pytest.skip(f"{fname} not built")
    model = onnx.load(str(path))
    an = analyze(model)
    assert an.groups
    feeds = random_feeds(an.model, batch=2, seed=5)
    rng = np.random.default_rng(7)
    for frac in (None, 0.5):
        check_prune_equals_mask(an, random_keep(an, rng, frac), feeds)


@pytest.mark.parametrize("case", DECLINED, ids=lambda c: c[0])
def test_channel_mixing_models_are_declined(exported, case):
    an = analyze(exported[case])
    assert an.groups == []
    reasons = " ".join(f["reason"] for f in an.frozen)
    assert ("mixes the channel axis" in reasons) if case[0] == "shuffle" else ("two computed tensors" in reasons)
