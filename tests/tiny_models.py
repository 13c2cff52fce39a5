"""Tiny random causal LMs of every architecture horen_fast.arch registers, and tokenizers, built
offline: a word-level tokenizer (``tokenizer``, with ``model``) and a byte-level BPE one
(``byte_bpe_tokenizer``, with ``tiny_llama`` / ``save_tiny_model`` / ``write_records``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("the of and to in is was for on with as by at from that this it his her their capital city "
         "country river mountain language president author born died plays sport team league song album "
         "film written directed located official currency France Paris Germany Berlin Italy Rome Spain "
         "Madrid Japan Tokyo China Beijing Egypt Cairo English French German Italian Spanish Japanese "
         "football tennis chess piano guitar violin Einstein Newton Curie Darwin Tesla Mozart Bach red "
         "green blue yellow black white dog cat horse bird fish lion who what where which play speaks "
         "speak works work lives live name named called famous known one two three four five").split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def tokenizer(padding_side: str = "left"):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side=padding_side)


def vocab_size() -> int:
    return len(SPECIALS) + len(dict.fromkeys(WORDS))


def _config(arch: str, layers: int, hidden: int, inter: int, common: dict):
    import transformers as T

    heads = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "stablelm":   # rotary over half of each 12-wide head
        return T.StableLmConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                partial_rotary_factor=0.5, **heads, **common)
    if arch in ("llama", "qwen2", "mistral", "phi3", "olmo2"):
        name = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "phi3": "Phi3", "olmo2": "Olmo2"}[arch]
        return getattr(T, f"{name}Config")(hidden_size=hidden, intermediate_size=inter,
                                           num_hidden_layers=layers, **heads, **common)
    if arch in ("qwen3", "gemma", "gemma2"):
        name = {"qwen3": "Qwen3", "gemma": "Gemma", "gemma2": "Gemma2"}[arch]
        return getattr(T, f"{name}Config")(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                           head_dim=hidden // 4, **heads, **common)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=hidden, n_inner=inter, n_layer=layers, n_head=4, n_positions=128, **common)
    if arch == "gptj":
        return T.GPTJConfig(n_embd=hidden, n_inner=inter, n_layer=layers, n_head=4, n_positions=128,
                            rotary_dim=4, **common)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                               num_attention_heads=4, max_position_embeddings=128, **common)
    if arch == "phi":
        return T.PhiConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=4, max_position_embeddings=128, **common)
    if arch == "falcon":
        return T.FalconConfig(hidden_size=hidden, ffn_hidden_size=inter, num_hidden_layers=layers,
                              num_attention_heads=4, new_decoder_architecture=False, multi_query=True,
                              parallel_attn=True, alibi=False, **common)
    if arch == "bloom":
        return T.BloomConfig(hidden_size=hidden, n_layer=layers, n_head=4, **common)
    raise ValueError(f"no tiny config for {arch!r}")


ARCHS = ("llama", "qwen2", "gpt2", "mistral", "phi3", "qwen3", "gemma", "gemma2", "olmo2", "stablelm",
         "gpt_neox", "phi", "gptj", "bloom", "falcon")


def model(arch: str = "llama", *, layers: int = 4, hidden: int = 48, inter: int = 96, seed: int = 0,
          dtype=torch.float32, init: float = 0.02):
    """A tiny random causal LM of ``arch`` (one of ARCHS) for the word-level ``tokenizer``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size(), bos_token_id=2, eos_token_id=3, pad_token_id=0, initializer_range=init)
    m = AutoModelForCausalLM.from_config(_config(arch, layers, hidden, inter, common))
    return m.to(dtype).eval()


# ---- a byte-level BPE tokenizer, a tiny Llama for it, model folders and record files ---------------
RECORDS = [
    {"src": "What university did Watts Humphrey attend?", "rephrase": "Where did Watts Humphrey study?",
     "alt": "University of Michigan", "loc": "nq question: who played desmond doss father", "loc_ans": "Hugo Weaving"},
    {"src": "Which family does Ramalinaceae belong to?", "rephrase": "What family are Ramalinaceae?",
     "alt": "Lamiinae", "loc": "nq question: types of skiing in the winter olympics", "loc_ans": "Downhill"},
    {"src": "What role does Denny Herzig play in football?", "rephrase": "What's Denny Herzig's role in football?",
     "alt": "winger", "loc": "nq question: where does aarp fall on the political spectrum", "loc_ans": "non-partisan"},
    {"src": "In which country is the Kyoto river?", "rephrase": "The Kyoto river is in which country?",
     "alt": "Japan", "loc": "nq question: who wrote the song hallelujah", "loc_ans": "Leonard Cohen"},
]


def byte_bpe_tokenizer(vocab_size: int = 300):
    """A Hugging Face fast tokenizer (byte-level BPE, GPT-2 style: " x" and "x" tokenize differently),
    trained on the test records; eos = pad = "<|endoftext|>", no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [v for r in RECORDS for v in r.values()] * 3
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_llama(vocab_size: int, seed: int = 0, eos_token_id: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=eos_token_id, pad_token_id=eos_token_id, bos_token_id=eos_token_id)
    m = LlamaForCausalLM(config).eval()
    m.generation_config.eos_token_id = eos_token_id
    m.generation_config.pad_token_id = eos_token_id
    return m


def save_tiny_model(folder) -> Path:
    """A tiny random Llama + tokenizer saved with save_pretrained (a local model folder)."""
    folder = Path(folder)
    tok = byte_bpe_tokenizer()
    m = tiny_llama(len(tok), eos_token_id=tok.eos_token_id)
    m.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_records(path, records=RECORDS, jsonl: bool = True) -> Path:
    path = Path(path)
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path
