"""The spine every command shares, tested directly (fast): phase specs, trajectory sources, the command lifecycle,
a fit resolved before the teacher loads, and the run-directory reader."""

import json
import warnings

import numpy as np
import pytest
import torch

from clirun import one_error_line
from raptor import cli
from raptor.data.sources import open_source
from raptor.errors import RaptorError
from raptor.lifecycle import command_run
from raptor.phases import PhaseSpec, equal_phases
from raptor.store import extract
from raptor.surrogate.config import FitConfig
from raptor.surrogate.fit import resolve_fit
from raptor.surrogate.run_dir import FitRun
from raptor.teachers.hf import build_tiny_teacher
from raptor.trajectories import LiveTrajectories, StoreTrajectories


@pytest.mark.parametrize("text, k, fields", [
    ("1-7/8-12", None, {"phases": [list(range(1, 8)), list(range(8, 13))], "phases_file": None, "k": None,
                        "phase_method": "dp"}),
    ("1,3,5/2,4,6", 2, {"phases": [[1, 3, 5], [2, 4, 6]], "phases_file": None, "k": 2, "phase_method": "dp"}),
    ("[[1,2],[3]]", None, {"phases": [[1, 2], [3]], "phases_file": None, "k": None, "phase_method": "dp"}),
    ("equal", 3, {"phases": None, "phases_file": None, "k": 3, "phase_method": "equal"}),
    (None, 4, {"phases": None, "phases_file": None, "k": 4, "phase_method": "dp"}),
    ("runs/a/analysis.json", None, {"phases": None, "phases_file": "runs/a/analysis.json", "k": None,
                                    "phase_method": "dp"}),
])
def test_a_phase_spec_is_parsed_once_into_the_config_fields(text, k, fields):
    spec = PhaseSpec.parse(text, k)
    assert spec.fields() == fields
    assert PhaseSpec.of(FitConfig(**spec.fields())) == spec  # a config stores it flat and gives it back


def test_a_phase_spec_resolves_against_the_teacher_depth_and_refuses_what_does_not_fit(tmp_path):
    assert PhaseSpec.parse("equal", 3).resolve(12) == equal_phases(12, 3)
    assert PhaseSpec.parse("1-2/3").resolve(3) == [[1, 2], [3]]
    assert PhaseSpec(k=2).from_data and PhaseSpec(k=2).resolve(3, lambda k: [[1], [2, 3]]) == [[1], [2, 3]]
    (tmp_path / "p.json").write_text(json.dumps([[1, 3], [2]]))
    file_spec = PhaseSpec.parse(str(tmp_path / "p.json"))
    assert file_spec.count() == 2 and file_spec.resolve(3) == [[1, 3], [2]]
    for spec, needle in ((PhaseSpec.parse("1-2/4"), "cover layers 1..3"), (PhaseSpec(k=5), "1..3"),
                         (PhaseSpec(), "give phases")):
        with pytest.raises(RaptorError, match=needle):
            spec.resolve(3, (lambda k: equal_phases(3, k)) if spec.k else None)
    for spec, needle in ((PhaseSpec(method="equal"), "needs k"), (PhaseSpec(k=2, method="ward"), "phase method"),
                         (PhaseSpec([[1], []]), "non-empty"), (PhaseSpec([[1], [2]], k=3), "contradicts")):
        with pytest.raises(RaptorError, match=needle):
            spec.check()


def test_store_and_live_trajectories_yield_the_same_batches_and_records(tmp_path):
    teacher = build_tiny_teacher("dinov2")
    images = open_source("bundled:lfw").subset(10, 1, "random")
    extract(teacher, images, tmp_path / "s", chunk_images=4, progress=False)
    store = StoreTrajectories.open(tmp_path / "s", command="test", limit=10, every_layer=True,
                                   teacher_spec=teacher.spec)
    live = LiveTrajectories(teacher, images)
    assert len(store) == len(live) == 10 and store.depth == live.depth == teacher.depth
    assert store.layout.to_dict() == live.layout.to_dict()
    layers = [1, 3]
    a = list(store.batches(4, layers))
    b = [x._replace(traj=x.traj.clone()) for x in live.batches(4, layers)]  # a live batch is a reused buffer
    assert [x.traj.shape for x in a] == [x.traj.shape for x in b] == [(4, 2, 5, 32), (4, 2, 5, 32), (2, 2, 5, 32)]
    for x, y in zip(a, b):  # the store holds bf16 rows: equal to the live pass up to bf16 rounding
        assert torch.allclose(x.traj, y.traj, rtol=1e-2, atol=1e-2)
        assert np.array_equal(x.labels, y.labels)
    assert store.describe(10)["source"] == "store" and live.describe(10)["source"] == "live"
    with pytest.raises(RaptorError, match="lacks layers"):
        list(StoreTrajectories(store.store).batches(4, [7]))
    with pytest.raises(RaptorError, match="was made with tiny:dinov2, not hf:x"):
        StoreTrajectories.open(tmp_path / "s", command="test", teacher_spec="hf:x")


def test_command_run_claims_stages_and_moves_the_results_in_only_on_success(tmp_path):
    out = tmp_path / "out"
    with command_run(out, final="result.json") as run:
        assert run.dist.world == 1 and run.device is None and run.stage != out
        (run.stage / "other.txt").write_text("x")
        (run.stage / "result.json").write_text("{}")
    assert (out / "result.json").is_file() and (out / "other.txt").is_file()
    failed = tmp_path / "failed"
    with pytest.raises(ValueError):
        with command_run(failed, final="result.json") as run:
            (run.stage / "result.json").write_text("{}")
            raise ValueError("the run failed")
    assert not (failed / "result.json").exists()


def test_a_fit_is_resolved_before_the_teacher_loads(tmp_path):
    cfg = FitConfig(teacher="tiny:dinov2", data="bundled:digits", limit=40, phases=[[1, 2], [3]], val_images=16,
                    out=str(tmp_path / "f"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hold-out warning waits until the run is claimed
        plan = resolve_fit(cfg)
    assert len(plan.train_pos) + len(plan.val_pos) == 40 and len(plan.val_pos) == 8
    assert not set(plan.train_pos) & set(plan.val_pos) and plan.n_blocks == 2
    assert plan.warnings and "only 8 of 40 images held out" in plan.warnings[0]
    with pytest.raises(RaptorError, match="too few"):
        resolve_fit(FitConfig(teacher="tiny:dinov2", data="bundled:digits", limit=4, k=2, out=str(tmp_path / "g")))


def test_the_run_folder_reader_refuses_what_is_not_a_finished_run(tmp_path):
    with pytest.raises(RaptorError, match="not found"):
        FitRun(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    run = FitRun(tmp_path / "empty")
    assert not run.finished and not run.has_weights
    with pytest.raises(RaptorError, match="no surrogate.json"):
        run.surrogate_config
    with pytest.raises(RaptorError, match="surrogate x is not a finished raptor fit run"):
        run.require_weights("--surrogate x")
    (tmp_path / "empty" / "surrogate.json").write_text("{not json")
    with pytest.raises(RaptorError, match="is damaged"):
        run.teacher_spec


def test_errors_name_options_as_the_caller_spells_them(tmp_path, capsys):
    """One message, two readers: a Python caller reads keywords (``val_data``), the raptor command reads flags
    (``--val-data``); flags of other programs quoted in a message (pip's ``--no-deps``) are left alone."""
    from raptor.errors import cli_messages, python_spelling
    from raptor.surrogate.config import FitConfig
    from raptor.surrogate.fit import run_fit

    with pytest.raises(RaptorError) as caught:
        run_fit(FitConfig(teacher="tiny:dinov2", k=2, val_crops=3, out=str(tmp_path / "x")), progress=False)
    assert str(caught.value) == "val_crops needs val_data (crops of whole held-out photos)"
    with cli_messages():
        assert "--val-crops needs --val-data" in str(caught.value)
    assert python_spelling("pip install --no-deps x; lower --batch-size or --lr") == \
        "pip install --no-deps x; lower batch_size or lr"
    capsys.readouterr()
    argv = ["fit", "--teacher", "tiny:dinov2", "--data", "bundled:digits", "--k", "2", "--val-crops", "3"]
    assert cli.run(argv + ["--out", str(tmp_path / "y")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == "error: --val-crops needs --val-data (crops of whole held-out photos)"
    assert str(caught.value).startswith("val_crops")  # the CLI's run changed nothing for Python callers
