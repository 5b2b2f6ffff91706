"""`raptor dynamics`: the one-pass accumulator against the in-memory metric functions, perturbation recovery on
maps with a known contraction, the S-shape rule, and the command end to end (live = store, surrogate side by side,
bad input)."""

import json
import math

import numpy as np
import pytest
import torch

from clirun import one_error_line, raptor
from raptor.dynamics import metrics as M
from raptor.dynamics.accumulate import DynamicsAccumulator
from raptor.dynamics.perturb import dilution, recovery, summarize
from raptor.teachers.base import TokenLayout

TINY = "tiny:dinov2_with_registers"


def test_accumulator_in_batches_equals_the_metrics_on_the_whole_set():
    torch.manual_seed(0)
    layout = TokenLayout(1, 2, (3, 3))
    # a drifting random walk with growing norms, so every metric is non-trivial
    steps = torch.randn(20, 6, layout.n_tokens, 16) * torch.linspace(0.3, 2.0, 6)[None, :, None, None]
    traj = steps.cumsum(1) + torch.randn(1, 1, layout.n_tokens, 16)
    labels = np.arange(20) % 3
    acc = DynamicsAccumulator(layout, 6, rank_images=7)
    for s in (0, 4, 11):  # uneven batches
        e = {0: 4, 4: 11, 11: 20}[s]
        acc.update(traj[s:e], labels[s:e])
    r = acc.result()
    assert r["n_images"] == 20 and r["n_ranked"] == 7
    for g in ("cls", "registers", "patches", "all"):
        np.testing.assert_allclose(r["gamma"][g], M.directional_convergence(traj, layout, g).numpy(), atol=2e-5)
        np.testing.assert_allclose(r["speed"][g], M.angular_speed(traj, layout, g).numpy(), atol=2e-5)
    np.testing.assert_allclose(r["coherence"], M.patch_coherence(traj, layout).numpy(), atol=2e-5)
    for directions, suffix in ((False, ""), (True, "_directions")):
        ref = M.update_ranks(traj[:7], layout, directions=directions)
        np.testing.assert_allclose(r["ranks"]["stable_rank" + suffix], ref["stable_rank"].numpy(), rtol=1e-4)
        np.testing.assert_allclose(r["ranks"]["effective_rank" + suffix], ref["effective_rank"].numpy(), rtol=1e-4)
    torch.testing.assert_close(r["readout"], M.unit(traj[:, :, 0]))
    assert r["labels"].tolist() == labels.tolist()
    # the Gram-based singular values equal an SVD's
    a = torch.randn(5, 9, 13, dtype=torch.float64)
    torch.testing.assert_close(M.singular_values(a)[..., :9], torch.linalg.svdvals(a))
    torch.testing.assert_close(M.singular_values(a.transpose(1, 2))[..., :9], torch.linalg.svdvals(a))


def test_basin_directions_are_a_bounded_uniform_sample_of_the_labelled_images():
    layout = TokenLayout(1, 0, (1, 2))
    traj = torch.randn(400, 2, layout.n_tokens, 4)
    labels = np.where(np.arange(400) % 4 == 3, -1, np.arange(400) // 100)  # class-sorted; every 4th unlabelled
    acc = DynamicsAccumulator(layout, 2, rank_images=0, basin_images=50)
    for s in range(0, 400, 16):
        acc.update(traj[s:s + 16], labels[s:s + 16])
    r = acc.result()
    assert r["n_labelled"] == 300 and len(r["labels"]) == 50 and (r["labels"] >= 0).all()
    assert len(set(r["labels"].tolist())) == 4  # not just the first class, as the first 50 would be
    for row, y in zip(r["readout"], r["labels"]):  # each kept row is one labelled image's own direction
        match = [i for i in range(400) if labels[i] == y and torch.allclose(M.unit(traj[i, :, 0]), row)]
        assert len(match) == 1


def test_small_angles_keep_their_precision():
    u = torch.tensor([1.0, 0.0])
    v = torch.tensor([math.cos(1e-4), math.sin(1e-4)])
    assert M.angle(u, v).item() == pytest.approx(1e-4, rel=1e-3)  # arccos of a float32 dot gives 0 or 3.5e-4


def _shrink_runner(c: float, depth: int):
    """Each layer keeps a token's component along e_0 and multiplies the rest by c: tan θ shrinks by c per layer."""
    def run(x: torch.Tensor, start: int) -> torch.Tensor:
        outs = [x]
        for _ in range(start, depth):
            x = torch.cat([x[..., :1], c * x[..., 1:]], -1)
            outs.append(x)
        return torch.stack(outs, 1)
    return run


def test_perturbation_recovery_measures_a_known_contraction():
    layout = TokenLayout(1, 0, (2, 2))
    depth, c, eps = 6, 0.7, 0.05
    x = torch.zeros(8, layout.n_tokens, 12, dtype=torch.float64)
    x[..., 0] = torch.rand(8, layout.n_tokens, dtype=torch.float64) + 1  # every token along e_0
    phases = [[1, 2], [3, 4, 5, 6]]
    rec = recovery(_shrink_runner(c, depth), {0: x, 2: x}, [eps], layout, phases, groups=["cls", "all"], seed=1)
    for r in rec:
        d = np.asarray(r["distance"]["all"])
        # the noise is exactly eps * |x| long; its angle from e_0 has tan = |noise_perp| / (|x| + noise_par)
        n = len(d) - 1
        t0 = np.tan(d[0])
        np.testing.assert_allclose(np.tan(d), t0 * c ** np.arange(n + 1), rtol=0.05)
        assert d[0] == pytest.approx(math.atan(eps), rel=0.05)
        first = r["phases"][0]
        assert first["layers"] == [r["layer"], phases[0][-1] if r["layer"] == 0 else 6]
        steps = first["layers"][1] - first["layers"][0]
        assert first["per_step"] == pytest.approx(c, rel=0.01)  # small angles: the ratio is c per layer
        assert first["ratio"] == pytest.approx(c ** steps, rel=0.02)
        # norms do not grow here: the norm-growth baseline is ~1 (|x| shrinks a little towards e_0)
        assert r["baseline_norm_growth"][0] == pytest.approx(1.0)
    s = summarize(rec)
    assert s["fraction_recovering"] == 1.0 and s["fraction_beating_norm_growth"] == 1.0
    # an orthogonal map neither contracts nor expands
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))

    def rotate(x, start):
        outs = [x]
        for _ in range(start, depth):
            x = x @ q.to(x.dtype)
            outs.append(x)
        return torch.stack(outs, 1)
    rec = recovery(rotate, {0: x}, [eps], layout, phases, groups=["all"])
    assert [p["ratio"] for p in rec[0]["phases"]] == pytest.approx([1.0, 1.0], rel=1e-6)


def test_perturbation_size_and_dilution():
    x = torch.randn(4, 5, 64, dtype=torch.float64)
    xp = M.perturb_tokens(x, 0.3, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(((xp - x).norm(dim=-1) / x.norm(dim=-1)).numpy(), 0.3)
    traj = torch.stack([x, 2 * x, 4 * x], 1)  # norms double per layer
    assert dilution(traj).tolist() == pytest.approx([1.0, 0.5, 0.25])


def test_s_shape_rule():
    x = np.arange(13.0)
    s = M.s_shape(0.1 + 0.9 / (1 + np.exp(-(x - 6) / 1.0)))
    assert s["s_shaped"] and s["midpoint"] == pytest.approx(6, abs=0.05) and s["logistic_r2"] > 0.999
    assert not M.s_shape(x / 12)["s_shaped"]  # a straight line
    assert not M.s_shape(np.exp(x - 12))["s_shaped"]  # everything happens at the last layer
    assert not M.s_shape(0.1 + 0.9 / (1 + np.exp(-(x - 1.0) / 0.5)))["s_shaped"]  # done in the first layers


def test_contraction_ratios_skip_phases_before_the_injection():
    d = np.array([0.4, 0.2, 0.1, 0.1, 0.05])  # layers 2..6
    out = M.contraction_ratios(d, 2, [[1, 2], [3, 4], [5, 6]])
    assert [o["layers"] for o in out] == [[2, 4], [4, 6]]
    assert [o["ratio"] for o in out] == pytest.approx([0.25, 0.5])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A random-weight Raptor run directory for the tiny teacher (2 blocks: phases 1 / 2-3)."""
    from raptor.surrogate.block import BlockConfig
    from raptor.surrogate.checkpoint import save_tensors
    from raptor.surrogate.model import RaptorModel, SurrogateConfig
    from raptor.teachers import load_teacher

    t = load_teacher(TINY)
    run = tmp_path_factory.mktemp("run")
    cfg = SurrogateConfig([[1], [2, 3]], BlockConfig(t.dim, 2))
    torch.manual_seed(0)
    save_tensors(RaptorModel(cfg).state_dict(), run / "model.safetensors")
    (run / "surrogate.json").write_text(json.dumps({"surrogate": cfg.to_dict(), "teacher": TINY}))
    return run


def test_verdict_tests_on_known_effects():
    """A shifted sample holds against 0 and a centred one does not; a value far outside the random-weight draws holds
    and one among them does not; speed jumps planted at the boundaries beat every other partition, a smooth speed
    does not; robustness reports a flip."""
    from raptor.dynamics.verdicts import against_draws, against_reference, boundary_permutation, robustness

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 200)
    assert against_reference(x + 0.5, 0.0, "greater", "0")["verdict"] == "holds"
    r = against_reference(x - x.mean(), 0.0, "greater", "0")
    assert r["verdict"] == "does not hold" and r["ci95"][0] < 0 < r["ci95"][1] and r["p_value"] > 0.3
    assert against_reference(x - 0.5, 0.0, "less", "0")["verdict"] == "holds"
    draws = [rng.normal(m, 1, 200) for m in (0.0, 0.1, -0.1, 0.05)]
    assert against_draws(x + 3, draws, "greater")["verdict"] == "holds"
    assert against_draws(rng.normal(0.02, 1, 200), draws, "greater")["verdict"] == "does not hold"
    L = 12
    base = rng.normal(1.0, 0.01, (30, L))
    jumpy = base.copy()
    jumpy[:, 4:] += 0.5  # the steps into layers 5 and 9 start faster phases
    jumpy[:, 8:] += 0.5
    phases = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    b = boundary_permutation(jumpy, phases)
    assert b["verdict"] == "holds" and b["p_value"] == pytest.approx(1 / 55) and b["min_p"] == pytest.approx(1 / 55)
    assert boundary_permutation(base + np.linspace(0, 0.5, L), phases)["verdict"] == "does not hold"
    two = boundary_permutation(jumpy, [list(range(1, 5)), list(range(5, 13))])  # k = 2: at most 10 other partitions
    assert two["min_p"] >= 1 / 11 > 0.05 and two["verdict"] == "does not hold"
    from raptor.dynamics.verdicts import surrogate_agreement

    res = {"gamma": {"all": np.cumsum(rng.random((20, 6)), 1)}, "speed": {"all": rng.random((20, 5)) + np.arange(5)},
           "coherence": rng.random((20, 6)) + np.arange(6), "ranks": {}}
    same = surrogate_agreement(res, res)
    assert all(r[k]["r"] == pytest.approx(1) and r[k]["max_abs_gap"] == 0 for r in same.values() for k in r)
    from raptor.dynamics.verdicts import _holm

    rows = {f"r{i}": {"finding": "i", "against_reference": {"effect": 1.0, "direction": "greater", "p_value": p,
                                                            "verdict": "holds" if p < 0.05 else "does not hold"}}
            for i, p in enumerate((0.001, 0.02, 0.04))}
    _holm(rows)  # Holm over 3 tests: 3 x 0.001, 2 x 0.02, 1 x 0.04 -> all below 0.05
    assert [rows[f"r{i}"]["against_reference"]["p_holm"] for i in range(3)] == pytest.approx([0.003, 0.04, 0.04])
    assert [rows[f"r{i}"]["verdict"] for i in range(3)] == ["holds", "holds", "holds"]
    rows["r2"]["against_reference"]["p_value"] = 0.03  # now 3 x 0.02 = 0.06, and the step-down keeps it monotone
    rows["r1"]["against_reference"]["p_value"] = 0.03
    rows["r0"]["against_reference"]["p_value"] = 0.02
    _holm(rows)
    assert [rows[f"r{i}"]["verdict"] for i in range(3)] == ["does not hold"] * 3  # 0.06, 0.06, 0.06
    rob = robustness({"a": {"finding": "i", "verdict": "holds"}, "b": {"finding": "i", "verdict": "does not hold"},
                      "c": {"finding": "ii", "verdict": "holds"}, "d": {"finding": "ii", "verdict": "not measurable"}})
    assert not rob["i"]["robust"] and rob["i"]["summary"] == "flips with the operationalisation"
    assert rob["ii"]["robust"] and rob["ii"]["summary"] == "holds under every operationalisation"


def test_random_weight_teacher_keeps_the_embedding_and_redraws_the_blocks():
    """Every block parameter is redrawn with the architecture's own initialiser (LayerScale included: it has no
    reset_parameters), seeded; the embedding is the teacher's; the teacher itself is untouched."""
    from raptor.dynamics.verdicts import random_weight_teacher
    from raptor.teachers import load_teacher

    t = load_teacher(TINY)
    with torch.no_grad():  # stand-in for training: move every block parameter off its initial value
        for p in t.blocks.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = {k: v.clone() for k, v in t.state_dict().items()}
    a, b, c = random_weight_teacher(t, 1), random_weight_teacher(t, 1), random_weight_teacher(t, 2)
    same = [n for (n, p), q in zip(t.blocks.named_parameters(), a.blocks.parameters()) if torch.equal(p, q)]
    assert not same, same
    assert all(float(p.flatten()[0]) == 0.5 for n, p in a.blocks.named_parameters() if n.endswith("lambda1"))
    x = torch.randn(2, 3, t.image_size(None), t.image_size(None))
    with torch.no_grad():
        torch.testing.assert_close(a.embed(x), t.embed(x))  # same inputs
        h = t.embed(x)
        torch.testing.assert_close(a.run_block(0, h), b.run_block(0, h))  # seeded
        assert not torch.allclose(a.run_block(0, h), c.run_block(0, h))
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in before.items())  # untouched


@pytest.mark.slow
def test_dynamics_command_live_equals_store_and_reports_findings(tmp_path, tiny_run):
    args = ["--teacher", TINY, "--data", "bundled:digits", "--limit", "40", "--batch-size", "16",
            "--perturb-images", "8", "--rank-images", "20", "--eps", "0.1", "--no-progress"]
    live = raptor("dynamics", *args, "--surrogate", tiny_run, "--out", tmp_path / "live")
    assert live.returncode == 0, live.stderr
    assert "(iii) low-rank late updates: teacher:" in live.stdout and "surrogate:" in live.stdout
    d = json.loads((tmp_path / "live" / "dynamics.json").read_text())
    assert set(d["models"]) == {"teacher", "surrogate"}
    t = d["models"]["teacher"]
    assert set(t["gamma"]) == {"cls", "registers", "patches", "all"}  # registers are their own group
    assert len(t["gamma"]["all"]["mean"]) == 4 and len(t["speed"]["cls"]["mean"]) == 3
    assert t["gamma"]["all"]["mean"][-1] == pytest.approx(1.0)
    assert t["basins"]["available"] and t["basins"]["n_classes"] == 10 and t["n_ranked"] == 20
    assert d["inject_layers"] == sorted({p[0] - 1 for p in d["phases"]})
    for key in ("i", "ii", "iii", "boundary_jumps"):
        assert d["findings"]["teacher"][key]["verdict"] in ("holds", "partly holds", "does not hold",
                                                             "not measurable")
    report = (tmp_path / "live" / "report.md").read_text()
    assert "## Findings" in report and "| (iii) low-rank late updates |" in report
    # the tiny teacher has random weights itself: against random-weight teachers no verdict may hold
    v = d["verdicts"]["teacher"]
    assert {"i_gamma_L", "i_gamma_Lm1", "i_basins", "i_recovery_angular", "i_recovery_euclidean", "ii_cls_late",
            "ii_coherence", "iii_effective_rank", "iii_effective_rank_centred"} <= set(v)
    held = {k: r for k, r in v.items() if r["verdict"] not in ("does not hold", "not measurable")}
    assert not held, held
    assert v["i_gamma_L"]["against_random_weights"]["null"] == "random-weight teachers (4 draws)"
    assert set(d["robustness"]["teacher"]) == {"i", "ii", "iii", "boundary_jumps"}
    assert "## Verdicts against their nulls" in report
    ag = d["surrogate_agreement"]
    assert set(ag) >= {"gamma all", "speed cls", "coherence", "effective rank"}
    g = ag["gamma all"]["all layers"]
    assert -1 <= g["r"] <= 1 and g["ci95"][0] <= g["ci95"][1] and g["max_abs_gap"] >= 0
    assert "Does the surrogate reproduce the teacher's curves?" in report
    for fig in d["figures"].values():
        assert (tmp_path / "live" / fig).stat().st_size > 1000
    assert (tmp_path / "live" / "config.yaml").is_file()
    # the same images from a float32 store give the same teacher metrics (phases given: the store's own pass)
    ex = raptor("extract", "--teacher", TINY, "--data", "bundled:digits", "--limit", "40", "--dtype", "float32",
                "--out", tmp_path / "store", "--no-progress")
    assert ex.returncode == 0, ex.stderr
    phases = "/".join(f"{p[0]}-{p[-1]}" for p in d["phases"])
    st = raptor("dynamics", *args, "--store", tmp_path / "store", "--phases", phases, "--out", tmp_path / "st")
    assert st.returncode == 0, st.stderr
    s = json.loads((tmp_path / "st" / "dynamics.json").read_text())["models"]["teacher"]
    for key in ("gamma", "speed"):
        for g in t[key]:
            np.testing.assert_allclose(s[key][g]["mean"], t[key][g]["mean"], atol=1e-5)
    np.testing.assert_allclose(s["ranks"]["effective_rank"]["mean"], t["ranks"]["effective_rank"]["mean"], rtol=1e-4)
    assert s["basins"]["knn_accuracy"] == pytest.approx(t["basins"]["knn_accuracy"])
    assert len(s["perturbation"]["runs"]) == len(t["perturbation"]["runs"]) == len(d["inject_layers"])
    for a, b in zip(s["perturbation"]["runs"], t["perturbation"]["runs"]):
        np.testing.assert_allclose(a["distance"]["all"], b["distance"]["all"], rtol=1e-4)  # same states and noise


def test_dynamics_bad_input_is_one_error_line(tmp_path, tiny_run, capsys):
    from raptor.cli import run

    def refused(*argv, needle):
        capsys.readouterr()
        assert run([str(a) for a in argv]) == 2
        one_error_line(capsys.readouterr().err, needle)

    base = ["dynamics", "--data", "bundled:digits", "--limit", "8", "--no-progress"]
    refused(*base, "--teacher", "tiny:vit", "--surrogate", tiny_run, "--out", tmp_path / "a",
            needle=f"was fit on teacher {TINY}, not tiny:vit")
    for eps in ("0", "-0.1", "0.1,0", "nan"):
        refused(*base, "--teacher", TINY, "--eps", eps, "--out", tmp_path / "b", needle="--eps")
    assert run(["extract", "--teacher", TINY, "--data", "bundled:digits", "--limit", "8", "--layers", "0,2,3",
                "--out", str(tmp_path / "partial"), "--no-progress"]) == 0
    refused(*base, "--teacher", TINY, "--store", tmp_path / "partial", "--out", tmp_path / "c",
            needle="lacks layers [1]")
    refused(*base, "--teacher", TINY, "--inject", "3", "--out", tmp_path / "d", needle="--inject")
    refused(*base, "--teacher", TINY, "--space", "weird", "--out", tmp_path / "e", needle="--space")
    refused(*base, "--teacher", TINY, "--surrogate", tmp_path, "--out", tmp_path / "f", needle="not a finished")
    with pytest.MonkeyPatch.context() as mp:  # as on a machine without a GPU, whatever this one has
        mp.setattr(torch.cuda, "is_available", lambda: False)
        refused(*base, "--teacher", TINY, "--device", "cuda", "--out", tmp_path / "g", needle="sees no CUDA GPU")
    refused(*base, "--teacher", TINY, "--device", "tpu", "--out", tmp_path / "h", needle="--device")
    assert not any((tmp_path / n).exists() for n in "abcdefgh")  # no output directory left behind
