"""Settings a run could not honour are refused before any work: options it would not read, a device it lacks."""

import dataclasses

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cli.main import app
from cli.prune import prune as prune_command
from cli.risk import risk as risk_command
from onnxfair import settings
from onnxfair.data import load_dataset
from onnxfair.errors import RuntimeUnavailableError, UsageError
from onnxfair.model import initializer_arrays
from onnxfair.prune import READ_BY, PruneConfig, prune_model
from onnxfair.risk import RISK_READ_BY, RiskConfig
from onnxfair.sweep import DataSpec, SweepPlan, expand
from tests.conftest import FIXTURES

MLP = FIXTURES / "adult_mlp.onnx"
CAL = FIXTURES / "adult_calib.npz"

# a field moved from its default, and a base configuration that never reads it
UNREAD = {
    "damping": ({"method": "taylor"}, 10.0),
    "bilevel_steps": ({"method": "fairgrape"}, 50),
    "bilevel_alpha": ({"method": "fairgrape"}, 0.5),
    "loss": ({"method": "magnitude"}, "pw"),
    "beta": ({"method": "taylor"}, 0.5),
    "gamma": ({"method": "taylor", "finetune_epochs": 1}, 2.0),
    "finetune_loss": ({"method": "taylor"}, "balanced"),
    "finetune_lr": ({"method": "taylor", "iterations": 2}, 1e-2),
    "finetune_eps": ({"method": "taylor", "finetune_epochs": 1, "finetune_loss": "equalized"}, 0.1),
    "finetune_patience": ({"method": "taylor", "iterations": 2}, 1),
    "step_epochs": ({"method": "taylor", "finetune_epochs": 1}, 2),
    "round_to": ({"method": "taylor", "structured": False}, 4),
    "sparse_storage": ({"method": "taylor", "structured": True}, True),
    "latency_batch": ({"method": "taylor", "latency": False}, 8),
}
# the same field read: the base that reads it
READ = {
    "damping": {"method": "fairgrape"},
    "bilevel_steps": {"method": "bilevel"},
    "bilevel_alpha": {"method": "bilevel"},
    "loss": {"method": "conflict"},
    "beta": {"method": "magnitude", "finetune_epochs": 1, "finetune_loss": "pw"},
    "gamma": {"method": "taylor", "loss": "pw"},
    "finetune_loss": {"method": "magnitude", "iterations": 2, "step_epochs": 1},
    "finetune_lr": {"method": "magnitude", "finetune_epochs": 1},
    "finetune_eps": {"method": "magnitude", "finetune_epochs": 1, "finetune_loss": "ceag"},
    "finetune_patience": {"method": "magnitude", "finetune_epochs": 1},
    "step_epochs": {"method": "magnitude", "iterations": 2},
    "round_to": {"method": "magnitude", "structured": True},
    "sparse_storage": {"method": "magnitude", "structured": False},
    "latency_batch": {"method": "magnitude", "latency": True},
}


def test_the_tables_cover_every_rule():
    assert set(UNREAD) == set(READ) == set(READ_BY)


@pytest.mark.parametrize("name", sorted(READ_BY))
def test_a_moved_setting_is_refused_only_where_nothing_reads_it(name):
    base, value = UNREAD[name]
    unread = PruneConfig(sparsity=0.5, **base, **{name: value})
    assert unread.unused_settings() == [name]
    option = READ_BY[name][0]
    with pytest.raises(UsageError, match=rf"^{option}.* has no effect on this run: only .* reads it; drop {option}$"):
        unread.validate(has_data=True)
    PruneConfig(sparsity=0.5, **READ[name], **{name: value}).validate(has_data=True)
    PruneConfig(sparsity=0.5, **base).validate(has_data=True)  # at its default it is never in the way


def test_the_message_names_every_unused_setting():
    cfg = PruneConfig(method="magnitude", sparsity=0.5, loss="pw", bilevel_steps=5, structured=False, round_to=2)
    with pytest.raises(UsageError) as err:
        cfg.validate(has_data=False)
    assert str(err.value) == ("--bilevel-steps 5 has no effect on this run: only the bilevel method reads it; drop "
                              "--bilevel-steps (and 2 more: --loss, --round-to)")


def test_prune_options_default_to_the_config_defaults():
    # "moved from its default" must mean the same on the command line as in the library
    defaults = {f.name: f.default for f in dataclasses.fields(PruneConfig)}
    ctx = click.Context(prune_command)  # get_default: a flag's raw `default` is a sentinel in newer click
    checked = 0
    for param in prune_command.params:
        if param.name in READ_BY:
            assert param.get_default(ctx) == defaults[param.name], param.name
            checked += 1
    assert checked == len(READ_BY)


def _weights(cfg: PruneConfig, model, calib) -> dict[str, np.ndarray]:
    return initializer_arrays(prune_model(model, calib, calib, cfg).model)


def test_refused_settings_would_not_have_changed_the_result(monkeypatch):
    # the rule's premise, checked by running anyway: with validation bypassed, every refused setting leaves the
    # pruned weights bit for bit as they are at its default (a field the run does read would change them)
    monkeypatch.setattr(PruneConfig, "unused_settings", lambda self: [])
    model = onnx.load(MLP)
    calib = load_dataset(CAL, model, ["race"])
    base = dict(method="magnitude", structured=False, sparsity=0.5, latency=False, threads=1)
    reference = _weights(PruneConfig(**base), model, calib)
    for name in READ_BY:
        if name in ("sparse_storage", "damping"):  # damping: the scorer itself refuses it for other criteria
            continue
        moved = _weights(PruneConfig(**base, **{name: UNREAD[name][1]}), model, calib)
        assert all(np.array_equal(moved[k], v) for k, v in reference.items()), name
    structured = dict(base, structured=True)
    a = _weights(PruneConfig(**structured), model, calib)
    b = _weights(PruneConfig(**structured, sparse_storage=True), model, calib)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # and a read setting does change it: the check can fail
    read = _weights(PruneConfig(**dict(base, method="taylor")), model, calib)
    assert not all(np.array_equal(read[k], v) for k, v in reference.items())


def test_prune_refuses_an_unused_option_in_one_line(tmp_path):
    r = CliRunner().invoke(app, ["prune", str(MLP), "--method", "magnitude", "--unstructured", "--sparsity", "0.5",
                                 "--round-to", "4", "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        "error: --round-to 4 has no effect on this run: only structured pruning (--unstructured zeroes single weights) "
        "reads it; drop --round-to"]
    assert not (tmp_path / "x.onnx").exists()


def _plan(tmp_path, methods, **base):
    return SweepPlan(model="m.onnx", data=DataSpec(data="d.npz", eval_data=None, groups=["race"]), out=tmp_path,
                     methods=methods, sparsities=(0.5,), base=PruneConfig(**base))


def test_sweep_gives_a_method_setting_to_the_runs_that_read_it(tmp_path):
    runs = expand(_plan(tmp_path, ("magnitude", "taylor", "bilevel"), loss="pw", beta=0.5, bilevel_steps=7))
    got = {r.cfg.method: (r.cfg.loss, r.cfg.beta, r.cfg.bilevel_steps) for r in runs}
    assert got == {"magnitude": ("ce", 0.75, 200), "taylor": ("pw", 0.5, 200), "bilevel": ("pw", 0.5, 7)}


def test_sweep_refuses_a_setting_no_run_reads(tmp_path):
    with pytest.raises(UsageError, match="^--bilevel-alpha 2 has no effect on any run of this sweep: only the bilevel method"):
        expand(_plan(tmp_path, ("magnitude", "taylor"), bilevel_alpha=2.0))
    with pytest.raises(UsageError, match="^--round-to 16 has no effect on any run of this sweep"):
        expand(_plan(tmp_path, ("magnitude", "taylor"), structured=False, round_to=16))


@pytest.mark.parametrize("moved, read_with", [
    ({"structured": False, "round_to": 4}, {"structured": True, "round_to": 4}),
    ({"beta": 0.5}, {"loss": "pw", "beta": 0.5}),
    ({"gamma": 2.0}, {"loss": "pw", "gamma": 2.0}),
    ({"hutchinson_samples": 0, "seed": 3}, {"hutchinson_samples": 1, "seed": 3}),
])
def test_risk_refuses_what_its_pre_check_would_not_read(moved, read_with):
    option = RISK_READ_BY[[k for k in moved if k in RISK_READ_BY][0]][0]
    with pytest.raises(UsageError, match=rf"^{option} .*has no effect on this pre-check: .*; drop {option}$"):
        RiskConfig(**moved).check()
    RiskConfig(**read_with).check()


def test_risk_options_default_to_the_config_defaults():
    defaults = settings.defaults(RiskConfig)
    names = {p.name for p in risk_command.params} & set(RISK_READ_BY)
    assert names == set(RISK_READ_BY)
    ctx = click.Context(risk_command)
    assert all(p.get_default(ctx) == defaults[p.name] for p in risk_command.params if p.name in RISK_READ_BY)


def test_risk_refuses_before_reading_the_model(tmp_path):
    missing = tmp_path / "absent.onnx"  # a settings error comes first, alone
    r = CliRunner().invoke(app, ["risk", str(missing), "--data", str(CAL), "--groups", "race", "--beta", "0.5"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        "error: --beta 0.5 has no effect on this pre-check: only --loss pw reads it; drop --beta"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_refused_before_any_run(tmp_path):
    with pytest.raises(RuntimeUnavailableError, match="torch sees no CUDA GPU"):
        PruneConfig(method="magnitude", sparsity=0.5, device="cuda").validate(has_data=False)
    r = CliRunner().invoke(app, ["sweep", str(MLP), "--data", str(CAL), "--groups", "race", "--methods", "magnitude",
                                 "--sparsities", "0.5", "--device", "cuda", "--out", str(tmp_path / "sw")])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: --device cuda asked for, but torch sees no CUDA GPU; use --device cpu"]
    assert not (tmp_path / "sw").exists()  # refused before the output folder is made
