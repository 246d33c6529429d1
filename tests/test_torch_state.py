"""Whole-model torch state dicts: bitsandbytes Linear4bit both ways, merged Llama export."""

import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from helpers import random_weights

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
from safetensors.torch import save_file as torch_save_file  # noqa: E402

torch.set_num_threads(1)
UP = "model.layers.0.mlp.up_proj"


def _bnb_linear(w, b, fmt, dq):
    out_f, in_f = w.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.float32, compress_statistics=dq,
                            quant_type=fmt)
    lin.weight = bnb.nn.Params4bit(torch.from_numpy(w), requires_grad=False, quant_type=fmt, compress_statistics=dq)
    lin.bias = torch.nn.Parameter(torch.from_numpy(b), requires_grad=False)
    return lin.to("cpu")  # quantizes on the CPU


@pytest.mark.parametrize("fmt,dq", [("nf4", True), ("fp4", False)])
def test_read_bnb_linear4bit_without_requantizing(rng, tmp_path, fmt, dq):
    w = random_weights(rng, (48, 128))  # torch (out, in)
    b = random_weights(rng, (48,))
    lin = _bnb_linear(w, b, fmt, dq)
    sd = {f"{UP}.{k}": v for k, v in lin.state_dict().items()}
    sd["model.embed_tokens.weight"] = torch.randn(10, 128)
    sd["model.norm.weight"] = torch.ones(128)
    sd["lm_head.weight"] = torch.randn(10, 128)
    torch_save_file(sd, tmp_path / "model.safetensors")  # as transformers writes a 4-bit model
    v = qjax.interop.from_torch_state_dict(tmp_path / "model.safetensors")
    up = v["params"]["layers_0"]["mlp"]["up_proj"]
    q = up["kernel"]
    assert q.shape == (128, 48) and q.transposed and q.format == fmt and q.double_quant == dq
    assert np.asarray(q.packed).tobytes() == lin.weight.data.numpy().tobytes()  # codes bit for bit
    assert v["params"]["embed_tokens"]["embedding"].shape == (10, 128)
    assert v["params"]["lm_head"]["kernel"].shape == (128, 10)
    assert v["params"]["norm"]["scale"].shape == (128,)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    with torch.no_grad():
        ref = lin(torch.from_numpy(x)).numpy()
    ours = qjax.qmatmul(jnp.asarray(x), q) + up["bias"][None, :]
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


def test_read_bnb_blocks_across_rows(rng):
    """in_features not a multiple of the blocksize: blocks span rows. bitsandbytes' native CPU
    dequantize (and so Linear4bit's CPU forward) mis-indexes those blocks; its pure-torch reference
    dequantization is the oracle here."""
    bnb_ref = pytest.importorskip("bnb_ref")
    w, b = random_weights(rng, (48, 96)), random_weights(rng, (48,))
    lin = _bnb_linear(w, b, "nf4", True)
    sd = {f"{UP}.{k}": v for k, v in lin.state_dict().items()}
    q = qjax.interop.from_torch_state_dict(sd)["params"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert np.asarray(q.packed).tobytes() == lin.weight.data.numpy().tobytes()
    ref = bnb_ref.dequantize_4bit(lin.weight.data.numpy(), lin.weight.quant_state)
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(q)), ref.T)


@pytest.mark.parametrize("fmt,dq", [("nf4", True), ("fp4", True), ("nf4", False)])
def test_write_loads_in_bnb_linear4bit(rng, fmt, dq):
    w = random_weights(rng, (40, 64))  # torch (out, in)
    b = random_weights(rng, (40,))
    q = qjax.quantize(jnp.asarray(w.T), fmt, double_quant=dq, transposed=True)  # logical (in, out)
    variables = {"params": {"layers_0": {"mlp": {"up_proj": {"kernel": q, "bias": jnp.asarray(b),
                                                             "lora_a": jnp.zeros((64, 2)),
                                                             "lora_b": jnp.zeros((2, 40))}}}}}
    sd = qjax.interop.bnb_model_state_dict(variables)
    assert f"{UP}.weight.quant_state.bitsandbytes__{fmt}" in sd and not any("lora" in k for k in sd)
    lin = bnb.nn.Linear4bit(64, 40, bias=True, compute_dtype=torch.float32, quant_type=fmt)
    stats = {k[len(UP) + len(".weight."):]: torch.from_numpy(np.array(v)) for k, v in sd.items()
             if k.startswith(f"{UP}.weight.")}
    lin.weight = bnb.nn.Params4bit.from_prequantized(torch.from_numpy(np.array(sd[f"{UP}.weight"])), stats,
                                                     device="cpu", module=lin)
    lin.bias = torch.nn.Parameter(torch.from_numpy(np.array(sd[f"{UP}.bias"])), requires_grad=False)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    with torch.no_grad():
        ref = lin(torch.from_numpy(x)).numpy()
    ours = qjax.qmatmul(jnp.asarray(x), q) + jnp.asarray(b)[None, :]
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)
    # bitsandbytes' own quantization of the same weight has the same bytes
    assert _bnb_linear(w, b, fmt, dq).weight.data.numpy().tobytes() == np.asarray(sd[f"{UP}.weight"]).tobytes()
    # and reading it back gives the same QuantizedArray
    back = qjax.interop.from_torch_state_dict(sd)["params"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert back.packed.tobytes() == q.packed.tobytes() and back.absmax.tobytes() == q.absmax.tobytes()


def test_untransposed_kernel_needs_requantize(rng):
    q = qjax.quantize(jnp.asarray(random_weights(rng, (64, 32))), "nf4")
    with pytest.raises(ValueError, match="stored \\(in, out\\).*transposed=True"):
        qjax.interop.bnb_model_state_dict({"params": {"o_proj": {"kernel": q}}})
    sd = qjax.interop.bnb_model_state_dict({"params": {"o_proj": {"kernel": q}}}, requantize=True)
    assert sd["model.o_proj.weight"].shape == (64 * 32 // 2, 1)


def test_merged_llama_export_loads_in_transformers(rng, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(int(rng.integers(2**31)))
    hf = transformers.LlamaForCausalLM(cfg).eval()
    orig = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    variables = qjax.interop.from_torch_state_dict(orig)
    lora = qjax.LoraConfig(r=2, alpha=4)
    for i in range(2):
        attn = variables["params"][f"layers_{i}"]["self_attn"]
        for name in ("q_proj", "v_proj"):
            k = attn[name]["kernel"]
            attn[name] = {"kernel": qjax.quantize(k, "nf4", double_quant=True),
                          "lora_a": jnp.asarray(rng.standard_normal((k.shape[0], 2)).astype(np.float32)),
                          "lora_b": jnp.asarray(rng.standard_normal((2, k.shape[1])).astype(np.float32))}
    qjax.interop.save_merged(tmp_path, variables, lora, dtype=jnp.float32, hf_config=cfg.to_dict())
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    got = {k: v.detach().numpy() for k, v in loaded.state_dict().items()}
    assert set(got) == set(orig)
    for i in range(2):
        attn = variables["params"][f"layers_{i}"]["self_attn"]
        for name in ("q_proj", "v_proj"):
            p = attn[name]
            want = np.asarray(qjax.dequantize(p["kernel"], jnp.float32)) + lora.scaling * (
                np.asarray(p["lora_a"], np.float64) @ np.asarray(p["lora_b"], np.float64))
            np.testing.assert_allclose(got[f"model.layers.{i}.self_attn.{name}.weight"], want.T, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got[f"model.layers.{i}.mlp.down_proj.weight"],
                                      orig[f"model.layers.{i}.mlp.down_proj.weight"])
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], orig["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["lm_head.weight"], orig["lm_head.weight"])
