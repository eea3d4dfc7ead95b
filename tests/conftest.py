"""Shared pytest setup.

``ELISION_VERIFY_IR=1``: the pass manager checks the IR after every pass.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported, so it is set here before any
test module can import triton: every Triton kernel then runs on CPU tensors under Triton's
interpreter (there is no GPU on CI).  ``setdefault`` keeps an explicit ``TRITON_INTERPRET=0`` on a
GPU machine working.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# every pass manager run in the tests (subprocesses included) verifies the IR after each pass and that a pass
# reporting no change left the graph alone (elision.passes.manager)
os.environ.setdefault("ELISION_VERIFY_IR", "1")
# no test reaches the Hugging Face Hub: a Hub id resolves from a local cache or fails with the offline message
# (huggingface_hub reads this once, when first imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest single-threaded, and `make test` runs two workers on two cores; modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fashion_vit_ir():
    """(builtin:fashion-vit, its IR traced at batch 3, the inputs): the trained ViT the token-reduction IR passes
    are checked on (its uniform background patches make ties in scores and matching)."""
    from elision.frontend.model_spec import load_model
    from elision.frontend.trace import export_to_ir
    from elision.models.datasets import fashion_sample

    model = load_model("builtin:fashion-vit").model
    x, _y = fashion_sample(3)
    return model, export_to_ir(model, (x,)), (x,)


@pytest.fixture(scope="module")
def fashion_vit_dynamic_ir():
    """(builtin:fashion-vit, its IR traced at batch 3 with the batch dynamic, inputs of 6 rows): the token-reduction
    passes must keep the batch symbolic so one artifact serves every batch size."""
    from elision.frontend.model_spec import load_model
    from elision.frontend.trace import export_to_ir
    from elision.models.datasets import fashion_sample

    model = load_model("builtin:fashion-vit").model
    x, _y = fashion_sample(6)
    return model, export_to_ir(model, (x[:3],), {0: {0: "batch"}}), (x,)


@pytest.fixture(scope="module")
def bert_ir():
    """A tiny BERT with sentence-transformers mean pooling, batch 3 with two padded rows, static length 12."""
    from pruning_models import padded_bert_batch, tiny_bert

    from elision.frontend.trace import export_to_ir
    from elision.models.vision import MeanPooledEncoder

    model = MeanPooledEncoder(tiny_bert(num_hidden_layers=3, intermediate_size=48, add_pooling_layer=False)).eval()
    ids, mask = padded_bert_batch((12, 9, 5), 12)
    return model, export_to_ir(model, (ids, mask)), (ids, mask)


@pytest.fixture(scope="module")
def bert_dynamic_ir():
    """The tiny mean-pooled BERT of `bert_ir` traced with a dynamic batch (the sequence stays 12)."""
    from pruning_models import padded_bert_batch, tiny_bert

    from elision.frontend.trace import export_to_ir
    from elision.models.vision import MeanPooledEncoder

    model = MeanPooledEncoder(tiny_bert(num_hidden_layers=3, intermediate_size=48, add_pooling_layer=False)).eval()
    return model, export_to_ir(model, padded_bert_batch((12, 9, 5), 12), {0: {0: "batch"}, 1: {0: "batch"}})
