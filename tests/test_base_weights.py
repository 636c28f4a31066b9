"""Base linears read from the checkpoint and quantized to NF4 as read, against bitsandbytes'
dequantized weights run through transformers + PEFT + torch.autograd."""

import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from helpers import assert_not_trivial, dict_rel_err, peft_reference, rel_err
from helpers import teacher_forcing_inputs as inputs
from peft import PeftModel
from test_loading import functional_result
from transformers import AutoModelForCausalLM

import functional_probe as fp


def test_nf4_matches_fp32_twin_of_bitsandbytes_dequantized_weights(saved_tiny):
    base_dir, adapter_dir = saved_tiny
    model = fp.load_model(base_dir, adapter_dir, quantize="nf4")
    hf = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = module.weight.data
                packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                module.weight.copy_(dequantize_4bit(packed, state).to(w.dtype))
    twin = PeftModel.from_pretrained(hf, adapter_dir, is_trainable=True).eval()
    ids, mask, targets = inputs(model.vocab_size, seed=1)
    ref_logits, ref_grads = peft_reference(twin, ids, mask, targets)
    logits, grads = functional_result(model, ids, mask, targets)
    assert rel_err(logits[mask], ref_logits[mask]) <= 1e-5
    assert_not_trivial(ref_grads)
    assert dict_rel_err(grads, ref_grads) <= 1e-5


def test_nf4_load_never_holds_all_fp32_linears(saved_tiny):
    base_dir, adapter_dir = saved_tiny
    model = fp.load_model(base_dir, adapter_dir, quantize="nf4")
    dense = [n for n, b in model.named_buffers() if b.dim() == 2 and "layers" in n and b.is_floating_point()]
    assert dense == [], dense
