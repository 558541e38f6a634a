"""Weight-only int8 for the LLM: the layer's numbers, a whole model, the CLI option and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from videollava.cli import main
from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import MediaItem
from videollava.infer.sampling import SamplingParams
from videollava.model import quantize as q
from videollava.model.quantize import Int8Linear, QuantizeError, quantize_language_model, quantize_rows

EXAMPLES = Path(q.__file__).resolve().parent.parent / "assets" / "examples"

# bf16 keeps 8 significant bits: rounding one value moves it by at most 2^-9 of itself.
BF16_ROUNDING = 2.0**-9


def _linear(n_in: int, n_out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        layer.weight[3] *= 20  # rows of very different ranges: each gets its own scale
        if bias:
            layer.bias.normal_(0, 0.1)
    return layer.eval()


def test_rows_are_quantised_symmetrically_with_one_scale_each():
    weight = _linear(70, 33).weight.detach()
    weight[5] = 0  # an all-zero row
    qweight, scales = quantize_rows(weight)
    assert qweight.dtype == torch.int8 and scales.dtype == torch.float32
    assert qweight.shape == weight.shape and scales.shape == (33,)
    assert int(qweight.abs().max()) == 127 and int(qweight.min()) >= -127
    nonzero = [i for i in range(33) if i != 5]
    # The largest entry of each row lands on +-127, and rounding moves no entry by more than half a step.
    assert torch.equal(qweight[nonzero].abs().amax(dim=1), torch.full((32,), 127, dtype=torch.int8))
    error = (qweight.float() * scales[:, None] - weight).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-7).all())
    assert torch.equal(qweight[5], torch.zeros(70, dtype=torch.int8))
    # A block of rows at a time gives the same as all at once.
    original = q._ROW_BLOCK
    q._ROW_BLOCK = 4
    try:
        blocked = quantize_rows(weight)
    finally:
        q._ROW_BLOCK = original
    assert torch.equal(blocked[0], qweight) and torch.equal(blocked[1], scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [5, 40])  # 2 x rows: the CPU kernel below q._GEMM_ROWS, the GEMM from it
def test_int8_linear_matches_the_dequantised_float_layer(dtype, bias, rows):
    layer = Int8Linear.from_linear(_linear(96, 40, bias=bias)).eval()
    torch.manual_seed(1)
    x = torch.randn(2, rows, 96).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, rows, 40)
    # Reference: float64 product of the inputs as the CPU kernel reads them (bf16) and the
    # dequantised weight. The kernel's result is rounded to bf16 once, then the bias is added in
    # the output dtype: allowed error is two bf16 roundings of the largest output, plus a bf16
    # rounding of each term of the sum.
    x_kernel = x.to(torch.bfloat16).double()
    weight = layer.dequantized_weight(torch.float64)
    exact = x_kernel @ weight.T
    reference = exact + (layer.bias.double() if bias else 0)
    terms = x_kernel.abs() @ weight.abs().T
    tolerance = 2 * BF16_ROUNDING * reference.abs().max() + BF16_ROUNDING * terms
    assert bool(((out.double() - reference).abs() <= tolerance).all())
    # And close to the float layer it came from: within 2% of the largest output (int8 rounding is
    # at most 1/254 of a row's largest weight per weight).
    original = _linear(96, 40, bias=bias)
    float_out = F.linear(x.double(), original.weight.double(), None if not bias else original.bias.double())
    assert (out.double() - float_out).abs().max() < 0.02 * float_out.abs().max()


def test_kernel_and_gemm_paths_agree():
    """A prompt's rows (the GEMM) and a decoding step's (the kernel) get the same numbers."""
    assert 8 < q._GEMM_ROWS <= 80
    layer = Int8Linear.from_linear(_linear(96, 40)).eval()
    torch.manual_seed(4)
    x = torch.randn(80, 96)
    together = layer(x)  # (80, 40) through the GEMM
    alone = torch.cat([layer(x[i : i + 8]) for i in range(0, 80, 8)])  # through the kernel
    # Each path is within the reference's bound (see above), so the two are within twice that.
    terms = x.to(torch.bfloat16).double().abs() @ layer.dequantized_weight(torch.float64).abs().T
    bound = 2 * (2 * BF16_ROUNDING * together.abs().max() + BF16_ROUNDING * terms)
    assert bool(((together - alone).double().abs() <= bound).all())
    assert not torch.equal(together, alone)  # two different computations did run


def test_layer_takes_any_strides_and_a_flat_batch():
    layer = Int8Linear.from_linear(_linear(32, 16)).eval()
    torch.manual_seed(2)
    x = torch.randn(32, 7).T  # (7, 32), not contiguous in its last dimension
    assert not x.is_contiguous()
    assert torch.equal(layer(x), layer(x.contiguous()))
    assert torch.equal(layer(x[None])[0], layer(x))


def test_without_the_kernel_the_layer_widens_its_weight_and_agrees(monkeypatch):
    """The path of devices without `_weight_int8pack_mm` (float64 takes it on the CPU too)."""
    layer = Int8Linear.from_linear(_linear(48, 24)).eval()
    torch.manual_seed(3)
    x = torch.randn(4, 48, dtype=torch.float64)
    reference = x @ layer.dequantized_weight(torch.float64).T + layer.bias.double()
    torch.testing.assert_close(layer(x), reference, rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(q, "_kernel_available", lambda device: False)
    x32 = x.float()
    reference32 = x32.double() @ layer.dequantized_weight(torch.float64).T + layer.bias.double()
    # float32 throughout: a float32 matmul's error, far below the kernel's bf16 rounding.
    torch.testing.assert_close(layer(x32).double(), reference32, rtol=1e-5, atol=1e-5)


def test_every_tensor_follows_the_weights_device():
    """With PyTorch's default device set to meta, a tensor made without the weight's device fails."""
    layer = _linear(16, 8)
    x = torch.randn(3, 16)
    with torch.device("meta"):
        quantised = Int8Linear.from_linear(layer).eval()
        for rows in (3, 70):  # the kernel and the GEMM
            out = quantised(x.repeat(24, 1)[:rows])
            assert out.device.type == "cpu" and out.shape == (rows, 8)
    assert quantised.qweight.device.type == "cpu" and quantised.scales.device.type == "cpu"


def test_weights_still_on_the_meta_device_are_refused():
    with torch.device("meta"):
        layer = nn.Linear(8, 8)
    with pytest.raises(QuantizeError, match="loaded before"):
        quantize_language_model(nn.Sequential(layer).eval(), "int8")


@pytest.fixture(scope="module")
def tiny_pipelines(hf_checkpoint):
    folder = str(hf_checkpoint[0])
    return (
        Pipeline.from_pretrained(folder, dtype="float32"),
        Pipeline.from_pretrained(folder, dtype="float32", quantize="int8"),
    )


def test_only_the_decoder_linears_are_quantised(tiny_pipelines):
    plain, quantised = tiny_pipelines
    model = quantised.model
    llm = model.language_model
    layers = len(llm.get_decoder().layers)
    swapped = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]
    assert len(swapped) == 7 * layers  # q, k, v, o, gate, up, down
    assert all(name.startswith("language_model.model.layers.") for name in swapped)
    assert type(llm.lm_head) is nn.Linear
    assert not any(isinstance(m, Int8Linear) for m in model.image_tower.modules())
    assert not any(isinstance(m, Int8Linear) for m in model.video_tower.modules())
    assert not any(isinstance(m, Int8Linear) for m in model.multi_modal_projector.modules())
    assert model.dtype == plain.model.dtype == torch.float32
    # The towers and projector are the float model's, bit for bit.
    torch.testing.assert_close(
        model.multi_modal_projector.linear_1.weight, plain.model.multi_modal_projector.linear_1.weight
    )


def test_whole_tiny_model_logits_stay_close(tiny_pipelines):
    plain, quantised = tiny_pipelines
    ids = torch.tensor([[1, 17, 250, 33, 402, 9, 77, 120, 5, 301, 64, 8]])
    with torch.inference_mode():
        reference = plain.model.language_model(input_ids=ids).logits
        logits = quantised.model.language_model(input_ids=ids).logits
    assert logits.dtype == torch.float32
    # Stated tolerance: within 5% of the largest logit (int8 per-channel rounding is 1/254 of a row's
    # range per weight, bf16 inputs 1/512 per value, compounded over the LLM's layers).
    difference = (logits - reference).abs().max()
    assert difference <= 0.05 * reference.abs().max(), (difference, reference.abs().max())
    assert difference > 0  # the quantised model did run its own arithmetic
    # The ranking at each position agrees wherever the float model's top two are clearly apart.
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * difference
    assert torch.equal(logits.argmax(-1)[clear], reference.argmax(-1)[clear])


def test_default_model_answers_the_bundled_examples_alike():
    plain = Pipeline.from_pretrained(dtype="float32")
    quantised = Pipeline.from_pretrained(dtype="float32", quantize="int8")
    examples = json.loads((EXAMPLES / "examples.json").read_text())
    answers = {}
    for name, pipeline in (("float", plain), ("int8", quantised)):
        prepared = []
        for example in examples:
            media = [MediaItem(example["kind"], str(EXAMPLES / example["file"]))]
            images, videos = (1, 0) if example["kind"] == "image" else (0, 1)
            for question, _ in example["questions"]:
                prepared.append(pipeline.prepare(pipeline.build_prompt(question, images, videos), media))
        completions = Engine.for_pipeline(pipeline).generate(prepared, SamplingParams(max_new_tokens=10))
        answers[name] = [c.token_ids for c in completions]
    assert answers["int8"] == answers["float"]


def test_bf16_model_keeps_bf16_activations(hf_checkpoint):
    pipeline = Pipeline.from_pretrained(str(hf_checkpoint[0]), dtype="bfloat16", quantize="int8")
    layer = pipeline.model.language_model.get_decoder().layers[0].mlp.down_proj
    assert isinstance(layer, Int8Linear)
    with torch.inference_mode():
        logits = pipeline.model.language_model(input_ids=torch.tensor([[1, 5, 9]])).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())


def test_training_and_saving_a_quantised_model_are_refused(tiny_pipelines, tmp_path):
    _, quantised = tiny_pipelines
    with pytest.raises(QuantizeError, match="--quantize int8"):
        quantised.model.train()
    quantised.model.eval()
    with pytest.raises(QuantizeError, match="--quantize"):
        quantised.save_pretrained(tmp_path / "out")
    with pytest.raises(QuantizeError, match="training mode"):
        quantize_language_model(nn.Sequential(nn.Linear(4, 4)).train(), "int8")


def test_unknown_quantize_value_is_refused_before_loading(tmp_path):
    with pytest.raises(QuantizeError, match="quantize: unknown value 'int4'"):
        Pipeline.from_pretrained(tmp_path / "no-such-model", quantize="int4")


def test_cli_asks_with_int8_weights(hf_checkpoint, capsys):
    model = str(hf_checkpoint[0])
    image = str(EXAMPLES / "shapes-image.png")
    args = [
        "ask",
        "--model",
        model,
        "--dtype",
        "float32",
        "--image",
        image,
        "--max-new-tokens",
        "4",
        "--json",
    ]
    assert main([*args, "--quantize", "int8", "What is it?"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 1 <= len(result["token_ids"]) <= 4
    assert result["visual_tokens"] == 16


@pytest.mark.parametrize("value", ["int4", "INT8", ""])
def test_cli_refuses_bad_quantize_values(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "--quantize", value, "What is it?"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--quantize" in err and "invalid choice" in err
