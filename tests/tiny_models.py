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


def _rope_permute(w, n_head):
    """HF → llama.cpp row order of a rotary q/k projection (llama.cpp's converter does this; transformers
    undoes it when it reads the file)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
_GGUF_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_tiny_gguf(hf_dir: Path, out: Path):
    """Write the tiny Llama saved in ``hf_dir`` as a float32 GGUF file (llama.cpp's tensor names and
    tokenizer keys, as its converter writes them); returns the HF model it came from."""
    import json

    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(str(hf_dir)), AutoTokenizer.from_pretrained(str(hf_dir))
    c = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tok.backend_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t == tok.bos_token else gguf.TokenType.NORMAL for t, _ in vocab])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    for key, value in model.state_dict().items():
        v = value.float().numpy()
        if key in _GGUF_NAMES:
            name = _GGUF_NAMES[key]
        else:
            layer, sub = key.split(".")[2], ".".join(key.split(".")[3:-1])   # model.layers.<i>.<sub>.weight
            name = f"blk.{layer}.{_GGUF_BLOCK[sub]}.weight"
            if sub in ("self_attn.q_proj", "self_attn.k_proj"):
                v = _rope_permute(v, c.num_attention_heads if sub.endswith("q_proj") else c.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model
