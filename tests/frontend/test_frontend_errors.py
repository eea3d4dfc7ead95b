"""Bad input gets a clear error that names the problem and what to do."""
import json

import pytest
import torch

from elision.errors import ExportError, ModelSpecError, UnsupportedOpError, UntrustedCodeError
from elision.frontend.model_spec import load_model
from elision.frontend.trace import export_to_ir
from elision.ir import IRError, interpret, parse


class WithCond(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda y: self.proj(y), lambda y: y * 2, (x,))


def test_unsupported_op_names_op_and_location():
    with pytest.raises(UnsupportedOpError, match=r"higher-order operator cond.*elision IR represents torch ops"):
        export_to_ir(WithCond(), (torch.randn(3, 4),))


def test_specialized_dynamic_dim_is_reported():
    class FixedSeq(torch.nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], 8)  # forces seq * 4 == 8

    with pytest.raises(ExportError, match="seq"):
        export_to_ir(FixedSeq(), (torch.randn(2, 2, 4),), {0: {0: "batch", 1: "seq"}})


def test_size_one_example_on_dynamic_axis_is_rejected():
    with pytest.raises(ExportError, match="size >= 2"):
        export_to_ir(torch.nn.ReLU(), (torch.randn(1, 4),), {0: {0: "batch"}})


def test_broken_model_directories(tmp_path):
    with pytest.raises(ModelSpecError, match="config.json is missing"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelSpecError, match="not valid JSON"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelSpecError, match="never unpickles"):
        load_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelSpecError, match="cannot load weights"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("spec,msg", [
    ("", "empty model spec"),
    ("builtin:does-not-exist", "unknown builtin model 'does-not-exist'; known builtins:"),
    ("no_such_module_xyz:factory", "cannot import module 'no_such_module_xyz'"),
    ("platform:python_version", "must return an nn.Module"),
    ("bad_input_models:raising_factory", "raised RuntimeError: the checkpoint server is down"),
    ("/definitely/not/here", "no such directory"),
    (":boom:", "neither a directory, builtin:NAME, nor package.module:factory"),
])
def test_bad_specs(spec, msg):
    with pytest.raises(ModelSpecError, match=msg):
        load_model(spec, trust_code=True)


@pytest.mark.parametrize("spec", ["os:abort", "platform:python_version", "bad_input_models:eigh_model"])
def test_factory_specs_need_trust_code(spec):
    # importing a module and calling a function in it runs arbitrary code: only on explicit opt-in
    with pytest.raises(UntrustedCodeError, match=r"running arbitrary Python code; pass --trust-code \(trust_code=True"):
        load_model(spec)


def test_factory_spec_and_hf_directory_round_trip(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.kind == "causal-lm" and lm.input_names == ["input_ids"]
    assert lm.dynamic_dims == {0: {0: "batch", 1: "seq"}}
    lm2 = load_model("elision.models.tiny:_tiny_bert", trust_code=True)
    assert lm2.kind == "encoder"


def test_interpreter_rejects_wrong_shapes_and_malformed_ir():
    mod = parse("""
func @forward(%x : f32[batch, 4]) {
  %y : f32[batch, 4] = aten.relu.default(%x)
  return (%y)
}
""")
    with pytest.raises(IRError, match="dimension 1 is 5, expected 4"):
        interpret(mod, "forward", torch.randn(2, 5))
    with pytest.raises(IRError, match="takes 1 inputs"):
        interpret(mod, "forward")
    with pytest.raises(IRError, match="no function @decode"):
        interpret(mod, "decode", torch.randn(2, 4))
    with pytest.raises(IRError, match="use of undefined value %z"):
        parse("func @f(%x : f32[2]) {\n  %y : f32[2] = aten.relu.default(%z)\n  return (%y)\n}\n")
    with pytest.raises(IRError, match="cannot parse type"):
        parse("func @f(%x : q32[2]) {\n  return (%x)\n}\n")
