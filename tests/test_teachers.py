"""Teacher parity: our per-block trajectory vs each HF family's own hidden states, the bundled teacher vs
onnxruntime on the ONNX graph, and the official DINOv2 .pth converter round trip."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from raptor.errors import RaptorError
from raptor.teachers import load_teacher
from raptor.teachers.dinov2_pth import hf_to_official, official_to_hf
from raptor.teachers.hf import build_tiny_teacher

FAMILIES = ["dinov2", "dinov2_with_registers", "vit", "deit", "clip", "siglip", "dinov3"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [28, 42])
def test_hf_family_trajectory_matches_output_hidden_states(family, size):
    t = build_tiny_teacher(family, seed=1)
    x = torch.randn(2, 3, size, size)
    traj = t.trajectory(x)
    with torch.no_grad():
        hs = t.hf_hidden_states(x)
    assert traj.shape == (2, t.depth + 1, t.layout(size).n_tokens, t.dim)
    assert len(hs) == t.depth + 1
    for layer in range(t.depth + 1):
        assert (traj[:, layer] - hs[layer]).abs().max().item() <= 1e-5, (family, layer)


def test_layout_counts_tokens_per_family():
    expect = {"dinov2": (1, 0), "dinov2_with_registers": (1, 2), "vit": (1, 0), "deit": (2, 0), "clip": (1, 0),
              "siglip": (0, 0), "dinov3": (1, 2)}
    for fam, (n_cls, n_reg) in expect.items():
        t = build_tiny_teacher(fam)
        lay = t.layout(42)
        assert (lay.n_cls, lay.n_registers, lay.grid) == (n_cls, n_reg, (3, 3))
        x = torch.randn(1, 3, 42, 42)
        assert t.embed(x).shape[1] == lay.n_tokens


def test_trajectory_layer_subset_equals_full_and_skips_unused_blocks():
    t = build_tiny_teacher("dinov2_with_registers", seed=3)
    x = torch.randn(3, 3, 28, 28)
    full = t.trajectory(x)
    sub = t.trajectory(x, layers=[0, 2])
    assert torch.equal(sub, full[:, [0, 2]])
    calls = []
    hook = t.blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    t.trajectory(x, layers=[1])
    hook.remove()
    assert calls == []  # the last block is not run when only layer 1 is asked for
    with pytest.raises(RaptorError):
        t.trajectory(x, layers=[t.depth + 1])


def test_run_blocks_splices_back_to_the_same_output():
    t = build_tiny_teacher("clip", seed=2)
    x = torch.randn(2, 3, 28, 28)
    full = t.trajectory(x)
    with torch.no_grad():
        resumed = t.run_blocks(full[:, 1], 1)
    assert torch.allclose(resumed, full[:, -1], atol=1e-6)


def test_dinov3_layout_final_norm_and_resume_from_stored_layers():
    """DINOv3: [cls, registers, patches] as the HF embeddings lay them out, the final norm is the model's ``norm``,
    and ``run_blocks`` on stored tokens (a fresh teacher that never saw the images: the RoPE grid comes from the
    token count) gives the trajectory's later layers."""
    t = build_tiny_teacher("dinov3", seed=5)
    emb = t.core.embeddings
    x = torch.randn(2, 3, 42, 42)
    lay = t.layout(42)
    assert (lay.n_cls, lay.n_registers, lay.grid) == (1, t.model.config.num_register_tokens, (3, 3))
    x0 = t.embed(x)
    assert torch.equal(x0[:, lay.cls], emb.cls_token.expand(2, -1, -1))
    assert torch.equal(x0[:, lay.registers], emb.register_tokens.expand(2, -1, -1))
    assert torch.allclose(x0[:, lay.patches], emb.patch_embeddings(x).flatten(2).transpose(1, 2))
    full = t.trajectory(x)
    with torch.no_grad():
        ref = t.model(pixel_values=x)
    assert t.final_norm is t.model.norm
    assert torch.allclose(t.final_norm(full[:, -1]), ref.last_hidden_state, atol=1e-5)
    fresh = build_tiny_teacher("dinov3", seed=5)
    for start in (1, 2):
        with torch.no_grad():
            resumed = fresh.run_blocks(full[:, start], start)
        assert (resumed - full[:, -1]).abs().max().item() <= 1e-5, start


def test_dinov3_non_square_grid_needs_the_images_once():
    t = build_tiny_teacher("dinov3", seed=6)
    x = torch.randn(2, 3, 28, 42)  # a 2 x 3 grid: 6 patches, not a square
    traj = t.trajectory(x)
    with torch.no_grad():
        hs = t.hf_hidden_states(x)
    assert max((traj[:, k] - hs[k]).abs().max().item() for k in range(t.depth + 1)) <= 1e-5
    with torch.no_grad():
        assert torch.allclose(t.run_blocks(traj[:, 1], 1), traj[:, -1], atol=1e-5)
    with pytest.raises(RaptorError, match="cannot tell the patch grid of 6 patch tokens"):
        build_tiny_teacher("dinov3", seed=6).run_blocks(traj[:, 1], 1)


def test_hf_local_dir_loads_and_matches(tmp_path):
    t = build_tiny_teacher("dinov2_with_registers", seed=4)
    t.model.save_pretrained(tmp_path / "m")
    loaded = load_teacher(f"hf:{tmp_path / 'm'}")
    assert loaded.family == "dinov2_with_registers" and loaded.n_registers == 2
    x = torch.randn(2, 3, 28, 28)
    assert torch.allclose(loaded.trajectory(x), t.trajectory(x), atol=1e-6)


def test_hf_local_dinov3_dir_is_detected(tmp_path):
    from raptor.teachers.hf import DINOv3Teacher

    t = build_tiny_teacher("dinov3", seed=7)
    t.model.save_pretrained(tmp_path / "d3")
    loaded = load_teacher(f"hf:{tmp_path / 'd3'}")
    assert isinstance(loaded, DINOv3Teacher) and loaded.family == "dinov3"
    assert (loaded.n_cls, loaded.n_registers) == (1, 2)
    x = torch.randn(2, 3, 28, 28)
    assert torch.allclose(loaded.trajectory(x), t.trajectory(x), atol=1e-6)
    assert isinstance(load_teacher("tiny:dinov3"), DINOv3Teacher)


def test_hf_image_classification_checkpoint_gives_head(tmp_path):
    import transformers as T

    from raptor.teachers.hf import tiny_config

    cfg = tiny_config("dinov2")
    cfg.num_labels = 5
    torch.manual_seed(0)
    m = T.Dinov2ForImageClassification(cfg).eval()
    m.save_pretrained(tmp_path / "clf")
    t = load_teacher(f"hf:{tmp_path / 'clf'}")
    x = torch.randn(2, 3, 28, 28)
    traj = t.trajectory(x)
    with torch.no_grad():
        ours = t.classify(traj[:, -1], t.layout(28))
        ref = m(pixel_values=x).logits
    assert torch.allclose(ours, ref, atol=1e-5)


def test_bad_specs_raise_clear_errors(tmp_path):
    for spec in ["nonsense", "bundled:dinov2-xl", "hf:/does/not/exist", "dinov2-pth:/nope.pth", "foo:bar",
                 "tiny:resnet"]:
        with pytest.raises(RaptorError):
            load_teacher(spec)
    with pytest.raises(RaptorError, match="HF_HUB_OFFLINE|cannot load"):
        load_teacher("hf:facebook/dinov2-small")


def test_bundled_teacher_matches_onnxruntime(bundled_teacher):
    import onnx
    import onnxruntime as ort

    from raptor.teachers.bundled import bundled_onnx_path

    model = onnx.load(str(bundled_onnx_path()))
    names = {1: "/backbone/encoder/layer.0/Add_1_output_0", 6: "/backbone/encoder/layer.5/Add_1_output_0",
             12: "/backbone/encoder/layer.11/Add_1_output_0"}
    for n in names.values():
        model.graph.output.append(onnx.ValueInfoProto(name=n))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 224, 224, generator=g)
    outs = sess.run(list(names.values()), {"input_image": x.numpy()})
    traj = bundled_teacher.trajectory(x, layers=list(names))
    for k, (layer, ref) in enumerate(zip(names, outs)):
        diff = np.abs(traj[:, k].numpy() - ref).max()
        assert diff <= 1e-3, (layer, diff)
    assert bundled_teacher.depth == 12 and bundled_teacher.dim == 384 and bundled_teacher.n_registers == 0


def test_bundled_teacher_bf16_autocast_close_to_fp32(bundled_teacher, monkeypatch):
    monkeypatch.setenv("RAPTOR_FORCE_AUTOCAST", "1")  # the arithmetic itself, even where bf16 is emulated (slow)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    a = bundled_teacher.trajectory(x, layers=[12])
    b = bundled_teacher.trajectory(x, layers=[12], autocast="bfloat16")
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min().item() > 0.99
    assert not torch.equal(a, b)  # autocast really changed the arithmetic


def test_autocast_falls_back_to_fp32_where_half_matmul_is_emulated(monkeypatch):
    import warnings

    from raptor.teachers import base

    monkeypatch.delenv("RAPTOR_FORCE_AUTOCAST", raising=False)
    monkeypatch.setattr(base, "_WARNED", set())
    monkeypatch.setattr(base, "_CPU_SPEED", {torch.bfloat16: 20.0})  # as measured on an AMD EPYC without bf16
    with pytest.warns(UserWarning, match="no native bfloat16 matmul"):
        with base.autocast_context("bfloat16"):
            assert not torch.is_autocast_enabled("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        with base.autocast_context("bfloat16"):
            pass
    monkeypatch.setattr(base, "_CPU_SPEED", {torch.bfloat16: 0.5})  # native bf16 (avx512_bf16 / AMX)
    with base.autocast_context("bfloat16"):
        assert torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(base, "_CPU_SPEED", {torch.bfloat16: 20.0})
    monkeypatch.setenv("RAPTOR_FORCE_AUTOCAST", "1")
    with base.autocast_context("bfloat16"):
        assert torch.is_autocast_enabled("cpu")


# ---- official DINOv2 .pth ----------------------------------------------------------------------------------------

def _official_reference_forward(sd, x, heads):
    """A from-scratch forward written from the official DINOv2 code's semantics (fused qkv, ls gammas), no HF."""
    patch = sd["patch_embed.proj.weight"]
    p = patch.shape[-1]
    tok = nn.functional.conv2d(x, patch, sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    b = x.shape[0]
    tok = torch.cat([sd["cls_token"].expand(b, -1, -1), tok], dim=1) + sd["pos_embed"]
    if "register_tokens" in sd:
        tok = torch.cat([tok[:, :1], sd["register_tokens"].expand(b, -1, -1), tok[:, 1:]], dim=1)
    outs = [tok]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        g = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        h = nn.functional.layer_norm(tok, (tok.shape[-1],), g("norm1.weight"), g("norm1.bias"), 1e-6)
        qkv = nn.functional.linear(h, g("attn.qkv.weight"), g("attn.qkv.bias"))
        B, N, _ = qkv.shape
        qkv = qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * qkv.shape[-1] ** -0.5, qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        a = a.transpose(1, 2).reshape(B, N, -1)
        tok = tok + g("ls1.gamma") * nn.functional.linear(a, g("attn.proj.weight"), g("attn.proj.bias"))
        h = nn.functional.layer_norm(tok, (tok.shape[-1],), g("norm2.weight"), g("norm2.bias"), 1e-6)
        if f"blocks.{i}.mlp.w12.weight" in sd:
            x1, x2 = nn.functional.linear(h, g("mlp.w12.weight"), g("mlp.w12.bias")).chunk(2, dim=-1)
            m = nn.functional.linear(nn.functional.silu(x1) * x2, g("mlp.w3.weight"), g("mlp.w3.bias"))
        else:
            m = nn.functional.linear(nn.functional.gelu(nn.functional.linear(h, g("mlp.fc1.weight"),
                                                                           g("mlp.fc1.bias"))),
                                     g("mlp.fc2.weight"), g("mlp.fc2.bias"))
        tok = tok + g("ls2.gamma") * m
        outs.append(tok)
    return torch.stack(outs, dim=1)


def _random_official_checkpoint(dim=128, depth=2, registers=0, swiglu=False, grid=2, seed=0):
    """Random tensors under the official key names (what `torch.hub` DINOv2 state dicts look like)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim), "mask_token": r(1, dim),
          "patch_embed.proj.weight": r(dim, 3, 14, 14), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    if registers:
        sd["register_tokens"] = r(1, registers, dim)
    hidden = 4 * dim
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim), p + "attn.qkv.weight": r(3 * dim, dim),
                   p + "attn.qkv.bias": r(3 * dim), p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "ls1.gamma": r(dim) + 0.5, p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
                   p + "ls2.gamma": r(dim) + 0.5})
        if swiglu:
            h2 = (int(hidden * 2 / 3) + 7) // 8 * 8
            sd.update({p + "mlp.w12.weight": r(2 * h2, dim), p + "mlp.w12.bias": r(2 * h2),
                       p + "mlp.w3.weight": r(dim, h2), p + "mlp.w3.bias": r(dim)})
        else:
            sd.update({p + "mlp.fc1.weight": r(hidden, dim), p + "mlp.fc1.bias": r(hidden),
                       p + "mlp.fc2.weight": r(dim, hidden), p + "mlp.fc2.bias": r(dim)})
    return sd


@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (0, True)])
def test_dinov2_pth_matches_official_reference_and_round_trips(tmp_path, registers, swiglu):
    sd = _random_official_checkpoint(registers=registers, swiglu=swiglu)
    path = tmp_path / "dinov2_vitx14_pretrain.pth"
    torch.save(sd, path)
    t = load_teacher(f"dinov2-pth:{path}")
    assert t.n_registers == registers
    x = torch.randn(2, 3, 28, 28)  # grid 2x2 = the checkpoint's own position grid: no interpolation
    ours = t.trajectory(x)
    ref = _official_reference_forward(sd, x, heads=t.dim // 64)
    assert (ours - ref).abs().max().item() <= 1e-5
    # round trip: official -> HF -> official gives back identical tensors
    hf_sd, _ = official_to_hf(sd)
    back = hf_to_official(hf_sd)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k].reshape(back[k].shape)) for k in sd)


def test_dinov2_pth_linear_head(tmp_path):
    sd = _random_official_checkpoint(registers=4)
    torch.save(sd, tmp_path / "bb.pth")
    w, b = torch.randn(7, 256), torch.randn(7)
    torch.save({"weight": w, "bias": b}, tmp_path / "head.pth")
    t = load_teacher(f"dinov2-pth:{tmp_path / 'bb.pth'}", head=str(tmp_path / "head.pth"))
    x = torch.randn(3, 3, 28, 28)
    last = t.trajectory(x, layers=[t.depth])[:, 0]
    logits = t.classify(last, t.layout(28))
    normed = nn.functional.layer_norm(last, (128,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    feats = torch.cat([normed[:, 0], normed[:, 5:].mean(1)], dim=-1)  # cls || mean of patches (registers 1..4 out)
    assert torch.allclose(logits, feats @ w.T + b, atol=1e-5)
    torch.save({"weight": torch.randn(7, 100), "bias": b}, tmp_path / "bad_head.pth")
    with pytest.raises(RaptorError, match="expects 100 input features"):
        load_teacher(f"dinov2-pth:{tmp_path / 'bb.pth'}", head=str(tmp_path / "bad_head.pth"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the file is a hostile pickle on purpose
def test_pth_loading_refuses_pickled_objects(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"cls_token": Evil()}, f)
    with pytest.raises(RaptorError, match="refuses to unpickle") as e:
        load_teacher(f"dinov2-pth:{tmp_path / 'evil.pth'}")
    assert "weights_only=False" not in str(e.value)


def test_param_count_sanity(bundled_teacher):
    # a DINOv2-S block has 12*384^2 + 13*384 ... parameters; check total against the known 21.5M (no head)
    n = sum(p.numel() for p in bundled_teacher.parameters())
    assert math.isclose(n, 22_056_576, rel_tol=0.02), n
