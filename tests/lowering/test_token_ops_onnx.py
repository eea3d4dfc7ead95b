"""The score tap + static top-k + sort + gather composition lowers to ONNX (TopK, GatherElements) and runs in
onnxruntime with the same kept tokens as torch, padding included."""
from __future__ import annotations

import torch

from elision.kernels import token_reduction as alg


class ClsPrune(torch.nn.Module):
    def forward(self, h, q, k, valid):
        scores = alg.attention_row_scores(q, k, 0, valid=valid)
        protected = torch.zeros_like(valid)
        protected[:, 0] = True
        out, idx, kept = alg.prune_tokens(h, scores, 0.25, protected, valid, num_protected=1)
        return out, idx, kept


def test_prune_tokens_lowers_to_onnx_topk_gather(tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    h, q, k = torch.randn(2, 17, 8), torch.randn(2, 2, 17, 4), torch.randn(2, 2, 17, 4)
    valid = torch.ones(2, 17, dtype=torch.bool)
    valid[1, 12:] = False  # second row is padded
    path = tmp_path / "prune.onnx"
    torch.onnx.export(ClsPrune(), (h, q, k, valid), str(path), dynamo=True, input_names=["h", "q", "k", "valid"])
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"TopK", "GatherElements", "Softmax"} <= ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"h": h.numpy(), "q": q.numpy(), "k": k.numpy(), "valid": valid.numpy()})
    expect = ClsPrune()(h, q, k, valid)
    assert got[0].shape == (2, 1 + alg.keep_count(16, 0.25), 8)
    assert (got[1] == expect[1].numpy()).all() and (got[2] == expect[2].numpy()).all()
    torch.testing.assert_close(torch.from_numpy(got[0]), expect[0], atol=1e-6, rtol=1e-6)
