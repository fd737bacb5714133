#!/usr/bin/env python3
"""Reference files of tiny random Qwen3, Phi-3 and Gemma 3 (text) models, made with transformers and peft (issue 15).

Run on a machine with torch, transformers and peft (bitsandbytes with CUDA adds the pre-quantized checkpoint);
nothing is downloaded: the models are built from config dicts here, the tokenizer is copied from tiny-qwen2.

    python3 scripts/references/make_arch_refs.py --tokenizer ../shared/models/tiny-qwen2 --out test/fixtures/arch

For each model it writes test/fixtures/arch/<name>/:
    config.json, model.safetensors (bf16), generation_config.json   the model, as save_pretrained writes it
    tokenizer_config.json   tiny-qwen2's (phi3: with a Phi-3-style chat template; gemma3: tiny-qwen2's own
                            template, as the tokenizer has none of Gemma's <start_of_turn> tokens); tiny-qwen2's tokenizer.json is
                            used to make the references and then removed (1.2 MB, the same as models/tiny-qwen2's:
                            the tests put it back beside a copy of the folder)
    reference.safetensors   input_ids, labels [1, T] (int64); logits [P, V] f32 at logit_positions [P] (int64) of
                            the fp32 forward (bf16 weights upcast, eager attention); loss [1] (labels: -100 on the
                            first 3 positions); phi3 also long_input_ids [1, T2] with T2 > original context and
                            long_logits at long_logit_positions (longrope's long_factor table)
    greedy.json             prompt_ids, output_ids (prompt + 16 greedy tokens, no eos stop), adapter_output_ids (the
                            same with the LoRA adapter), the smallest top-1/top-2 logit margin on the way; phi3 also
                            long_prompt_ids / long_output_ids
    chat.json               messages, prompt_ids (apply_chat_template, add_generation_prompt), output_ids (+16 greedy;
                            phi3's run passes the original context on the way: see greedy())
    adapter/                a PEFT LoRA (r=4, alpha 8, every linear module by its PEFT name, B nonzero:
                            init_lora_weights=False), save_pretrained
    lora_grads.safetensors  d loss / d every lora_A, lora_B (PEFT's saved names) of one loss.backward() on `labels`,
                            the adapter on the fp32 model in train mode (dropout 0), and loss [1]
    bnb-4bit/               (when bitsandbytes and CUDA are there) the model loaded in 4 bits (nf4, double quant,
                            compute fp32) and saved: config.json + model.safetensors
    README.md               the versions used and this list

Weights are drawn with a fixed seed and scaled so that logits are well spread and greedy text does not just repeat
its last token (embedding N(0, 0.3^2), projections N(0, 4/in), norms 1 + N(0, 0.2^2); with a larger tied embedding
every position predicts its own token; Gemma's RMSNorms scale by 1 + w, so its stored norm weights are the
same scales less 1, and it multiplies the embeddings by sqrt(hidden_size), so its stored (tied) embedding is divided
by that and its final norm multiplied by it: the residual stream and the logits spread as the other models'). The final norm is scaled by sqrt(128 / hidden_size), so that the logits
spread as a hidden-128 model's (std about 3.4) whatever the (small) hidden size: the top-1/top-2 gaps grow with
them, and the tests' logits tolerance is absolute. A seed whose greedy runs have a top-1/top-2 logit margin below
MIN_MARGIN is skipped for the next one (the seed used is in README.md), so that the fp32 tolerance cannot flip a choice.
"""

import argparse
import copy
import json
import math
import os
import shutil
import sys

import torch

# 10x the tests' logits tolerance (2e-3): no implementation within it can flip a greedy choice. Runs of 16 steps
# (prompt, chat, adapter; phi3's long prompt) with every gap >= 0.05, the earlier bound, are rare among seeds of
# these small models (phi3 at hidden 32: none of 100)
MIN_MARGIN = 0.02
NEW_TOKENS = 16
PROMPT = "The cat sat on the mat and looked at the little bird in the tree."
LONG_PROMPT = (
    "In the middle of the old town there is a small square with a fountain, and every morning the baker opens "
    "his shop while the children walk to school and the birds sing on the roofs."
)
MESSAGES = [{"role": "user", "content": "Write one line about the sea."}]
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
VOCAB = 16384
EOS = 16381
# the models are as small as their features allow: the fixtures are committed, and the working tree travels to the
# GPU machine within 64 MiB. With tiny-qwen2's vocabulary the tied bf16 embedding is most of model.safetensors
# (VOCAB x hidden x 2 bytes), so hidden_size is what is cut:
#   qwen3: hidden 16 with head_dim 64 (still != hidden / heads), q/k norms, GQA 4/2
#   phi3: hidden 64 in one head of 64 (phi3's head_dim is hidden / heads; CUDA's attention takes 64 and 128, and
#   test/gpu/arch.test.ts runs this fixture), so one key/value head: no GQA here (the synthetic phi3 of
#   test/arch-phi3.test.ts has it, against llama.cpp), partial rotary 0.5 (32 rotary dims: 16 factors)
QWEN3_HIDDEN = 16
PHI3_HIDDEN = 64
PHI3_HEADS = 1
PHI3_PARTIAL_ROTARY = 0.5
PHI3_ROTARY_HALF = int(PHI3_HIDDEN // PHI3_HEADS * PHI3_PARTIAL_ROTARY) // 2
#   gemma3: hidden 16 (its sqrt, the embedding scale, is exact in bf16; 64 would make model.safetensors 2 MB) with
#   head_dim 64, GQA 2/1, layers sliding, sliding, full with a window of 5 (below the prompts' lengths), the sliding
#   layers' RoPE base (1e4) other than the full layer's (1e6, linear factor 2), query_pre_attn_scalar 48 (not
#   head_dim), logits soft-capped at 10 (the logits spread to about +-13 uncapped, so the cap bends the top ones)
GEMMA3_HIDDEN = 16
GEMMA3_HEAD_DIM = 64
GEMMA3_WINDOW = 5
GEMMA3_THETA = 1000000.0
GEMMA3_LOCAL_THETA = 10000.0
GEMMA3_LINEAR_FACTOR = 2.0


# transformers 4 takes rope_theta / rope_scaling, 5 rope_parameters (and converts the old keys, mostly): each
# config is tried in both spellings and the first whose rotary embedding is the intended one is used (check_rope)
def qwen3_rope():
    return [
        {"rope_theta": 1000000.0},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    ]


def phi3_rope():
    # one factor per rotary frequency, from 1 to 1.75 (short) and to 12.25 (long)
    half = PHI3_ROTARY_HALF
    factors = {
        "short_factor": [1.0 + 0.75 * i / (half - 1) for i in range(half)],
        "long_factor": [1.0 + 11.25 * i / (half - 1) for i in range(half)],
    }
    partial = PHI3_PARTIAL_ROTARY
    return [
        {"rope_theta": 10000.0, "rope_scaling": {"type": "longrope", **factors}, "partial_rotary_factor": partial},
        {
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial, **factors},
            "partial_rotary_factor": partial,
        },
    ]


def gemma3_rope():
    scaling = {"rope_type": "linear", "factor": GEMMA3_LINEAR_FACTOR}
    return [
        {
            "rope_parameters": {
                "full_attention": {**scaling, "rope_theta": GEMMA3_THETA},
                "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_THETA},
            }
        },
        {"rope_theta": GEMMA3_THETA, "rope_local_base_freq": GEMMA3_LOCAL_THETA, "rope_scaling": scaling},
    ]


def qwen3_config(rope):
    from transformers import Qwen3Config

    # head_dim 64 != hidden_size / num_attention_heads = 4; q_norm / k_norm; no biases
    return Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=QWEN3_HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        use_sliding_window=False,
        bos_token_id=EOS,
        eos_token_id=EOS,
        architectures=["Qwen3ForCausalLM"],
        **rope,
    )


def phi3_config(rope):
    from transformers import Phi3Config

    return Phi3Config(
        vocab_size=VOCAB,
        hidden_size=PHI3_HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=PHI3_HEADS,
        num_key_value_heads=PHI3_HEADS,
        max_position_embeddings=256,
        original_max_position_embeddings=40,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        sliding_window=None,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=None,
        architectures=["Phi3ForCausalLM"],
        **rope,
    )


def gemma3_config(rope):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=GEMMA3_HIDDEN,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=GEMMA3_HEAD_DIM,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=GEMMA3_WINDOW,
        query_pre_attn_scalar=48,
        final_logit_softcapping=10.0,
        attn_logit_softcapping=None,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=None,
        architectures=["Gemma3ForCausalLM"],
        **rope,
    )


def gemma3_expected_rope():
    """the inverse frequencies of the full and the sliding layers (attention scaling 1 for both)"""
    shape = torch.arange(0, GEMMA3_HEAD_DIM, 2, dtype=torch.int64).float() / GEMMA3_HEAD_DIM
    return {
        "full_attention": 1.0 / (GEMMA3_THETA**shape) / GEMMA3_LINEAR_FACTOR,
        "sliding_attention": 1.0 / (GEMMA3_LOCAL_THETA**shape),
    }


def expected_rope(name):
    """inverse frequencies (the short table for phi3) and attention scaling the configs above mean"""
    if name == "qwen3":
        dim, base, factors, scaling = 64, 1000000.0, [1.0] * 32, 1.0
    else:
        dim, base, factors = 2 * PHI3_ROTARY_HALF, 10000.0, phi3_rope()[0]["rope_scaling"]["short_factor"]
        scaling = math.sqrt(1 + math.log(256 / 40) / math.log(40))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base**shape), scaling


def check_rope(name, model):
    """whether transformers built the rotary embedding the config means (rope keys understood, partial rotary)"""
    rotary = model.model.rotary_emb
    if name == "gemma3":
        # one table per layer type (transformers 5's Gemma3RotaryEmbedding)
        for kind, want in gemma3_expected_rope().items():
            got = getattr(rotary, f"{kind}_inv_freq", None)
            if got is None or got.shape != want.shape or not torch.allclose(got.detach().float().cpu(), want, rtol=1e-6):
                return False
            if abs(getattr(rotary, f"{kind}_attention_scaling") - 1.0) > 1e-6:
                return False
        return True
    inv_freq, scaling = expected_rope(name)
    got = rotary.inv_freq.detach().float().cpu()
    return got.shape == inv_freq.shape and torch.allclose(got, inv_freq, rtol=1e-6) and abs(rotary.attention_scaling - scaling) < 1e-6


MODELS = {
    "qwen3": {
        "config": qwen3_config,
        "rope": qwen3_rope,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "chat_template": None,
        "long": False,
    },
    "phi3": {
        "config": phi3_config,
        "rope": phi3_rope,
        "targets": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        "chat_template": PHI3_CHAT_TEMPLATE,
        "long": True,
    },
    "gemma3": {
        "config": gemma3_config,
        "rope": gemma3_rope,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        # tiny-qwen2's own template: its tokenizer has none of Gemma's turn tokens
        "chat_template": None,
        "long": False,
        # Gemma3RMSNorm scales by (1 + weight)
        "norm_offset": 1.0,
        # the model multiplies the embeddings by sqrt(hidden_size) (4, exact in bf16)
        "embed_scale": math.sqrt(GEMMA3_HIDDEN),
    },
}


def fp32():
    """the dtype keyword of from_pretrained / from_config: dtype in transformers 5, torch_dtype before"""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}


def scaled_init(model, seed, norm_offset=0.0, embed_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name == "model.norm.weight":
                v = (1.0 + 0.2 * z) * math.sqrt(128 / model.config.hidden_size) * embed_scale - norm_offset
            elif name.endswith("norm.weight"):
                v = 1.0 + 0.2 * z - norm_offset
            elif "embed_tokens" in name:
                v = 0.3 * z / embed_scale
            elif p.dim() == 2:
                v = 2.0 * z / math.sqrt(p.shape[1])
            else:
                v = 0.1 * z
            # the bf16 values the checkpoint will hold, so the fp32 reference runs on exactly those
            p.copy_(v.to(torch.bfloat16).to(torch.float32))


def greedy(model, ids, new_tokens, refill_at=None):
    """
    greedy continuation without an eos stop, one token a step over a KV cache as generate() runs it, and the
    smallest top-1/top-2 margin of its steps. refill_at (phi3: original_max_position_embeddings): the step whose
    cache holds that many positions runs the whole sequence again without a cache, on long_factor's table, as
    Phi3ForCausalLM.prepare_inputs_for_generation means to ("enforce re-compute cache"). transformers 5's generate()
    drops the cache there but then feeds only the last token (its input_ids are sliced by cache_position even
    without a cache), so from then on each token is predicted from the one before it alone: that is not followed.
    Runs that never reach refill_at are checked against generate() itself.
    """
    from transformers import DynamicCache

    seq = ids[0].tolist()
    margins = []
    refilled = False
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        logits = model(ids, past_key_values=cache, use_cache=True).logits[0, -1]
        for step in range(new_tokens):
            top = torch.topk(logits, 2).values
            margins.append(float(top[0] - top[1]))
            seq.append(int(logits.argmax()))
            if step == new_tokens - 1:
                break
            past = cache.get_seq_length()
            if refill_at is not None and past == refill_at:
                refilled = True
                cache = DynamicCache(config=model.config)
                logits = model(torch.tensor([seq]), past_key_values=cache, use_cache=True).logits[0, -1]
            else:
                step_ids = torch.tensor([[seq[-1]]])
                logits = model(
                    step_ids, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[past]])
                ).logits[0, -1]
    if not refilled:
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
        assert out[0].tolist() == seq, "the step-by-step greedy run differs from generate()"
    return seq, min(margins)


def write_tokenizer(src, out, chat_template):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(src, f), os.path.join(out, f))
    if chat_template is not None:
        path = os.path.join(out, "tokenizer_config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["chat_template"] = chat_template
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
            f.write("\n")


def logits_at(model, ids, positions):
    with torch.no_grad():
        logits = model(ids).logits[0]
    return logits[positions].contiguous()


def make(name, spec, tokenizer_dir, out_root, versions):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import LoraConfig, get_peft_model

    out = os.path.join(out_root, name)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    write_tokenizer(tokenizer_dir, out, spec["chat_template"])
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == VOCAB, f"the tokenizer has {len(tok)} tokens, the models {VOCAB}"
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    long_prompt = tok(LONG_PROMPT, return_tensors="pt").input_ids
    chat_ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(chat_ids, torch.Tensor):  # transformers 5 may hand back a BatchEncoding
        chat_ids = chat_ids["input_ids"]
    assert prompt.shape[1] > 8

    for rope in spec["rope"]():
        cfg = spec["config"](rope)
        if check_rope(name, AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", **fp32())):
            break
        print(f"{name}: transformers {versions['transformers']} reads {sorted(rope)} otherwise, trying the other spelling", file=sys.stderr)
    else:
        raise SystemExit(f"{name}: no spelling of the rope settings gives the intended rotary embedding")
    # the LoRA: every linear module by its PEFT name, B drawn (init_lora_weights=False) so every gradient is nonzero
    lora_cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=spec["targets"], lora_dropout=0.0, bias="none", init_lora_weights=False
    )
    for seed in range(100):
        torch.manual_seed(seed)
        cfg = spec["config"](rope)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", **fp32())
        scaled_init(model, seed, spec.get("norm_offset", 0.0), spec.get("embed_scale", 1.0))
        model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", **fp32())
        assert check_rope(name, model), "the saved config.json reloads with another rotary embedding"
        model.eval()
        model.generation_config.eos_token_id = None
        refill_at = getattr(cfg, "original_max_position_embeddings", None) if spec["long"] else None
        output_ids, margin = greedy(model, prompt, NEW_TOKENS, refill_at)
        margins = [margin]
        if spec["long"]:
            original = cfg.original_max_position_embeddings
            assert prompt.shape[1] + NEW_TOKENS <= original < long_prompt.shape[1], "prompt lengths vs the original context"
            long_output_ids, m = greedy(model, long_prompt, NEW_TOKENS, refill_at)
            margins.append(m)
        chat_output_ids, m = greedy(model, chat_ids, NEW_TOKENS, refill_at)
        margins.append(m)
        if min(margins) >= MIN_MARGIN:
            # the adapter's greedy run is checked token for token too: its margin counts (the LoRA on a copy, so
            # that `model` stays the base model)
            torch.manual_seed(seed + 1000)
            peft_model = get_peft_model(copy.deepcopy(model), lora_cfg)
            peft_model.eval()
            adapter_output_ids, m = greedy(peft_model, prompt, NEW_TOKENS, refill_at)
            margins.append(m)
            if min(margins) >= MIN_MARGIN:
                break
        print(f"{name}: seed {seed} has a greedy margin of {min(margins):.4f}, trying the next", file=sys.stderr)
    else:
        raise SystemExit(f"{name}: no seed gave greedy margins >= {MIN_MARGIN}")

    T = prompt.shape[1]
    positions = [0, T // 2, T - 1]
    labels = prompt.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        loss = model(prompt, labels=labels).loss
    ref = {
        "input_ids": prompt.to(torch.int64).contiguous(),
        "labels": labels.to(torch.int64).contiguous(),
        "logit_positions": torch.tensor(positions, dtype=torch.int64),
        "logits": logits_at(model, prompt, positions),
        "loss": loss.reshape(1).to(torch.float32),
    }
    greedy_json = {"prompt_ids": prompt[0].tolist(), "output_ids": output_ids, "seed": seed}
    if spec["long"]:
        T2 = long_prompt.shape[1]
        ref["long_input_ids"] = long_prompt.to(torch.int64).contiguous()
        ref["long_logit_positions"] = torch.tensor([T2 - 1], dtype=torch.int64)
        ref["long_logits"] = logits_at(model, long_prompt, [T2 - 1])
        greedy_json["long_prompt_ids"] = long_prompt[0].tolist()
        greedy_json["long_output_ids"] = long_output_ids
    save_file(ref, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "chat.json"), "w") as f:
        json.dump({"messages": MESSAGES, "prompt_ids": chat_ids[0].tolist(), "output_ids": chat_output_ids}, f)
        f.write("\n")

    peft_model.save_pretrained(os.path.join(out, "adapter"))
    peft_model.train()
    peft_model.zero_grad()
    lora_loss = peft_model(prompt, labels=labels).loss
    lora_loss.backward()
    grads = {"loss": lora_loss.detach().reshape(1).to(torch.float32)}
    for pname, p in peft_model.named_parameters():
        if "lora_" in pname:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{pname}: no gradient"
            grads[pname.replace(".default", "")] = p.grad.detach().to(torch.float32).contiguous()
    save_file(grads, os.path.join(out, "lora_grads.safetensors"))
    greedy_json["adapter_output_ids"] = adapter_output_ids
    greedy_json["min_margin"] = min(margins)
    with open(os.path.join(out, "greedy.json"), "w") as f:
        json.dump(greedy_json, f)
        f.write("\n")

    bnb_note = save_bnb(out)
    os.remove(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(readme(name, spec, versions, seed, greedy_json["min_margin"], bnb_note))
    print(f"{name}: seed {seed}, loss {loss.item():.5f}, LoRA loss {lora_loss.item():.5f}, margin {greedy_json['min_margin']:.3f}")


def save_bnb(out):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bnb-4bit/ not made: bitsandbytes is not installed"
    if not torch.cuda.is_available():
        return "bnb-4bit/ not made: no CUDA device"
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    m = AutoModelForCausalLM.from_pretrained(out, quantization_config=q, device_map={"": 0}, **fp32())
    m.save_pretrained(os.path.join(out, "bnb-4bit"), safe_serialization=True)
    return "bnb-4bit/: from_pretrained(quantization_config=nf4 + double quant, compute float32) then save_pretrained"


def readme(name, spec, versions, seed, margin, bnb_note):
    lines = [
        f"# tiny {name} references (issue 15)",
        "",
        "Made by `scripts/references/make_arch_refs.py` (see its docstring for every file); do not edit by hand.",
        "",
        "| package | version |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in versions.items()],
        "",
        f"- seed {seed}; smallest top-1/top-2 logit margin of the greedy runs: {margin:.4f}",
        f"- LoRA targets: {', '.join(spec['targets'])} (r=4, lora_alpha=8, init_lora_weights=False)",
        f"- {bnb_note}",
        "- fp32 on the CPU, eager attention, bf16 weights upcast",
        "",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="the tiny-qwen2 folder (tokenizer.json, tokenizer_config.json)")
    ap.add_argument("--out", default="test/fixtures/arch", help="where the <name>/ folders go")
    ap.add_argument("--only", choices=sorted(MODELS), help="make one model only")
    args = ap.parse_args()

    import peft
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    print(" ".join(f"{k} {v}" for k, v in versions.items()))
    os.makedirs(args.out, exist_ok=True)
    for name, spec in MODELS.items():
        if args.only and name != args.only:
            continue
        make(name, spec, args.tokenizer, args.out, versions)


if __name__ == "__main__":
    main()
