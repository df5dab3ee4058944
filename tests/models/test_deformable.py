"""MSDeformableAttention against a naive per-point implementation, hand-picked pixels and HF."""

from __future__ import annotations

import math
import os

import pytest
import torch

from rtdetr_lit.models.deformable import MSDeformableAttention
from rtdetr_lit.models.sampling import _MixRows, bilinear_corners

SHAPES = [(5, 7), (3, 4), (2, 1)]  # (H, W): non-square on purpose


def _bilinear(fmap: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Bilinear fmap (D, H, W) at normalised (x, y); zeros outside, pixel centres at +0.5."""
    _, h, w = fmap.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(fmap.shape[0], dtype=fmap.dtype)
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        if 0 <= xi < w and 0 <= yi < h:
            out += (1 - abs(px - xi)) * (1 - abs(py - yi)) * fmap[:, yi, xi]
    return out


def _naive(attn: MSDeformableAttention, query, ref, value, shapes, discrete=False):
    """Loop over batch, query, head and point; only the Linear layers are shared with the module.
    Discrete points read the pixel whose top-left corner is nearest (the reference rule) or the
    pixel containing them (``"centre"``)."""
    shift = 0.5 if attn.discrete_snap == "reference" else 0.0
    bsz, num_q, _ = query.shape
    heads, dim = attn.num_heads, attn.embed_dim // attn.num_heads
    v = attn.value_proj(value).reshape(bsz, -1, heads, dim)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    levels = [lvl for lvl, n in enumerate(attn.num_points_list) for _ in range(n)]
    offsets = attn.sampling_offsets(query).reshape(bsz, num_q, heads, -1, 2)
    logits = attn.attention_weights(query).reshape(bsz, num_q, heads, -1)
    out = torch.zeros(bsz, num_q, heads, dim, dtype=query.dtype)
    for b in range(bsz):
        for q in range(num_q):
            cx, cy, bw, bh = ref[b, q, 0].tolist()
            for hd in range(heads):
                weights = torch.exp(logits[b, q, hd]) / torch.exp(logits[b, q, hd]).sum()
                for p, lvl in enumerate(levels):
                    h, w = shapes[lvl]
                    n_l = attn.num_points_list[lvl]
                    x = cx + offsets[b, q, hd, p, 0].item() / n_l * bw * 0.5
                    y = cy + offsets[b, q, hd, p, 1].item() / n_l * bh * 0.5
                    fmap = v[b, starts[lvl] : starts[lvl + 1], hd].T.reshape(dim, h, w)
                    if discrete:
                        xi = min(max(math.floor(x * w + shift), 0), w - 1)
                        yi = min(max(math.floor(y * h + shift), 0), h - 1)
                        sample = fmap[:, yi, xi]
                    else:
                        sample = _bilinear(fmap, x, y)
                    out[b, q, hd] += weights[p] * sample
    return attn.output_proj(out.reshape(bsz, num_q, heads * dim))


def _random_module(points, method="grid_sample", snap="reference"):
    torch.manual_seed(0)
    attn = MSDeformableAttention(16, 2, 3, points, method=method, discrete_snap=snap).double()
    with torch.no_grad():  # non-trivial offsets and weights so that every path matters
        for lin in (attn.sampling_offsets, attn.attention_weights):
            lin.weight.normal_(0, 0.5)
            lin.bias.normal_(0, 1.0)
    return attn


def _inputs(bsz=2, num_q=3):
    n = sum(h * w for h, w in SHAPES)
    query = torch.randn(bsz, num_q, 16, dtype=torch.float64)
    value = torch.randn(bsz, n, 16, dtype=torch.float64)
    centre = torch.rand(bsz, num_q, 1, 2, dtype=torch.float64) * 0.8 + 0.1
    size = torch.rand(bsz, num_q, 1, 2, dtype=torch.float64) * 0.5 + 0.2
    return query, torch.cat([centre, size], -1), value


@pytest.mark.parametrize(
    ("method", "snap"),
    [("grid_sample", "reference"), ("discrete", "reference"), ("discrete", "centre")],
)
def test_matches_naive_loop_with_uneven_points(method, snap):
    attn = _random_module([4, 2, 1], method, snap)
    query, ref, value = _inputs()
    with torch.no_grad():
        got = attn(query, ref, value, SHAPES)
        want = _naive(attn, query, ref, value, SHAPES, discrete=method == "discrete")
    assert got.shape == (2, 3, 16)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def _index_reader(h: int, w: int, snap: str = "reference"):
    """One level, head and point; identity projections and zero offset weights, and a value map
    whose channel 0 holds each pixel's flat index: the output says which pixel was read."""
    attn = MSDeformableAttention(4, 1, 1, [1], method="discrete", discrete_snap=snap).double()
    with torch.no_grad():
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
        attn.sampling_offsets.weight.zero_()
    value = torch.zeros(1, h * w, 4, dtype=torch.float64)
    value[0, :, 0] = torch.arange(h * w, dtype=torch.float64)
    return attn, value


@pytest.mark.parametrize(
    ("snap", "want_x", "want_y"),
    [
        # the pixel containing (x*5, y*3), clamped to [0,4] and [0,2]
        ("centre", [0, 0, 0, 2, 4, 4, 0, 3], [0, 0, 0, 1, 2, 2, 0, 2]),
        # int(x*5+0.5) and int(y*3+0.5), truncated toward zero, then clamped
        ("reference", [0, 0, 1, 3, 4, 4, 0, 3], [0, 0, 1, 2, 2, 2, 0, 2]),
    ],
)
def test_discrete_picks_expected_pixels_on_non_square_map(snap, want_x, want_y):
    h, w = 3, 5
    attn, value = _index_reader(h, w, snap)
    # reference centres, zero size => loc = centre + bias offset * 0 = centre
    xs = [0.0, 0.09, 0.11, 0.5, 0.95, 1.3, -0.2, 0.69]
    ys = [0.0, 0.15, 0.17, 0.5, 0.95, 1.3, -0.2, 0.99]
    ref = torch.tensor([[[[x, y, 0.0, 0.0]] for x, y in zip(xs, ys, strict=True)]])
    out = attn(torch.zeros(1, len(xs), 4, dtype=torch.float64), ref.double(), value, [(h, w)])
    want = [yy * w + xx for xx, yy in zip(want_x, want_y, strict=True)]
    assert out[0, :, 0].tolist() == pytest.approx(want)


def test_point_references_move_one_pixel_per_unit_offset():
    h, w = 4, 6
    attn, value = _index_reader(h, w)
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([2.0, 1.0]))  # two pixels right, one down
    # inside the top-left pixel; two pixels right and one down is pixel (2, 1)
    ref = torch.tensor([[[[0.1 / w, 0.1 / h]]]], dtype=torch.float64)
    out = attn(torch.zeros(1, 1, 4, dtype=torch.float64), ref, value, [(h, w)])
    assert out[0, 0, 0].item() == 1 * w + 2


@pytest.mark.parametrize("snap", ["centre", "reference"])
def test_centre_snap_reads_what_grid_sample_reads_at_pixel_centres(snap):
    """At a pixel centre bilinear sampling returns that pixel alone; the "centre" rule must read
    the same pixel (a grid-trained model keeps its inputs), the reference rule reads the next."""
    h, w = 3, 5
    attn, value = _index_reader(h, w, snap)
    value[0, :, 1:] = torch.randn(h * w, 3, dtype=torch.float64)
    cx, cy = torch.meshgrid(
        (torch.arange(w, dtype=torch.float64) + 0.5) / w,
        (torch.arange(h, dtype=torch.float64) + 0.5) / h,
        indexing="xy",
    )
    ref = torch.stack([cx, cy, torch.zeros_like(cx), torch.zeros_like(cx)], -1).reshape(1, -1, 1, 4)
    query = torch.zeros(1, h * w, 4, dtype=torch.float64)
    discrete = attn(query, ref, value, [(h, w)])
    attn.set_method("grid_sample")
    grid = attn(query, ref, value, [(h, w)])
    assert torch.allclose(grid[0, :, 0], torch.arange(h * w, dtype=torch.float64))
    assert torch.allclose(discrete, grid) == (snap == "centre")


def test_unknown_discrete_snap_is_rejected():
    with pytest.raises(ValueError, match="discrete_snap 'round'"):
        MSDeformableAttention(8, 2, 1, [1], discrete_snap="round")


def test_offset_bias_init_formula():
    attn = MSDeformableAttention(32, 8, 3, [3, 1, 2])
    bias = attn.sampling_offsets.bias.reshape(8, 6, 2)
    for head in range(8):
        t = 2 * math.pi * head / 8
        direction = torch.tensor([math.cos(t), math.sin(t)])
        direction = direction / direction.abs().max()
        for p, k in enumerate([0, 1, 2, 0, 0, 1]):  # rank of each point within its level
            torch.testing.assert_close(bias[head, p], direction * (k + 1))
    assert torch.equal(attn.sampling_offsets.weight, torch.zeros_like(attn.sampling_offsets.weight))
    assert attn.attention_weights.weight.abs().sum() == 0
    assert attn.attention_weights.bias.abs().sum() == 0
    assert attn.value_proj.bias.abs().sum() == 0 and attn.output_proj.bias.abs().sum() == 0
    want_scale = [1 / 3] * 3 + [1.0] + [0.5] * 2
    assert attn.num_points_scale.tolist() == pytest.approx(want_scale)


def test_softmax_is_joint_over_levels():
    # two constant levels (level 0 all ones, level 1 all zeros), one point each: the output is the
    # weight of level 0's point, exp(a)/(exp(a)+exp(b)) jointly, but 1 with a per-level softmax
    attn = MSDeformableAttention(2, 1, 2, [1, 1]).double()
    with torch.no_grad():
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        attn.attention_weights.bias.copy_(torch.tensor([1.0, -0.5]))
    value = torch.cat([torch.ones(1, 4, 2), torch.zeros(1, 4, 2)], 1).double()
    ref = torch.tensor([[[[0.5, 0.5, 0.1, 0.1]]]], dtype=torch.float64)
    out = attn(torch.zeros(1, 1, 2, dtype=torch.float64), ref, value, [(2, 2), (2, 2)])
    want = math.exp(1.0) / (math.exp(1.0) + math.exp(-0.5))
    assert out[0, 0, 0].item() == pytest.approx(want)


def test_discrete_mode_freezes_offsets_and_back():
    attn = MSDeformableAttention(16, 2, 3, [4, 2, 1])
    attn.set_method("discrete")
    assert not attn.sampling_offsets.weight.requires_grad
    assert not attn.sampling_offsets.bias.requires_grad
    query, ref, value = (t.float() for t in _inputs())
    attn(query, ref, value, SHAPES).sum().backward()
    assert attn.sampling_offsets.weight.grad is None
    assert attn.attention_weights.weight.grad is not None
    attn.set_method("grid_sample")
    assert attn.sampling_offsets.weight.requires_grad and attn.sampling_offsets.bias.requires_grad
    with pytest.raises(ValueError):
        attn.set_method("bilinear")


@pytest.mark.parametrize("export_branch", [False, True])
def test_discrete_mixing_before_projection_gives_the_naive_outputs_and_gradients(
    export_branch, monkeypatch
):
    """Discrete attention mixes raw memory rows and projects afterwards (embedding_bag eagerly,
    Gather + MatMul in an ONNX export); the naive loop projects all memory first. Same function,
    so the same outputs and gradients, including a value bias that only cancels out if each
    head's weights sum to 1."""
    attn = _random_module([4, 2, 1], "discrete")
    with torch.no_grad():
        attn.value_proj.bias.normal_()
    if export_branch:
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)

    def grads(forward):
        torch.manual_seed(1)
        query, ref, value = _inputs()
        query.requires_grad_(True)
        value.requires_grad_(True)
        attn.zero_grad()
        out = forward(query, ref, value)
        out.pow(2).sum().backward()
        params = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
        return out.detach(), query.grad, value.grad, params

    got = grads(lambda q, r, v: attn(q, r, v, SHAPES))
    want = grads(lambda q, r, v: _naive(attn, q, r, v, SHAPES, discrete=True))
    torch.testing.assert_close(got[:3], want[:3])
    assert got[3].keys() == want[3].keys() >= {"value_proj.bias", "attention_weights.weight"}
    torch.testing.assert_close(got[3], want[3])


def test_bilinear_mixing_matches_grid_sample_outputs_and_gradients(monkeypatch):
    """Eager bilinear sampling (four corner rows per point, mixed before the projection) against
    projecting first and F.grid_sample (the exported path): same outputs and the same gradients,
    the sampling offsets' included, with boxes at the border so that corners fall outside."""
    attn = _random_module([4, 2, 1], "grid_sample")
    with torch.no_grad():
        attn.value_proj.bias.normal_()  # scaled by the in-map corner weight: must not cancel out
    query, _, value = _inputs()
    ref = torch.tensor([[0.02, 0.5, 0.3, 0.3], [0.97, 0.03, 0.2, 0.4], [0.5, 0.5, 0.9, 0.9]])
    ref = ref.to(torch.float64).expand(2, 3, 4)[:, :, None]
    token, corner_weights = bilinear_corners(
        torch.tensor([[[[[-0.01, 0.5], [0.99, 0.99]]]]], dtype=torch.float64), [(5, 7)], [2]
    )
    # corners (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1); outside ones weigh 0 and
    # read a clamped pixel. x = -0.01: pixel -0.57, i.e. 0.57 on column -1, 0.43 on column 0.
    want = torch.tensor([[0.0, 0.43, 0.0, 0.0], [0.57 * 0.55, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(corner_weights.reshape(2, 4), want)
    assert token.reshape(2, 4).tolist() == [[14, 14, 21, 21], [34, 34, 34, 34]]

    assert attn._mix_bilinear_first(3, sum(h * w for h, w in SHAPES))  # eager run: mixing

    def run():
        attn.zero_grad()
        q, v = query.clone().requires_grad_(True), value.clone().requires_grad_(True)
        out = attn(q, ref, v, SHAPES)
        out.pow(2).sum().backward()
        params = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
        return out.detach(), q.grad, v.grad, params

    mixed = run()
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    projected = run()
    torch.testing.assert_close(mixed[:3], projected[:3])
    assert mixed[3].keys() == projected[3].keys() >= {"sampling_offsets.weight", "value_proj.bias"}
    torch.testing.assert_close(mixed[3], projected[3])


def test_row_mixing_gradients_match_finite_differences_and_embedding_bag():
    """The mixing's own backward (reads regrouped by the row they read) on rows read by several
    bags, twice in one bag, by the last bag only, and never."""
    table = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([[0, 2, 2], [5, 0, 1], [2, 2, 2], [1, 5, 6]])  # 3 and 4 are never read
    weights = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_MixRows.apply, (table, rows, weights))

    upstream = torch.randn(4, 3, dtype=torch.float64)
    ours = torch.autograd.grad(_MixRows.apply(table, rows, weights), (table, weights), upstream)
    bag = torch.nn.functional.embedding_bag(rows, table, mode="sum", per_sample_weights=weights)
    torch.testing.assert_close(ours, torch.autograd.grad(bag, (table, weights), upstream))
    assert ours[0][3:5].eq(0).all() and ours[0][6].ne(0).all()


def test_bilinear_mixes_first_on_large_maps_only():
    # r18 at 640 px: 8400 memory tokens of 256 channels, 300 queries -> mix first
    assert MSDeformableAttention(256, 8, 3, 4)._mix_bilinear_first(300, 8400)
    # the CPU demo at 192 px: 756 tokens of 128 channels, 200 queries with denoising -> project
    assert not MSDeformableAttention(128, 8, 3, 4)._mix_bilinear_first(200, 756)


def test_discrete_mixing_runs_under_bf16_autocast():
    attn = _random_module([4, 2, 1], "discrete").float()
    query, ref, value = (t.float() for t in _inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(query, ref, value, SHAPES)
    torch.testing.assert_close(out.float(), attn(query, ref, value, SHAPES), atol=0.1, rtol=0.05)


def test_discrete_exports_to_onnx_without_grid_sample(tmp_path):
    onnx = pytest.importorskip("onnx")
    attn = _random_module([4, 2, 1], "discrete").float().eval()
    query, ref, value = (t.float() for t in _inputs(1))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, q, r, v):
            return self.attn(q, r, v, SHAPES)

    path = tmp_path / "attn.onnx"
    torch.onnx.export(Wrap(), (query, ref, value), str(path), dynamo=False, opset_version=17)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "GridSample" not in ops and "Loop" not in ops  # the Gather + MatMul mixing
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in sess.get_inputs()], (query, ref, value), strict=True))
    got = sess.run(None, {k: t.numpy() for k, t in feeds.items()})[0]
    torch.testing.assert_close(
        torch.from_numpy(got), attn(query, ref, value, SHAPES), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("method", ["grid_sample", "discrete"])
def test_matches_hf_deformable_attention(method):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = pytest.importorskip("transformers.models.rt_detr_v2.modeling_rt_detr_v2")
    from transformers import RTDetrV2Config

    cfg = RTDetrV2Config(
        d_model=16,
        decoder_attention_heads=2,
        decoder_n_levels=3,
        decoder_n_points=3,
        decoder_method="default" if method == "grid_sample" else "discrete",
    )
    theirs = hf.RTDetrV2MultiscaleDeformableAttention(cfg).double()
    ours = _random_module(3, method)  # HF's discrete rule is the reference's, our default
    state = {
        k.replace("num_points_scale", "n_points_scale"): v for k, v in ours.state_dict().items()
    }
    theirs.load_state_dict(state)
    query, ref, value = _inputs()
    shapes_t = torch.tensor(SHAPES)
    start = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
    with torch.no_grad():
        want, _ = theirs(
            hidden_states=query,
            encoder_hidden_states=value,
            reference_points=ref,
            spatial_shapes=shapes_t,
            spatial_shapes_list=SHAPES,
            level_start_index=start,
        )
        got = ours(query, ref, value, SHAPES)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
