"""Non-contiguous phases (the paper's shuffled-partition control): parsing, runs, and training, evaluation and splicing
checked against the contiguous path where the two must coincide."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from raptor.errors import RaptorError
from raptor.phases import format_phases, parse_phases, phase_runs, validate_phases
from raptor.surrogate.batches import step_generator
from raptor.surrogate.block import BlockConfig
from raptor.surrogate.config import FitConfig
from raptor.surrogate.model import RaptorModel, SurrogateConfig
from raptor.surrogate.train import WorkItem, item_loss, plan
from raptor.teachers.base import TokenLayout

DIM, T = 16, 5
LAYOUT = TokenLayout(n_cls=1, n_registers=0, grid=(2, 2))


def _model(phases, seed=0):
    torch.manual_seed(seed)
    return RaptorModel(SurrogateConfig([list(p) for p in phases], BlockConfig(dim=DIM, num_heads=1)))


def test_parse_validate_runs_and_format():
    assert parse_phases("1,3,5/2,4,6") == [[1, 3, 5], [2, 4, 6]]
    assert parse_phases("1-3,7/4-6") == [[1, 2, 3, 7], [4, 5, 6]]
    assert parse_phases("1-7/8-12") == [list(range(1, 8)), list(range(8, 13))]  # the contiguous form is unchanged
    assert validate_phases([[1, 3, 5], [2, 4, 6]], 6) == [[1, 3, 5], [2, 4, 6]]
    for bad in ([[1, 2], [2, 3]], [[1], [3]], [[3, 1], [2]], [[1, 2, 3], []]):  # overlap, gap, order, empty
        with pytest.raises(RaptorError, match="phases must cover layers 1..3 exactly once"):
            validate_phases(bad, 3)
    with pytest.raises(RaptorError, match="runs backwards"):
        parse_phases("1,5-3/2,4")
    assert phase_runs([[1, 2, 3], [4, 5]]) == [(0, 3, 0), (3, 5, 1)]  # contiguous: one run per phase
    assert phase_runs([[1, 3, 5], [2, 4, 6]]) == [(0, 1, 0), (1, 2, 1), (2, 3, 0), (3, 4, 1), (4, 5, 0), (5, 6, 1)]
    assert phase_runs([[1, 2, 5, 6], [3, 4]]) == [(0, 2, 0), (2, 4, 1), (4, 6, 0)]
    assert format_phases([[1, 3, 5], [2, 4, 6]]) == "{1,3,5} / {2,4,6}"
    assert format_phases([[1, 2, 3], [4], [5, 6]]) == "1–3 / 4 / 5–6"


def test_the_rollout_uses_each_layers_block():
    """The full rollout of [[1,2,5,6],[3,4]] equals the contiguous model [[1,2],[3,4],[5,6]] whose first and last
    blocks share weights: block 0 for layers 1, 2, 5, 6 and block 1 for 3, 4."""
    nc = _model([[1, 2, 5, 6], [3, 4]])
    ref = _model([[1, 2], [3, 4], [5, 6]], seed=1)
    for b_ref, b_nc in ((0, 0), (1, 1), (2, 0)):
        ref.blocks[b_ref].load_state_dict(nc.blocks[b_nc].state_dict())
    x = torch.randn(3, T, DIM)
    with torch.no_grad():
        for a, b in zip(nc(x), ref(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("step", [0, 5, 10])  # teacher forcing, half annealed, autoregressive within each run
def test_stage1_loss_of_a_non_contiguous_block_equals_its_runs_trained_as_contiguous_segments(step):
    """Stage 1 of block 0 in [[1,2,5,6],[3,4]] is the layer-weighted mean of the contiguous stage-1 losses of its
    two runs (0 -> 2 and 4 -> 6), each rolled out from the teacher's layer before it, with the same weights; so are
    the gradients. This pins the non-contiguous path to the contiguous one, which the paper's trainer defines."""
    nc = _model([[1, 2, 5, 6], [3, 4]])
    ref = _model([[1, 2], [3, 4], [5, 6]], seed=1)
    for b_ref in (0, 2):
        ref.blocks[b_ref].load_state_dict(nc.blocks[0].state_dict())
    cfg = FitConfig(loss_norm="none", tf_anneal_frac=1.0, steps1=10)
    items = plan(dataclass_replace(cfg, stage="1"), nc)
    assert [(i.start, i.end, i.layers) for i in items] == [(0, 6, (1, 2, 5, 6)), (2, 4, None)]
    traj = torch.randn(4, 7, T, DIM)
    gen = step_generator(0, torch.device("cpu"))
    loss = item_loss(nc, items[0], traj, step, cfg, LAYOUT, gen)
    assert items[0].weights == cfg.stage1_last_weights  # block 0 produces the last layer
    parts = [item_loss(ref, WorkItem(f"stage1/block{b}", 1, b, s, e, 10, items[0].weights), traj[:, s:e + 1], step,
                       cfg, LAYOUT, gen) for b, (s, e) in ((0, (0, 2)), (2, (4, 6)))]
    torch.testing.assert_close(loss, (2 * parts[0] + 2 * parts[1]) / 4, rtol=1e-6, atol=1e-7)
    loss.backward()
    (parts[0] + parts[1]).backward()
    g_nc = torch.cat([p.grad.flatten() for p in nc.blocks[0].parameters()])
    g_ref = torch.cat([(a.grad + b.grad).flatten() / 2 for a, b in zip(ref.blocks[0].parameters(),
                                                                       ref.blocks[2].parameters())])
    torch.testing.assert_close(g_nc, g_ref, rtol=1e-5, atol=1e-7)


def test_contiguous_phases_keep_the_contiguous_items_and_losses():
    """A contiguous partition gives the same work items (no layer list) as before, whatever order it is given in."""
    cfg = FitConfig()
    w1, w2 = cfg.stage1_last_weights, cfg.stage2_weights
    assert [(i.start, i.end, i.layers, i.weights) for i in plan(cfg, _model([[1, 2, 3], [4, 5, 6]]))] == \
        [(0, 3, None, None), (3, 6, None, w1), (0, 6, None, w2)]
    assert [(i.start, i.end, i.layers, i.weights) for i in plan(cfg, _model([[4, 5, 6], [1, 2, 3]]))] == \
        [(3, 6, None, w1), (0, 3, None, None), (0, 6, None, w2)]


def test_a_non_contiguous_fit_runs_end_to_end_and_reports_per_run_scores(tmp_path):
    """raptor fit with odd/even phases on a tiny teacher: trains, validates (per-block scores over each run cover
    every layer), splices per run, and writes phases in its outputs."""
    from raptor.surrogate.fit import run_fit
    from raptor.surrogate.run_dir import FitRun
    from raptor.teachers.hf import build_tiny_teacher

    teacher = build_tiny_teacher("dinov2")
    L = teacher.depth
    odd, even = list(range(1, L + 1, 2)), list(range(2, L + 1, 2))
    m = run_fit(FitConfig(teacher="tiny:dinov2", data="bundled:digits", limit=60, phases=[odd, even], steps1=3,
                          steps2=2, batch_size=4, val_images=12, stats_images=16, probe_data=None,
                          out=str(tmp_path / "r")), progress=False)
    v = m["validation"]
    assert len(v["per_block_from_teacher"]["r2"]) == len(v["autoregressive"]["r2"]) == L
    assert m["surrogate"]["phases"] == [odd, even]
    model = FitRun(tmp_path / "r").model()
    assert model.cfg.runs == [(t - 1, t, (t - 1) % 2) for t in range(1, L + 1)]
    assert json.loads((tmp_path / "r" / "surrogate.json").read_text())["surrogate"]["phases"] == [odd, even]
    from raptor.surrogate.evaluate import splice_variants

    assert list(splice_variants(model))[2:] == [f"block{(t - 1) % 2} ({t - 1}-{t})" for t in range(1, L + 1)]
    size = teacher.image_size(None)
    with torch.no_grad():
        x = teacher.embed(torch.randn(2, 3, size, size))
        spliced = model.splice(teacher, x, 0, L, from_images=False)
        torch.testing.assert_close(spliced, model(x)[-1])


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


@pytest.mark.slow
def test_the_ablation_runs_its_cumulative_rows_and_resumes(tmp_path):
    """raptor ablation on a tiny teacher: five fits with the paper's cumulative switches (row 5 continues row 4 with
    stage 2), a table and a figure; a second call reuses every finished row; row 6 without a head is refused."""
    from raptor.ablation import AblationConfig, run_ablation

    fit = FitConfig(teacher="tiny:dinov2", data="bundled:digits", limit=60, k=2, steps1=3, steps2=2, batch_size=4,
                    val_images=12, stats_images=16, probe_data=None, out=str(tmp_path / "a"))
    res = run_ablation(AblationConfig(out=str(tmp_path / "a"), fit=fit), progress=False)
    assert [r["row"] for r in res["rows"]] == ["teacher forcing only", "+ autoregressive (annealed TF)",
                                               "+ depth scaling", "+ cls weighting", "+ stage 2 (full-model AR)"]
    cfgs = [json.loads((tmp_path / "a" / r["run"] / "metrics.json").read_text())["config"] for r in res["rows"]]
    assert [(c["stage"], c["teacher_forcing_only"], c["t_scale"], c["stage1_last_weights"] is not None)
            for c in cfgs] == [("1", True, False, False), ("1", False, False, False), ("1", False, True, False),
                               ("1", False, True, True), ("2", False, True, True)]
    assert cfgs[4]["init_from"].endswith("4_cls_weighting")
    md = (tmp_path / "a" / "ablation.md").read_text()
    assert "| teacher forcing only | `1_tf_only` | **" in md and "Row 6 (+ fine-tuned probe) was not run" in md
    assert (tmp_path / "a" / res["figure"]).stat().st_size > 1000
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())  # replayable: raptor ablation --config
    assert saved["fit"]["steps1"] == 3 and saved["probe_data"] is None and saved["out"] == str(tmp_path / "a")
    stamp = (tmp_path / "a" / "3_depth_scaling" / "metrics.json").stat().st_mtime_ns
    again = run_ablation(AblationConfig(out=str(tmp_path / "a"), fit=fit), progress=False)
    assert (tmp_path / "a" / "3_depth_scaling" / "metrics.json").stat().st_mtime_ns == stamp
    assert again["rows"] == res["rows"]
    import dataclasses

    with pytest.raises(RaptorError, match="ablation row 1_tf_only: cannot resume .*steps1 3 -> 4"):
        run_ablation(AblationConfig(out=str(tmp_path / "a"), fit=dataclasses.replace(fit, steps1=4)), progress=False)
    for bad, msg in ((AblationConfig(out=str(tmp_path / "b"), fit=fit, probe_data="bundled:digits"),
                      "needs both probe_data and init_head"),
                     (AblationConfig(out=str(tmp_path / "b"), fit=fit, probe_data="bundled:digits",
                                     init_head=str(tmp_path / "no_head.pth")), "no_head.pth"),
                     (AblationConfig(out=str(tmp_path / "b"), fit=dataclasses.replace(fit, data="folder:/no/such")),
                      "not found")):
        with pytest.raises(RaptorError, match=msg):
            run_ablation(bad, progress=False)
        assert not (tmp_path / "b").exists()  # refused before anything is written


def test_teacher_forcing_only_never_rolls_out():
    """--teacher-forcing-only: the stage-1 loss at the last step equals the pure teacher-forced loss of step 0."""
    m = _model([[1, 2, 3], [4]])
    traj = torch.randn(2, 4, T, DIM)
    item = WorkItem("stage1/block0", 1, 0, 0, 3, 10, None)
    cfg = FitConfig(loss_norm="none", teacher_forcing_only=True)
    gen = step_generator(0, torch.device("cpu"))
    tf0 = item_loss(m, item, traj, 0, cfg, LAYOUT, gen)
    torch.testing.assert_close(item_loss(m, item, traj, 9, cfg, LAYOUT, gen), tf0)
    annealed = item_loss(m, item, traj, 9, FitConfig(loss_norm="none"), LAYOUT, gen)
    assert not torch.allclose(annealed, tf0)
