import math

import pytest
import torch
from torch import nn

from detkd.distill.base import METHODS, DistillContext, LevelSpec
from detkd.distill.masks import spatial_attention
from detkd.distill.structured import NonLocal2d, StructuredKD
from detkd.knowledge import TeacherKnowledge

N = 2
LEVELS = {"p3": LevelSpec(3, 4, 8), "p4": LevelSpec(3, 4, 16)}  # student narrower than teacher
SIZES = {"p3": (5, 5), "p4": (3, 4)}
NL_LEVELS = {"p4": {"reduction": 4, "pool": 1}}  # p3 keeps the defaults (C/2, pool 2)
CTX = DistillContext(targets=[], image_sizes=[(40, 40)] * N)


def _feats(seed, c):
    g = torch.Generator().manual_seed(seed)
    return {lvl: torch.randn(N, c, *SIZES[lvl], generator=g) for lvl in LEVELS}


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ---- literal reference ------------------------------------------------------------------


def _softmax(v):
    z = max(v)
    e = [math.exp(x - z) for x in v]
    return [x / sum(e) for x in e]


def _a_sp(x):
    c_, h, w = len(x), len(x[0]), len(x[0][0])
    return [[sum(abs(x[c][i][j]) for c in range(c_)) / c_ for j in range(w)] for i in range(h)]


def _a_ch(x):
    h, w = len(x[0]), len(x[0][0])
    return [sum(abs(v) for row in ch for v in row) / (h * w) for ch in x]


def _conv1x1(x, conv):
    wt, b = conv.weight.flatten(1).tolist(), conv.bias.tolist()
    h, w = len(x[0]), len(x[0][0])
    return [
        [[sum(wt[o][c] * x[c][i][j] for c in range(len(x))) + b[o] for j in range(w)] for i in range(h)]
        for o in range(len(b))
    ]


def _conv3x3_single(x, conv):
    """x [h][w], zero padding 1, one in/out channel."""
    wt, b = conv.weight[0, 0].tolist(), conv.bias.item()
    h, w = len(x), len(x[0])
    get = lambda i, j: x[i][j] if 0 <= i < h and 0 <= j < w else 0.0  # noqa: E731
    return [
        [sum(wt[u][v] * get(i + u - 1, j + v - 1) for u in range(3) for v in range(3)) + b for j in range(w)]
        for i in range(h)
    ]


def _maxpool(x, k):
    h, w = len(x[0]), len(x[0][0])
    kh, kw = min(k, h), min(k, w)
    return [
        [
            [max(ch[i * kh + u][j * kw + v] for u in range(kh) for v in range(kw)) for j in range(w // kw)]
            for i in range(h // kh)
        ]
        for ch in x
    ]


def _nl(block, xs):
    """Literal dot-product non-local block on a batch xs[n][c][i][j] (BN in training mode)."""
    h, w = len(xs[0][0]), len(xs[0][0][0])
    pre = []
    for x in xs:
        theta = [[v for row in ch for v in row] for ch in _conv1x1(x, block.theta)]
        phi = [[v for row in ch for v in row] for ch in _maxpool(_conv1x1(x, block.phi), block.pool)]
        g = [[v for row in ch for v in row] for ch in _maxpool(_conv1x1(x, block.g), block.pool)]
        ci, hw, m = len(theta), len(theta[0]), len(phi[0])
        f = [[sum(theta[k][p] * phi[k][q] for k in range(ci)) / m for q in range(m)] for p in range(hw)]
        y = [[sum(f[p][q] * g[k][q] for q in range(m)) for p in range(hw)] for k in range(ci)]
        y = [[[y[k][i * w + j] for j in range(w)] for i in range(h)] for k in range(ci)]
        pre.append(_conv1x1(y, block.w_z))
    out = [[[list(row) for row in ch] for ch in x] for x in xs]
    gam, bet, eps = block.bn.weight.tolist(), block.bn.bias.tolist(), block.bn.eps
    for c in range(len(pre[0])):
        vals = [pre[n][c][i][j] for n in range(len(xs)) for i in range(h) for j in range(w)]
        mu = sum(vals) / len(vals)
        var = sum((v - mu) ** 2 for v in vals) / len(vals)
        for n in range(len(xs)):
            for i in range(h):
                for j in range(w):
                    out[n][c][i][j] += (pre[n][c][i][j] - mu) / math.sqrt(var + eps) * gam[c] + bet[c]
    return out


def _loop_structured(m, s, t, *, temp=0.5, r=1.0, channel_mask=False, mask_order="code", at_form="code"):
    tot = {"am": 0.0, "at_ch": 0.0, "at_sp": 0.0, "nl": 0.0}
    for lvl, (h, w) in SIZES.items():
        sq = {k: 0.0 for k in tot}
        for n in range(N):
            sx, tx = s[lvl][n].tolist(), t[lvl][n].tolist()
            sa = _conv1x1(sx, m.adapters[lvl])
            c_ = len(tx)
            at, as_, ch_src = _a_sp(tx), _a_sp(sx), _a_ch(sa)  # channel attention from g(F^S): widths differ
            flat_t = [at[i][j] for i in range(h) for j in range(w)]
            flat_s = [as_[i][j] for i in range(h) for j in range(w)]
            if mask_order == "code":
                sp_t, sp_s = _softmax([v / temp for v in flat_t]), _softmax([v / temp for v in flat_s])
                sp = [h * w * (a + r * b) / (1 + r) for a, b in zip(sp_t, sp_s, strict=True)]
                ch_t, ch_s = _softmax([v / temp for v in _a_ch(tx)]), _softmax([v / temp for v in ch_src])
                ch = [c_ * (a + r * b) / (1 + r) for a, b in zip(ch_t, ch_s, strict=True)]
            else:
                sp = [h * w * v for v in _softmax([(a + r * b) / temp for a, b in zip(flat_t, flat_s, strict=True)])]
                ch = [c_ * v for v in _softmax([(a + r * b) / temp for a, b in zip(_a_ch(tx), ch_src, strict=True)])]
            for c in range(c_):
                for i in range(h):
                    for j in range(w):
                        d = (tx[c][i][j] - sa[c][i][j]) ** 2 * sp[i * w + j]
                        sq["am"] += d * (ch[c] if channel_mask else 1.0)
            if at_form == "code":
                ms = [sum(v for row in ch_ for v in row) / (h * w) for ch_ in sx]
                mt = [sum(v for row in ch_ for v in row) / (h * w) for ch_ in tx]
                fc = m.channel_fc[lvl]
                wt, b = fc.weight.tolist(), fc.bias.tolist()
                sq["at_ch"] += sum(
                    (mt[k] - sum(wt[k][c] * ms[c] for c in range(len(ms))) - b[k]) ** 2 for k in range(c_)
                )
                ps = [[sum(ch_[i][j] for ch_ in sx) / len(sx) for j in range(w)] for i in range(h)]
                pt = [[sum(ch_[i][j] for ch_ in tx) / c_ for j in range(w)] for i in range(h)]
                cs = _conv3x3_single(ps, m.spatial_conv[lvl])
                sq["at_sp"] += sum((pt[i][j] - cs[i][j]) ** 2 for i in range(h) for j in range(w))
            else:
                sq["at_ch"] += sum((a - b) ** 2 for a, b in zip(_a_ch(tx), _a_ch(sa), strict=True))
                at, as_ = _a_sp(tx), _a_sp(sx)
                sq["at_sp"] += sum((at[i][j] - as_[i][j]) ** 2 for i in range(h) for j in range(w))
        rs = _nl(m.nl_student[lvl], s[lvl].tolist())
        rt = _nl(m.nl_teacher[lvl], t[lvl].tolist())
        for n in range(N):
            ra = _conv1x1(rs[n], m.nl_adapt[lvl])
            sq["nl"] += sum(
                (ra[c][i][j] - rt[n][c][i][j]) ** 2 for c in range(len(ra)) for i in range(h) for j in range(w)
            )
        for k in tot:
            tot[k] += math.sqrt(sq[k])
    weights = {"am": m.w_am, "at_ch": m.w_ch, "at_sp": m.w_sp, "nl": m.w_nl}
    return {f"structured.{k}": weights[k] * v for k, v in tot.items()}


# ---- tests ------------------------------------------------------------------------------


def _golden(**flags):
    m = StructuredKD(levels=LEVELS, nl_levels=NL_LEVELS, **flags)
    _randomise(m, seed=7)  # non-zero BN weights: the NL blocks do something
    s, t = _feats(1, 3), _feats(2, 4)
    out = m(s, TeacherKnowledge(features=t), CTX)
    keys = {"temperature": "temp", "student_ratio": "r"}
    expected = _loop_structured(m, s, t, **{keys.get(k, k): v for k, v in flags.items()})
    assert set(out) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(out[key], torch.tensor(value), rtol=1e-5, atol=0, msg=key)
    return out


def test_registered():
    assert METHODS.get("structured") is StructuredKD


def test_golden_value_code_defaults():
    _golden()


def test_golden_value_paper_forms_with_channel_mask():
    _golden(mask_order="paper", at_form="paper", channel_mask=True, temperature=0.8, student_ratio=0.5)


def test_golden_value_code_order_channel_mask():
    _golden(channel_mask=True, student_ratio=2.0)


def test_non_local_block_starts_as_identity_and_pools_per_level():
    x = torch.randn(2, 4, 5, 5)
    block = NonLocal2d(4)
    torch.testing.assert_close(block(x), x)
    torch.testing.assert_close(block.eval()(x), x)
    m = StructuredKD(levels=LEVELS, nl_levels=NL_LEVELS)
    assert m.nl_teacher["p3"].theta.out_channels == 2 and m.nl_teacher["p3"].pool == 2
    assert m.nl_teacher["p4"].theta.out_channels == 1 and m.nl_teacher["p4"].pool == 1
    assert m.nl_student["p3"].theta.out_channels == 1  # 3 // 2
    # a 1x1 map with pool 2 keeps one key instead of failing
    assert torch.isfinite(NonLocal2d(4, pool=2)(torch.randn(2, 4, 1, 1))).all()


def test_masks_are_detached():
    m = StructuredKD(levels=LEVELS, w_ch=0, w_sp=0, w_nl=0, channel_mask=True)
    s = {k: v.requires_grad_(True) for k, v in _feats(1, 3).items()}
    t = _feats(2, 4)
    sa = m.adapters["p3"](s["p3"])
    sp, ch = m.masks(s["p3"], sa, t["p3"])
    assert not sp.requires_grad and not ch.requires_grad
    # the student's gradient equals that of the formula with constant masks, not with live ones
    m(s, TeacherKnowledge(features=t), CTX)["structured.am"].backward()

    def manual(live):
        x = s["p3"] if live else s["p3"].detach()
        mask = (spatial_attention(t["p3"], 0.5) + spatial_attention(x, 0.5)) / 2
        return torch.linalg.vector_norm(
            (t["p3"] - m.adapters["p3"](s["p3"])) * mask[:, None].sqrt() * ch[:, :, None, None].sqrt()
        )

    g_const = torch.autograd.grad(manual(False), s["p3"])[0]
    g_live = torch.autograd.grad(manual(True), s["p3"])[0]
    torch.testing.assert_close(s["p3"].grad / m.w_am, g_const, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(g_const, g_live, rtol=1e-3, atol=1e-6)


def test_flags_change_only_their_terms():
    base = _golden()
    paper_masks = _golden(mask_order="paper")
    chan = _golden(channel_mask=True)
    for key in ("structured.at_ch", "structured.at_sp", "structured.nl"):
        torch.testing.assert_close(paper_masks[key], base[key])
        torch.testing.assert_close(chan[key], base[key])
    assert not torch.allclose(paper_masks["structured.am"], base["structured.am"])
    assert not torch.allclose(chan["structured.am"], base["structured.am"])
    # with r = 0 the masks are the teacher's alone: both orders agree
    torch.testing.assert_close(
        _golden(student_ratio=0.0)["structured.am"], _golden(student_ratio=0.0, mask_order="paper")["structured.am"]
    )


def test_paper_at_form_builds_no_adapters_and_zero_weight_skips_terms():
    m = StructuredKD(levels=LEVELS, at_form="paper")
    assert not hasattr(m, "channel_fc") and not hasattr(m, "spatial_conv")
    m = StructuredKD(levels=LEVELS, w_nl=0.0, w_sp=0.0)
    assert not hasattr(m, "nl_student") and not hasattr(m, "spatial_conv")
    out = m(_feats(1, 3), TeacherKnowledge(features=_feats(2, 4)), CTX)
    assert set(out) == {"structured.am", "structured.at_ch"}


def test_zero_loss_and_finite_gradient_when_student_equals_teacher():
    levels = {k: LevelSpec(4, 4, v.stride) for k, v in LEVELS.items()}
    m = StructuredKD(levels=levels, adapter_init="identity")
    with torch.no_grad():
        for lvl in levels:
            m.channel_fc[lvl].weight.copy_(torch.eye(4))
            m.channel_fc[lvl].bias.zero_()
            m.spatial_conv[lvl].weight.zero_()
            m.spatial_conv[lvl].weight[0, 0, 1, 1] = 1.0
            m.spatial_conv[lvl].bias.zero_()
            nn.init.dirac_(m.nl_adapt[lvl].weight)
            m.nl_adapt[lvl].bias.zero_()
    t = _feats(2, 4)
    s = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    out = m(s, TeacherKnowledge(features=t), CTX)
    assert all(abs(v.item()) < 1e-9 for v in out.values())
    sum(out.values()).backward()  # sqrt / norm at 0 must not give NaN
    assert all(torch.isfinite(v.grad).all() for v in s.values())


def test_gradients_reach_student_and_every_module_never_teacher():
    m = StructuredKD(levels=LEVELS, channel_mask=True)
    with torch.no_grad():  # the zero BN init blocks gradient into theta/phi/g/W_z; open it
        for block in [*m.nl_student.values(), *m.nl_teacher.values()]:
            block.bn.weight.normal_()
    s = {k: v.requires_grad_(True) for k, v in _feats(1, 3).items()}
    t = {k: v.requires_grad_(True) for k, v in _feats(2, 4).items()}
    sum(m(s, TeacherKnowledge(features=t), CTX).values()).backward()
    for lvl in LEVELS:
        assert s[lvl].grad.abs().sum() > 0 and t[lvl].grad is None
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rejects_bad_options_and_grouped_teacher():
    with pytest.raises(ValueError, match="mask_order"):
        StructuredKD(levels=LEVELS, mask_order="sum")
    with pytest.raises(ValueError, match="at_form"):
        StructuredKD(levels=LEVELS, at_form="x")
    with pytest.raises(ValueError, match="nl_levels"):
        StructuredKD(levels=LEVELS, nl_levels={"p9": {"pool": 2}})
    with pytest.raises(ValueError, match="keys"):
        StructuredKD(levels=LEVELS, nl_levels={"p3": {"stride": 2}})
    m = StructuredKD(levels=LEVELS)
    t = {k: v[:, :2] for k, v in _feats(2, 4).items()}
    with pytest.raises(ValueError, match="channel_group"):
        m(_feats(1, 3), TeacherKnowledge(features=t, channel_group=2), CTX)
