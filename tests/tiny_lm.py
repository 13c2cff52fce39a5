"""A tiny random Llama and a byte-level BPE tokenizer built offline (no downloads), for tests of the
evaluation and calibration commands."""
from __future__ import annotations

import json
from pathlib import Path

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
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=eos_token_id, pad_token_id=eos_token_id, bos_token_id=eos_token_id)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = eos_token_id
    return model


def save_tiny_model(folder) -> Path:
    """A tiny random Llama + tokenizer saved with save_pretrained (a local model folder)."""
    folder = Path(folder)
    tok = byte_bpe_tokenizer()
    model = tiny_llama(len(tok), eos_token_id=tok.eos_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_records(path, records=RECORDS, jsonl: bool = True) -> Path:
    path = Path(path)
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path
