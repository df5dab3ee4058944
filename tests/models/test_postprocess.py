"""RTDETRPostProcessor on hand-made logits and boxes."""

from __future__ import annotations

import math

import pytest
import torch

from rtdetr_lit.models.postprocess import RTDETRPostProcessor


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _outputs() -> dict[str, torch.Tensor]:
    # 2 images, 3 queries, 2 classes; image 0's query 1 is confident for both classes
    probs = torch.tensor(
        [
            [[0.10, 0.20], [0.90, 0.80], [0.30, 0.05]],
            [[0.60, 0.01], [0.02, 0.03], [0.04, 0.70]],
        ]
    )
    boxes = torch.tensor(
        [
            [[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2]],
            [[0.5, 0.25, 1.0, 0.5], [0.3, 0.3, 0.1, 0.1], [0.9, 0.9, 0.2, 0.2]],
        ]
    )
    return {"pred_logits": torch.log(probs / (1 - probs)), "pred_boxes": boxes}


SIZES = torch.tensor([[200, 100], [64, 48]])  # (w, h), non-square


def test_topk_scores_labels_and_absolute_xyxy_boxes():
    results = RTDETRPostProcessor(num_classes=2, num_top_queries=3)(_outputs(), SIZES)
    assert len(results) == 2
    r0, r1 = results
    torch.testing.assert_close(r0["scores"], torch.tensor([0.9, 0.8, 0.3]))
    assert r0["labels"].tolist() == [0, 1, 0] and r0["labels"].dtype == torch.int64
    # query 1 twice (both labels), then query 2; cxcywh (0.25,0.75,0.5,0.5) -> xyxy * (200,100)
    q1 = [0.0 * 200, 0.5 * 100, 0.5 * 200, 1.0 * 100]
    q2 = [0.0, 0.0, 0.2 * 200, 0.2 * 100]
    torch.testing.assert_close(r0["boxes"], torch.tensor([q1, q1, q2]))
    torch.testing.assert_close(r1["scores"], torch.tensor([0.7, 0.6, 0.04]))
    assert r1["labels"].tolist() == [1, 0, 0]
    q2 = [0.8 * 64, 0.8 * 48, 1.0 * 64, 1.0 * 48]
    q0 = [0.0, 0.0, 64.0, 0.5 * 48]
    torch.testing.assert_close(r1["boxes"], torch.tensor([q2, q0, q2]))  # query 2 with both labels


def test_category_ids_mapping_and_deploy_format():
    post = RTDETRPostProcessor(num_classes=2, num_top_queries=4, category_ids=[7, 90])
    as_dicts = post(_outputs(), SIZES)
    assert as_dicts[0]["labels"].tolist() == [7, 90, 7, 90]
    labels, boxes, scores = post.deploy()(_outputs(), SIZES)
    assert labels.shape == (2, 4) and boxes.shape == (2, 4, 4) and scores.shape == (2, 4)
    for i, d in enumerate(as_dicts):
        assert torch.equal(labels[i], d["labels"])
        assert torch.equal(boxes[i], d["boxes"]) and torch.equal(scores[i], d["scores"])
    assert "category_ids" not in post.state_dict()


def test_k_is_capped_and_inputs_validated():
    results = RTDETRPostProcessor(num_classes=2, num_top_queries=300)(_outputs(), SIZES)
    assert results[0]["scores"].shape == (6,)  # Q * C
    assert torch.all(results[0]["scores"][:-1] >= results[0]["scores"][1:])
    with pytest.raises(ValueError):
        RTDETRPostProcessor(num_classes=3)(_outputs(), SIZES)
    with pytest.raises(ValueError):
        RTDETRPostProcessor(num_classes=2, category_ids=[1, 2, 3])


def test_deploy_mode_exports_to_onnx(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    post = RTDETRPostProcessor(num_classes=2, num_top_queries=4, category_ids=[7, 90]).deploy()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.post = post

        def forward(self, logits, boxes, sizes):
            return self.post({"pred_logits": logits, "pred_boxes": boxes}, sizes)

    outs = _outputs()
    args = (outs["pred_logits"], outs["pred_boxes"], SIZES)
    path = str(tmp_path / "post.onnx")
    torch.onnx.export(Wrap().eval(), args, path, dynamo=False, opset_version=17)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})
    for g, w in zip(got, post(outs, SIZES), strict=True):
        torch.testing.assert_close(torch.from_numpy(g), w)
