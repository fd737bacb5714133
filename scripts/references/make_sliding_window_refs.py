#!/usr/bin/env python3
"""Reference files of a tiny random Mistral whose sliding window (4) is shorter than its prompts (issue 15).

Run on a machine with torch, transformers and peft; nothing is downloaded: the model is built from a config here
(MistralForCausalLM, fp32, attn_implementation="eager", so transformers' sliding-window mask applies: query i sees
keys i - 4 < j <= i), the tokenizer is copied from tiny-qwen2 and vocab_size is its size.

    python3 scripts/references/make_sliding_window_refs.py --tokenizer ../shared/models/tiny-qwen2 --out test/fixtures/arch

It writes test/fixtures/arch/mistral-sw/ with the files make_arch_refs.py writes for every model (its make(): see
its docstring): config.json, model.safetensors, tokenizer_config.json (tokenizer.json left out, as there),
reference.safetensors (input_ids, labels, logits at three positions, loss), greedy.json (16 greedy tokens, with and
without the adapter), chat.json, adapter/ (a PEFT LoRA, r=4, every linear module), lora_grads.safetensors (peft's
gradients on `labels`), bnb-4bit/ when bitsandbytes and CUDA are there, and README.md with the versions.
test/arch-mistral-sw.test.ts reads them.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_arch_refs as arch  # noqa: E402

WINDOW = 4
# head_dim 64: a size CUDA's attention kernels take; hidden 16 and tied embeddings keep the committed folder small
# (make_arch_refs.py: the tied bf16 embedding is most of it)
HIDDEN = 16
HEAD_DIM = 64
ROPE_THETA = 10000.0


def mistral_sw_rope():
    """the rope settings in both spellings make_arch_refs.make tries: transformers 4's rope_theta, 5's rope_parameters"""
    return [
        {"rope_theta": ROPE_THETA},
        {"rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA}},
    ]


def mistral_sw_expected_rope():
    """the inverse frequencies and attention scaling of plain RoPE over the whole head (what make's check wants)"""
    import torch

    shape = torch.arange(0, HEAD_DIM, 2, dtype=torch.int64).float() / HEAD_DIM
    return 1.0 / (ROPE_THETA**shape), 1.0


def mistral_sw_config(rope=None):
    from transformers import MistralConfig

    # head_dim 64 != hidden_size / num_attention_heads = 4; grouped-query heads; tied embeddings
    return MistralConfig(
        vocab_size=arch.VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        sliding_window=WINDOW,
        tie_word_embeddings=True,
        bos_token_id=arch.EOS,
        eos_token_id=arch.EOS,
        architectures=["MistralForCausalLM"],
        **(rope or mistral_sw_rope()[0]),
    )


# what make_arch_refs.make reads: config(rope) for each of rope()'s spellings until check_rope accepts one
SPEC = {
    "config": mistral_sw_config,
    "rope": mistral_sw_rope,
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "chat_template": None,
    "long": False,
}


def check_rope_of_mistral_sw():
    """make_arch_refs.check_rope takes its expectation from expected_rope(name), which knows qwen3 and phi3 only
    (any other name gets phi3's): give it mistral-sw's plain RoPE"""
    known = getattr(arch, "expected_rope", None)
    if known is not None:
        arch.expected_rope = lambda name: mistral_sw_expected_rope() if name == "mistral-sw" else known(name)


def check_window_applies(out, tokenizer_dir):
    """the saved model's logits must change when the window is lifted: otherwise the fixture tests nothing"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # tiny-qwen2's tokenizer: make() may leave tokenizer.json out of the fixture
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(arch.PROMPT, return_tensors="pt").input_ids
    assert ids.shape[1] > 2 * WINDOW, f"the prompt ({ids.shape[1]} tokens) must be longer than the window"
    with torch.no_grad():
        windowed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
        full = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, attn_implementation="eager", sliding_window=None
        )
        a, b = windowed(ids).logits[0, -1], full(ids).logits[0, -1]
    diff = float((a - b).abs().max())
    assert diff > 1e-2, f"lifting the window changes the last logits by {diff} only"
    return diff


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="the tiny-qwen2 folder (tokenizer.json, tokenizer_config.json)")
    ap.add_argument("--out", default="test/fixtures/arch", help="where the mistral-sw/ folder goes")
    args = ap.parse_args()

    import peft
    import torch
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    print(" ".join(f"{k} {v}" for k, v in versions.items()))
    os.makedirs(args.out, exist_ok=True)
    check_rope_of_mistral_sw()
    arch.make("mistral-sw", SPEC, args.tokenizer, args.out, versions)
    out = os.path.join(args.out, "mistral-sw")
    diff = check_window_applies(out, args.tokenizer)
    with open(os.path.join(out, "README.md"), "a") as f:
        f.write(
            f"- made by `scripts/references/make_sliding_window_refs.py` (make_arch_refs.make): sliding_window {WINDOW}, "
            f"shorter than the prompt; lifting it changes the last position's logits by up to {diff:.3f}\n"
        )
    print(f"mistral-sw: lifting the window changes the last logits by up to {diff:.3f}")


if __name__ == "__main__":
    main()
