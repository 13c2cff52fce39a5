"""Tiny random causal LMs (Llama, Qwen2, GPT-2) and a word-level tokenizer, built offline."""
from __future__ import annotations

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


def model(arch: str = "llama", *, layers: int = 4, hidden: int = 48, inter: int = 96, seed: int = 0,
          dtype=torch.float32, init: float = 0.02):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    v = vocab_size()
    common = dict(vocab_size=v, bos_token_id=2, eos_token_id=3, pad_token_id=0, initializer_range=init)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common)
        m = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common)
        m = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_inner=inter, n_layer=layers, n_head=4, n_positions=128, **common)
        m = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    return m.to(dtype).eval()
