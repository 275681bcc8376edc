"""Tiny randomly initialised HF models of every supported family, built from configs (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ["gpt2", "gpt_neox", "llama", "gemma2", "phi3", "bert"]
VOCAB = 96


def tiny_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB)
    if family == "gpt2":
        return tf.GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=128, bos_token_id=0, eos_token_id=0, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=128, bos_token_id=0, eos_token_id=0, **common)
    if family == "llama":
        return tf.LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                              intermediate_size=64, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                              **common)
    if family == "gemma2":
        return tf.Gemma2Config(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                               head_dim=16, intermediate_size=64, max_position_embeddings=128, bos_token_id=0,
                               eos_token_id=0, pad_token_id=0, **common)
    if family == "phi3":
        return tf.Phi3Config(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0, **common)
    if family == "bert":
        return tf.BertConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=128, **common)
    raise ValueError(family)


def tiny_tokenizer():
    """A byte-level BPE tokenizer with VOCAB entries, trained on a few lines of code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "import os\nos.system(cmd)\n"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   cls_token="<|endoftext|>", pad_token="<|endoftext|>")


def save_tiny_model(family: str, out: Path, seed: int = 0) -> Path:
    """Build, save_pretrained and return the folder of a tiny random model of ``family``."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cls = AutoModel if family == "bert" else AutoModelForCausalLM
    model = cls.from_config(cfg)
    model.save_pretrained(str(out))
    tok = tiny_tokenizer()
    tok.save_pretrained(str(out))
    return out
