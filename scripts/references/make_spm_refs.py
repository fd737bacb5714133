#!/usr/bin/env python3
"""Tiny SentencePiece tokenizers for the GGUF export of SentencePiece-style vocabularies (issue 15).

Runs on the CPU with sentencepiece, tokenizers and transformers (5.17; no torch); nothing is downloaded: two BPE
models with byte fallback are trained here on lines of the alpaca demo data sets (English and Chinese), as Llama 2's
and Gemma 3's tokenizer.model were trained (their trainer and normalizer settings, a vocabulary of 1000 pieces
instead of 32000 / 262144, so that many Chinese characters fall back to bytes), and converted to tokenizer.json
with transformers' own converters.

    python3 scripts/references/make_spm_refs.py --data ../shared/datasets --out test/fixtures/spm

It writes test/fixtures/spm/<name>/ for two names:
    llama/    Llama 2's tokenizer kind (also TinyLlama's, Mistral v0.1's, Phi-3's): unk 0, <s> 1, </s> 2, no pad,
              add_dummy_prefix; tokenizer.json in the shape the Hub's Llama 2 files have (transformers 4's
              LlamaConverter: a Prepend("▁") + Replace(" ", "▁") normalizer, no pre-tokenizer, "<s> $A")
    gemma3/   Gemma 3's tokenizer kind: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> and [@BOS@] control pieces,
              <start_of_turn>, <end_of_turn>, <start_of_image>, <end_of_image> user-defined pieces (special added
              tokens in tokenizer.json, as in Gemma 3), <image_soft_token> an added token past the pieces (id 1000,
              as 262144 is in Gemma 3), no dummy prefix; tokenizer.json from transformers' Gemma converter with
              Gemma 3's "<bos> $A" post-processor; tokenizer_config.json with Gemma 3's keys and chat template
Each folder holds:
    tokenizer.model         the SentencePiece ModelProto
    tokenizer.json          compact JSON (the tests read it with @huggingface/tokenizers, as qlora does)
    tokenizer_config.json
    expected.json           texts: plain texts (English, Chinese, emoji and rare characters that need byte
                            fallback, leading, repeated and trailing spaces, newlines, tabs, digits);
                            sentencepiece: their ids by SentencePieceProcessor.encode (what llama.cpp's SPM
                            tokenizer reproduces); tokenizers: their ids by the tokenizers library with tokenizer.json
                            (no special tokens added: what qlora's tokenizer gives); special_texts / special_tokenizers:
                            texts with the tokenizer's special tokens in them and their tokenizers ids
    llama/ only: metaspace  the same vocabulary as transformers 5.17's LlamaTokenizer writes it (a Metaspace
                            pre-tokenizer with prepend_scheme "first" and no normalizer, as in Mistral v0.3's
                            tokenizer.json): its normalizer and pre_tokenizer (the tests put them into a copy of
                            tokenizer.json) and the tokenizers ids of texts and special_texts with it. Metaspace
                            "first" adds no "▁" before a text that starts with a space, nor after a special token,
                            where SentencePiece and llama.cpp do: the ids differ there
README.md                   the versions used
test/gguf-spm.test.ts reads them.
"""

import argparse
import io
import json
import os
import shutil
import tempfile

VOCAB_SIZE = 1000

PLAIN_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "床前明月光，疑是地上霜。",
    "请解释一下机器学习是什么。",
    "emoji 🦙🚀 and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok",
    " leading space",
    "   three leading spaces",
    "multiple   spaces  inside",
    "trailing space ",
    "line one\nline two\n\nline four",
    "\nstarts with a newline",
    "tabs\tand\r\nCRLF",
    "numbers 1234567 and 3.14159",
    "mixed 中文 and English 混合 text",
    "Àccénts ñ ß Ωμέγα Привет",
    "   ",
]
SPECIAL_TEXTS = {
    "llama": ["<s>Hello</s>", "<s> two</s><s>请</s>"],
    "gemma3": [
        "<start_of_turn>user\nWrite a poem.<end_of_turn>\n<start_of_turn>model\n",
        "<bos><start_of_image><image_soft_token><end_of_image> caption",
    ],
}

# Gemma 3's chat template (google/gemma-3-1b-it tokenizer_config.json)
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)


def training_lines(data_dir):
    """lines of the first 400 English and 100 Chinese alpaca records: few enough distinct Chinese characters
    (character_coverage must be >= 0.98) that they fit 1000 pieces with the 256 bytes"""
    lines = []
    for name, count in (("alpaca_en_demo.json", 400), ("alpaca_zh_demo.json", 100)):
        with open(os.path.join(data_dir, name), encoding="utf-8") as f:
            records = json.load(f)
        for record in records[:count]:
            for key in ("instruction", "input", "output"):
                lines += [line for line in record[key].split("\n") if line.strip()]
    return lines


def train(lines, **spec):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        # Llama 2's and Gemma's trainer and normalizer settings
        byte_fallback=True,
        character_coverage=0.98,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=2,
        minloglevel=2,
        **spec,
    )
    return model.getvalue()


def converted(model_bytes, tokenizer_class):
    """the tokenizer.json transformers writes for a folder holding only tokenizer.model (its slow -> fast
    conversion), as a dict"""
    import transformers

    folder = tempfile.mkdtemp()
    try:
        with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
            f.write(model_bytes)
        tok = getattr(transformers, tokenizer_class).from_pretrained(folder)
        return json.loads(tok.backend_tokenizer.to_str())
    finally:
        shutil.rmtree(folder)


def ids_of(tokenizer_json, texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


def added_token(id_, content, special):
    return {
        "id": id_,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def decoder_entry(content, special):
    return {k: v for k, v in added_token(0, content, special).items() if k != "id"}


def make_llama(lines):
    model = train(lines, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    metaspace = converted(model, "LlamaTokenizer")
    tokenizer = json.loads(json.dumps(metaspace))
    # the Hub's Llama 2 / TinyLlama tokenizer.json (transformers 4's LlamaConverter, legacy)
    tokenizer["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    tokenizer["pre_tokenizer"] = None
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<s>", "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    tokenizer["model"]["unk_token"] = "<unk>"
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            "0": decoder_entry("<unk>", True),
            "1": decoder_entry("<s>", True),
            "2": decoder_entry("</s>", True),
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }
    extra = {
        "metaspace": {
            "normalizer": metaspace["normalizer"],
            "pre_tokenizer": metaspace["pre_tokenizer"],
            "tokenizers": ids_of(metaspace, PLAIN_TEXTS),
            "special_tokenizers": ids_of(metaspace, SPECIAL_TEXTS["llama"]),
        }
    }
    return model, tokenizer, config, extra


def make_gemma3(lines):
    turn = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"]
    model = train(
        lines,
        add_dummy_prefix=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        control_symbols=["<mask>", "[@BOS@]"],
        user_defined_symbols=turn,
    )
    tokenizer = converted(model, "GemmaTokenizer")
    # Gemma 3's tokenizer.json: the turn and image tokens are special added tokens, <image_soft_token> is added
    # after the pieces, and the post-processor puts <bos> first
    for entry in tokenizer["added_tokens"]:
        entry["special"] = True
    tokenizer["added_tokens"].append(added_token(VOCAB_SIZE, "<image_soft_token>", True))
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": "<bos>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<bos>", "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}},
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(e["id"]): decoder_entry(e["content"], e["special"]) for e in tokenizer["added_tokens"]
        },
        "boi_token": "<start_of_image>",
        "bos_token": "<bos>",
        "chat_template": GEMMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eoi_token": "<end_of_image>",
        "eos_token": "<eos>",
        "image_token": "<image_soft_token>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    return model, tokenizer, config, {}


def write(out, name, model, tokenizer, config, extra):
    import sentencepiece as spm

    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(tokenizer, ensure_ascii=False, separators=(",", ":")))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    sp = spm.SentencePieceProcessor(model_proto=model)
    expected = {
        "texts": PLAIN_TEXTS,
        "sentencepiece": [sp.encode(t) for t in PLAIN_TEXTS],
        "tokenizers": ids_of(tokenizer, PLAIN_TEXTS),
        "special_texts": SPECIAL_TEXTS[name],
        "special_tokenizers": ids_of(tokenizer, SPECIAL_TEXTS[name]),
        **extra,
    }
    with open(os.path.join(folder, "expected.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(expected, ensure_ascii=False, separators=(",", ":")) + "\n")
    differ = [t for t, a, b in zip(PLAIN_TEXTS, expected["sentencepiece"], expected["tokenizers"]) if a != b]
    print(f"{name}: {sp.get_piece_size()} pieces; tokenizer.json differs from sentencepiece on {differ!r}")
    if "metaspace" in extra:
        m = [t for t, a, b in zip(PLAIN_TEXTS, expected["sentencepiece"], extra["metaspace"]["tokenizers"]) if a != b]
        print(f"{name} metaspace: differs from sentencepiece on {m!r}")


def main():
    import sentencepiece
    import tokenizers
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the folder with alpaca_en_demo.json and alpaca_zh_demo.json")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lines = training_lines(args.data)
    write(args.out, "llama", *make_llama(lines))
    write(args.out, "gemma3", *make_gemma3(lines))
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
        f.write(
            "# SentencePiece tokenizer fixtures (issue 15)\n\n"
            "Made by `scripts/references/make_spm_refs.py` (see its docstring for every file); do not edit by hand.\n\n"
            "| package | version |\n|---|---|\n"
            f"| sentencepiece | {sentencepiece.__version__} |\n"
            f"| tokenizers | {tokenizers.__version__} |\n"
            f"| transformers | {transformers.__version__} |\n\n"
            f"- {len(lines)} training lines: the first 400 records of alpaca_en_demo.json and 100 of "
            "alpaca_zh_demo.json (LLaMA-Factory's demo data, Apache-2.0)\n"
            f"- BPE, {VOCAB_SIZE} pieces, byte_fallback, character_coverage 0.98, split_digits, identity normalization\n"
        )


if __name__ == "__main__":
    main()
