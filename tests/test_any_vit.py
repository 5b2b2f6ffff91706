"""Any ViT as a teacher: ``Teacher.from_modules`` on one's own modules, and the timm / open_clip adapters against
modules built here with exactly those libraries' attribute structure and state-dict names (timm and open_clip
need not be installed), each checked layer by layer against a reference forward written the way the library's is."""

from __future__ import annotations

import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raptor.errors import RaptorError
from raptor.teachers import KINDS, SPEC_HELP, load_teacher
from raptor.teachers.base import Teacher, TokenLayout
from raptor.teachers.modules import ModuleTeacher
from raptor.teachers.open_clip_vit import OpenClipTeacher
from raptor.teachers.timm_vit import TimmTeacher

# ---- Teacher.from_modules ------------------------------------------------------------------------------------------


class _Embed(nn.Module):
    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, images):
        return self.teacher.embed(images)


@pytest.mark.slow
def test_from_modules_on_the_bundled_teachers_own_modules_equals_it_layer_by_layer(bundled_teacher):
    t = bundled_teacher
    wrapped = Teacher.from_modules(lambda x: t.embed(x), t.blocks, t.final_norm, n_cls=1, n_registers=0,
                                   patch_size=t.patch_size, name="dinov2-s again")
    assert isinstance(wrapped, ModuleTeacher) and wrapped.dim == t.dim and wrapped.depth == t.depth
    assert wrapped.layout(112) == t.layout(112) and wrapped.spec == "module:dinov2-s again"
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    assert torch.equal(wrapped.trajectory(x), t.trajectory(x))
    as_module = Teacher.from_modules(_Embed(t), list(t.blocks), t.final_norm, n_cls=1, n_registers=0,
                                     patch_size=t.patch_size, dim=t.dim)
    assert torch.equal(as_module.trajectory(x, layers=[0, 5, 12]), t.trajectory(x, layers=[0, 5, 12]))


class _TinyEmbed(nn.Module):
    """[cls, registers..., patches] from a conv patchify."""

    def __init__(self, dim=16, patch=4, n_reg=2):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.prefix = nn.Parameter(torch.randn(1, 1 + n_reg, dim))

    def forward(self, images):
        x = self.proj(images).flatten(2).transpose(1, 2)
        return torch.cat([self.prefix.expand(x.shape[0], -1, -1), x], dim=1)


def _mlp_blocks(dim=16, depth=3):
    return [nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth)]


def test_from_modules_infers_dim_checks_layout_and_refuses_bad_input():
    torch.manual_seed(0)
    emb, blocks = _TinyEmbed(), _mlp_blocks()
    t = Teacher.from_modules(emb, blocks, nn.LayerNorm(16), n_cls=1, n_registers=2, patch_size=4,
                             default_image_size=16)
    assert t.dim == 16 and t.layout(16) == TokenLayout(1, 2, (4, 4))
    x = torch.randn(2, 3, 16, 16)
    traj = t.trajectory(x)
    ref = [emb(x)]
    for b in blocks:
        ref.append(b(ref[-1]))
    assert traj.shape == (2, 4, 19, 16) and torch.equal(traj, torch.stack(ref, 1))
    assert not any(p.requires_grad for p in t.parameters())  # frozen, as every teacher
    # no normalized_shape on the final norm: one embedding of a blank image says the width
    t2 = Teacher.from_modules(emb, blocks, nn.Identity(), n_cls=1, n_registers=2, patch_size=4, default_image_size=8)
    assert t2.dim == 16
    # a wrong layout fails on the first images, naming what to check
    wrong = Teacher.from_modules(emb, blocks, nn.LayerNorm(16), n_cls=1, n_registers=0, patch_size=4,
                                 default_image_size=16)
    with pytest.raises(RaptorError, match="layout expects 17.*n_registers"):
        wrong.trajectory(x)
    with pytest.raises(RaptorError, match="blocks is empty"):
        Teacher.from_modules(emb, [], nn.LayerNorm(16), n_cls=1, n_registers=2, patch_size=4)
    with pytest.raises(RaptorError, match="not a torch.nn.Module"):
        Teacher.from_modules(emb, [lambda x: x], nn.LayerNorm(16), n_cls=1, n_registers=2, patch_size=4)
    with pytest.raises(RaptorError, match="patch_size"):
        Teacher.from_modules(emb, blocks, nn.LayerNorm(16), n_cls=1, n_registers=2, patch_size=0)
    with pytest.raises(RaptorError, match="n_cls"):
        Teacher.from_modules(emb, blocks, nn.LayerNorm(16), n_cls=-1, n_registers=2, patch_size=4)
    with pytest.raises(RaptorError, match="multiple of the patch size"):
        Teacher.from_modules(emb, blocks, nn.LayerNorm(16), n_cls=1, n_registers=2, patch_size=4,
                             default_image_size=18)
    with pytest.raises(RaptorError, match="width 16, but dim is 8"):
        Teacher.from_modules(emb, blocks, nn.LayerNorm(16), n_cls=1, n_registers=2, patch_size=4, dim=8,
                             default_image_size=16).trajectory(x)
    with pytest.raises(RaptorError, match=r"shape \(batch, tokens, dim\)"):
        Teacher.from_modules(lambda im: im, blocks, nn.LayerNorm(16), n_cls=1, n_registers=2, patch_size=4,
                             default_image_size=16).trajectory(x)


# ---- a timm VisionTransformer clone (timm's attribute structure and state-dict names) ----------------------------


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, dim):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.strict_img_size, self.flatten = True, True
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x):
        assert tuple(x.shape[-2:]) == self.img_size, "timm's strict_img_size"
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class LayerScale(nn.Module):
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads), LayerScale(dim, 0.5)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 2 * dim), LayerScale(dim, 0.5)

    def forward(self, x, attn_mask=None):  # timm >= 1.0's signature (a mask as second argument)
        x = x + self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, img_size=24, patch_size=4, dim=16, depth=3, heads=2, reg_tokens=0, class_token=True,
                 no_embed_class=False, pre_norm=False, global_pool="token", num_classes=5):
        super().__init__()
        self.embed_dim, self.no_embed_class, self.global_pool = dim, no_embed_class, global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.randn(1, reg_tokens, dim)) if reg_tokens else None
        self.num_prefix_tokens = int(class_token) + reg_tokens
        n_pos = self.patch_embed.grid_size[0] ** 2 + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, n_pos, dim) * 0.5)
        self.pos_drop, self.patch_drop = nn.Dropout(0.1), nn.Identity()
        self.norm_pre = nn.LayerNorm(dim, eps=1e-6) if pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.fc_norm = nn.LayerNorm(dim, eps=1e-6), nn.Identity()
        self.head_drop, self.head = nn.Dropout(0.0), nn.Linear(dim, num_classes)

    def reference_intermediates(self, x, pos_embed=None):
        """timm's forward_intermediates(x, norm=False, output_fmt='NLC'), prefix tokens kept: [after norm_pre,
        block 1, ..., block L]."""
        pos_embed = self.pos_embed if pos_embed is None else pos_embed
        native = tuple(x.shape[-2:]) == self.patch_embed.img_size
        x = self.patch_embed(x) if native else self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        to_cat = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat(to_cat + [x + pos_embed], dim=1)
        else:
            x = torch.cat(to_cat + [x], dim=1) + pos_embed
        x = self.norm_pre(self.patch_drop(self.pos_drop(x)))
        out = [x]
        for blk in self.blocks:
            out.append(blk(out[-1]))
        return out


TIMM_NAMES = {"cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
              "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
              "blocks.0.attn.proj.weight", "blocks.0.ls1.gamma", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
              "blocks.0.mlp.fc2.bias", "blocks.0.ls2.gamma", "norm.weight", "norm.bias", "head.weight", "head.bias"}


@pytest.mark.parametrize("reg_tokens", [0, 4])
@pytest.mark.parametrize("no_embed_class", [False, True])
def test_timm_adapter_equals_forward_intermediates(reg_tokens, no_embed_class):
    torch.manual_seed(reg_tokens + 10 * no_embed_class)
    m = VisionTransformer(reg_tokens=reg_tokens, no_embed_class=no_embed_class, pre_norm=no_embed_class).eval()
    assert TIMM_NAMES - (set() if reg_tokens else {"reg_token"}) <= set(m.state_dict())
    t = TimmTeacher(m, spec="timm:clone")
    assert (t.n_cls, t.n_registers, t.patch_size, t.dim, t.depth, t.default_image_size) == (1, reg_tokens, 4, 16, 3, 24)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        ref = torch.stack(m.reference_intermediates(x), dim=1)
    traj = t.trajectory(x)
    assert traj.shape == (2, 4, t.layout(24).n_tokens, 16)
    assert torch.equal(traj, ref)
    # the classifier: timm's forward_head (token pool, Identity fc_norm) on the final norm
    with torch.no_grad():
        assert torch.equal(t.classify(traj[:, -1], t.layout(24)), m.head(m.norm(ref[:, -1])[:, 0]))


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_timm_adapter_resamples_position_embeddings_for_other_sizes(no_embed_class):
    torch.manual_seed(3)
    m = VisionTransformer(reg_tokens=2, no_embed_class=no_embed_class).eval()
    t = TimmTeacher(m)
    x = torch.randn(1, 3, 40, 32)  # 10x8 patches; the module's strict patch_embed would refuse it
    n_prefix = 0 if no_embed_class else 3
    grid = m.pos_embed[:, n_prefix:].reshape(1, 6, 6, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(10, 8), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 80, -1)
    pos = torch.cat([m.pos_embed[:, :n_prefix], grid], dim=1)
    with torch.no_grad():
        ref = torch.stack(m.reference_intermediates(x, pos_embed=pos), dim=1)
    traj = t.trajectory(x)
    assert t.layout((40, 32)) == TokenLayout(1, 2, (10, 8))
    torch.testing.assert_close(traj, ref, atol=0, rtol=0)


def test_timm_adapter_without_class_token_pools_patches_and_refuses_non_vits():
    torch.manual_seed(4)
    m = VisionTransformer(class_token=False, reg_tokens=1, no_embed_class=True, global_pool="avg").eval()
    t = TimmTeacher(m)
    assert (t.n_cls, t.n_registers) == (0, 1) and t.head.pooling == "meanpatch"
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        ref = torch.stack(m.reference_intermediates(x), dim=1)
        assert torch.equal(t.trajectory(x), ref)
        assert torch.equal(t.classify(ref[:, -1], t.layout(24)), m.head(m.norm(ref[:, -1])[:, 1:].mean(1)))
    with pytest.raises(RaptorError, match="not a timm VisionTransformer-shaped"):
        TimmTeacher(nn.Linear(2, 2))
    m.dist_token = nn.Parameter(torch.zeros(1, 1, 16))
    with pytest.raises(RaptorError, match="dist_token"):
        TimmTeacher(m)


# ---- an open_clip VisionTransformer clone ------------------------------------------------------------------------


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d, heads, batch_first):
        super().__init__()
        self.ln_1, self.attn, self.ls_1 = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=batch_first), \
            nn.Identity()
        self.ln_2, self.ls_2 = nn.LayerNorm(d), nn.Identity()
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 2 * d)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(2 * d, d))]))

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        y = self.ln_1(q_x)
        x = q_x + self.ls_1(self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, d, layers, heads, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(d, heads, batch_first) for _ in range(layers)])


class OpenClipVisual(nn.Module):
    def __init__(self, image_size=24, patch=4, width=16, layers=3, heads=2, output_dim=8, batch_first=True):
        super().__init__()
        self.image_size, self.patch_size = (image_size, image_size), (patch, patch)
        self.grid_size = (image_size // patch, image_size // patch)
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(self.grid_size[0] ** 2 + 1, width))
        self.patch_dropout, self.ln_pre = nn.Identity(), nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, batch_first)
        self.attn_pool, self.ln_post = None, nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim))

    def reference_layers(self, x):
        """open_clip's VisionTransformer.forward up to the transformer, each residual block's output kept."""
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.ln_pre(self.patch_dropout(x + self.positional_embedding.to(x.dtype)))
        out = [x]
        if not self.transformer.batch_first:
            x = x.transpose(0, 1).contiguous()  # NLD -> LND, once, as open_clip's Transformer
        for r in self.transformer.resblocks:
            x = r(x, attn_mask=None)
            out.append(x if self.transformer.batch_first else x.transpose(0, 1))
        return out


OPEN_CLIP_NAMES = {"conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "proj",
                   "transformer.resblocks.0.ln_1.weight", "transformer.resblocks.0.attn.in_proj_weight",
                   "transformer.resblocks.0.attn.out_proj.weight", "transformer.resblocks.0.mlp.c_fc.weight",
                   "transformer.resblocks.0.mlp.c_proj.bias", "transformer.resblocks.0.ln_2.bias", "ln_post.weight"}


@pytest.mark.parametrize("batch_first", [True, False])
def test_open_clip_adapter_equals_the_towers_own_forward(batch_first):
    torch.manual_seed(5)
    v = OpenClipVisual(batch_first=batch_first).eval()
    assert OPEN_CLIP_NAMES <= set(v.state_dict())
    t = OpenClipTeacher(v, spec="open_clip:clone")
    assert (t.n_cls, t.n_registers, t.patch_size, t.dim, t.depth, t.default_image_size) == (1, 0, 4, 16, 3, 24)
    assert t.final_norm is v.ln_post and t.head is None
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        ref = torch.stack(v.reference_layers(x), dim=1)
    traj = t.trajectory(x)
    assert traj.shape == (2, 4, 37, 16)
    torch.testing.assert_close(traj, ref, atol=0, rtol=0)
    with torch.no_grad():
        resumed = t.run_blocks(traj[:, 1], 1)
    torch.testing.assert_close(resumed, traj[:, -1], atol=0, rtol=0)
    big = t.trajectory(torch.randn(1, 3, 32, 28), layers=[0, 3])  # resampled position embeddings
    assert big.shape == (1, 2, 1 + 8 * 7, 16) and torch.isfinite(big).all()


def test_open_clip_adapter_refuses_attentional_pooling_and_other_modules():
    v = OpenClipVisual()
    v.attn_pool = nn.Linear(16, 8)
    with pytest.raises(RaptorError, match="attentional pooling"):
        OpenClipTeacher(v)
    with pytest.raises(RaptorError, match="not an open_clip VisionTransformer"):
        OpenClipTeacher(nn.Linear(2, 2))


# ---- the spec kinds and their loaders ----------------------------------------------------------------------------


def test_timm_and_open_clip_kinds_are_in_the_table_and_say_when_the_library_is_missing(monkeypatch):
    assert {"timm", "open_clip"} <= set(KINDS) and "timm:<model name or dir>" in SPEC_HELP
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(RaptorError, match=r"timm is not importable here: .*pip install timm"):
        load_teacher("timm:vit_small_patch14_dinov2")
    with pytest.raises(RaptorError, match=r"open_clip is not importable here: .*pip install open_clip_torch"):
        load_teacher("open_clip:ViT-B-32")
    with pytest.raises(RaptorError, match="head is only for"):
        load_teacher("timm:x", head="h.pth")


def test_timm_loader_builds_through_timm_create_model(monkeypatch, tmp_path):
    calls = []

    def create_model(name, pretrained=False):
        calls.append((name, pretrained))
        torch.manual_seed(0)
        return VisionTransformer(reg_tokens=4, no_embed_class=True)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    t = load_teacher("timm:vit_small_patch14_reg4_dinov2")
    assert isinstance(t, TimmTeacher) and t.spec == "timm:vit_small_patch14_reg4_dinov2" and t.n_registers == 4
    (tmp_path / "m").mkdir()
    load_teacher(f"timm:{tmp_path / 'm'}")
    assert calls == [("vit_small_patch14_reg4_dinov2", True), (f"local-dir:{tmp_path / 'm'}", True)]
    with pytest.raises(RaptorError, match="folder not found"):
        load_teacher(f"timm:{tmp_path / 'nope'}")


def test_open_clip_loader_reads_a_safetensors_file_into_the_tower(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    trained = OpenClipVisual(batch_first=False)
    save_file({f"visual.{k}": v.contiguous() for k, v in trained.state_dict().items()} |
              {"logit_scale": torch.ones(())}, str(tmp_path / "clip.safetensors"))

    def create_model(arch, pretrained=None):
        assert pretrained is None  # weights files are read here (safetensors / weights_only), not by open_clip
        return types.SimpleNamespace(visual=OpenClipVisual(batch_first=False))

    monkeypatch.setitem(sys.modules, "open_clip", types.SimpleNamespace(create_model=create_model))
    t = load_teacher(f"open_clip:ViT-T-4:{tmp_path / 'clip.safetensors'}")
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        ref = torch.stack(trained.eval().reference_layers(x), dim=1)
    torch.testing.assert_close(t.trajectory(x), ref, atol=0, rtol=0)
    save_file({"conv1.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(RaptorError, match="does not fit"):
        load_teacher(f"open_clip:ViT-T-4:{tmp_path / 'bad.safetensors'}")
    with pytest.raises(RaptorError, match="not found"):
        load_teacher(f"open_clip:ViT-T-4:{tmp_path / 'missing.safetensors'}")


def test_load_teacher_wraps_timm_and_open_clip_module_objects():
    """raptor.load_teacher(module): a timm VisionTransformer and an open_clip model (or its image tower) are wrapped
    by their adapters, with the same trajectories as the adapters built by hand."""
    import raptor

    torch.manual_seed(7)
    vit, visual = VisionTransformer(reg_tokens=2).eval(), OpenClipVisual().eval()
    clip = nn.Module()
    clip.visual = visual
    x = torch.randn(2, 3, 24, 24)
    t = raptor.load_teacher(vit)
    assert isinstance(t, TimmTeacher) and t.spec == "module:VisionTransformer"
    assert torch.equal(t.trajectory(x), TimmTeacher(vit).trajectory(x))
    for m in (clip, visual):
        oc = raptor.load_teacher(m)
        assert isinstance(oc, OpenClipTeacher)
        assert torch.equal(oc.trajectory(x), OpenClipTeacher(visual).trajectory(x))
