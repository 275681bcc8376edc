"""Make the builtin model: a byte-level BPE tokenizer and a tiny Llama, trained on the stdlib corpus.

``saelab builtin train --out DIR`` runs :func:`train_builtin`; it checkpoints every few minutes and
on SIGINT/SIGTERM, and ``--resume`` continues bit-for-bit where it stopped (the data order is a pure
function of the seed and the step). ``saelab builtin eval`` runs :func:`evaluate_bits_per_byte`,
which also compresses the same validation files with xz (``lzma`` preset 9 | extreme) for scale.
"""

from __future__ import annotations

import json
import lzma
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from saelab import atomic
from saelab.corpus import CorpusSpec, documents, token_stream

BOS = "<|endoftext|>"


@dataclass
class BuiltinConfig:
    """How the builtin model is made. The defaults produce the shipped model."""

    vocab_size: int = 4096
    """BPE vocabulary, including the one special token ``<|endoftext|>`` (BOS/EOS, id 0)."""
    d_model: int = 192
    """Residual stream width."""
    n_layers: int = 4
    """Decoder blocks; the middle residual stream is ``blocks.2.hook_resid_pre``/``blocks.1.hook_resid_post``."""
    n_heads: int = 4
    """Attention heads (head size d_model / n_heads)."""
    d_mlp: int = 512
    """SwiGLU hidden width (≈ 8/3 · d_model, rounded to a multiple of 64)."""
    context: int = 256
    """Training sequence length (the model's RoPE works beyond it, up to max_position)."""
    max_position: int = 1024
    """max_position_embeddings written to the HF config."""
    tokens: int = 12_000_000
    """Training tokens (steps = tokens / (batch · context))."""
    batch: int = 16
    """Sequences per step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW), reached after warm-up, cosine-decayed to lr_min."""
    lr_min: float = 2e-4
    """Final learning rate."""
    warmup: int = 200
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (not on norms)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    seed: int = 0
    """Seeds weight init and data order."""
    checkpoint_seconds: float = 300.0
    """Wall-clock interval between checkpoints."""


def train_tokenizer(config: BuiltinConfig):
    """Byte-level BPE on the stdlib train split; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in documents(CorpusSpec("stdlib", "train"))), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=None, model_max_length=config.max_position
    )


def model_config(config: BuiltinConfig, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_mlp,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        max_position_embeddings=config.max_position,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )


def _tokenize_train(tokenizer, context: int, cache: Path) -> torch.Tensor:
    """All train-split tokens as ``[n_seq, context]`` int64 (cached as safetensors in the run folder)."""
    if cache.exists():
        return load_file(str(cache))["tokens"].long()
    ids = list(token_stream(documents(CorpusSpec("stdlib", "train")), tokenizer, bos_id=0, seed=0))
    n = len(ids) // context
    seqs = torch.tensor(ids[: n * context], dtype=torch.int16).view(n, context)
    atomic.write_tensors(cache, {"tokens": seqs})
    return seqs.long()


class _Permutations:
    """Caches one epoch's permutation so _batch_indices does not recompute it per sample."""

    def __init__(self, n_seq: int, seed: int):
        self.n_seq, self.seed, self.epoch, self.perm = n_seq, seed, -1, None

    def batch(self, step: int, batch: int) -> torch.Tensor:
        out = []
        for j in range(step * batch, (step + 1) * batch):
            epoch, i = divmod(j, self.n_seq)
            if epoch != self.epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self.epoch, self.perm = epoch, torch.randperm(self.n_seq, generator=g)
            out.append(int(self.perm[i]))
        return torch.tensor(out)


def lr_at(step: int, total: int, config: BuiltinConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, total - config.warmup))
    return config.lr_min + 0.5 * (config.lr - config.lr_min) * (1 + math.cos(math.pi * progress))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        i, key = name.split(".", 1)
        state.setdefault(int(i), {})[key] = value
    sd["state"] = state
    opt.load_state_dict(sd)


def _make_optimizer(model, config: BuiltinConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def _save_checkpoint(ckpt: Path, model, opt, step: int, config: BuiltinConfig, elapsed: float) -> None:
    with atomic.atomic_dir(ckpt) as tmp:
        # lm_head.weight is tied to the embedding: store it once (safetensors refuses shared memory)
        weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        atomic.write_tensors(tmp / "model.safetensors", weights)
        atomic.write_tensors(tmp / "optimizer.safetensors", _optimizer_tensors(opt))
        atomic.write_json(tmp / "state.json", {"step": step, "elapsed_s": elapsed, "config": asdict(config)})


def train_builtin(out: Path | str, config: BuiltinConfig | None = None, resume: bool = False, log=print) -> Path:
    """Train tokenizer and model into ``out`` (an HF model folder when done). Returns ``out``."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    config = config or BuiltinConfig()
    out = Path(out)
    ckpt = out / "checkpoint"
    atomic.recover_dir(ckpt)
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"{out} is not empty; pass --resume to continue the run in it, or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    if resume and (ckpt / "state.json").exists():
        saved = json.loads((ckpt / "state.json").read_text())["config"]
        diff = {k: (saved.get(k), v) for k, v in asdict(config).items()
                if saved.get(k) != v and k != "checkpoint_seconds"}
        if diff:
            raise ValueError(f"--resume with a different configuration than the checkpoint's: {diff}")

    torch.manual_seed(config.seed)
    if (out / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out))
    else:
        log("training the BPE tokenizer on the stdlib train split...")
        tokenizer = train_tokenizer(config)
        tokenizer.save_pretrained(str(out))
    data = _tokenize_train(tokenizer, config.context, out / "train_tokens.safetensors")
    model = LlamaForCausalLM(model_config(config, len(tokenizer)))
    opt = _make_optimizer(model, config)
    step, elapsed = 0, 0.0
    if (ckpt / "state.json").exists():
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
        model.tie_weights()
        _load_optimizer_tensors(opt, load_file(str(ckpt / "optimizer.safetensors")))
        state = json.loads((ckpt / "state.json").read_text())
        step, elapsed = state["step"], state["elapsed_s"]
        log(f"resumed at step {step}")
    atomic.truncate_jsonl_log(out / "train_log.jsonl", step)
    total = config.tokens // (config.batch * config.context)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{n_params / 1e6:.2f}M parameters, {data.shape[0]} train sequences, {total} steps")

    stop = {"now": False}

    def request_stop(signum, frame):
        stop["now"] = True

    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    perms = _Permutations(data.shape[0], config.seed)
    model.train()
    last_ckpt, t0 = time.time(), time.time() - elapsed
    try:
        with open(out / "train_log.jsonl", "a") as logf:
            while step < total and not stop["now"]:
                loss = _train_step(model, opt, data[perms.batch(step, config.batch)], lr_at(step, total, config), config)
                step += 1
                if step % 20 == 0 or step == total:
                    rec = {"step": step, "loss": round(loss, 4), "tokens": step * config.batch * config.context,
                           "elapsed_s": round(time.time() - t0, 1)}
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                    log(json.dumps(rec))
                if time.time() - last_ckpt > config.checkpoint_seconds:
                    _save_checkpoint(ckpt, model, opt, step, config, time.time() - t0)
                    last_ckpt = time.time()
        _save_checkpoint(ckpt, model, opt, step, config, time.time() - t0)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if step < total:
        log(f"stopped at step {step}/{total}; continue with --resume")
        return out
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    log(f"done: {step} steps, {time.time() - t0:.0f}s; model in {out}")
    return out


def _train_step(model, opt, batch: torch.Tensor, lr: float, config: BuiltinConfig) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(input_ids=batch, labels=batch).loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss.item()}; the checkpoint was not overwritten")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    opt.step()
    return loss.item()


def xz_bits_per_byte(data: bytes) -> float:
    """Bits per byte of ``xz -9e`` (LZMA2, preset 9 | extreme) on ``data``."""
    return 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)


@torch.no_grad()
def evaluate_bits_per_byte(model, tokenizer, corpus: CorpusSpec | str = CorpusSpec("stdlib", "validation"),
                           context: int = 256, batch: int = 16, progress=None) -> dict:
    """Held-out bits per byte of a causal LM, beside xz's on the same bytes.

    The validation documents are joined as one stream (BOS before each, fixed order) and scored
    in windows of ``context`` that overlap by one token, so every token but the first is predicted
    exactly once. Bits/byte = total NLL in bits / UTF-8 bytes of the documents.
    """
    docs = list(documents(corpus))
    stream = torch.tensor(list(token_stream(docs, tokenizer, bos_id=0, seed=None)), dtype=torch.long)
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    starts = list(range(0, len(stream) - 1, context))
    total_nll = 0.0
    model.eval()
    for b in range(0, len(starts), batch):
        chunk = starts[b : b + batch]
        length = min(context, len(stream) - 1 - chunk[-1])
        full = [s for s in chunk if s + context < len(stream)]
        for group in ([full] if full else []) + ([[chunk[-1]]] if chunk[-1] not in full else []):
            n = context if group is full else length
            x = torch.stack([stream[s : s + n] for s in group])  # (b, n)
            y = torch.stack([stream[s + 1 : s + n + 1] for s in group])  # (b, n)
            logits = model(input_ids=x).logits.float()  # (b, n, vocab)
            total_nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        if progress:
            progress(len(chunk))
    raw = b"".join(d.text.encode("utf-8") for d in docs)
    return {
        "files": len(docs),
        "bytes": n_bytes,
        "tokens": len(stream),
        "bytes_per_token": n_bytes / len(stream),
        "bits_per_byte": total_nll / math.log(2) / n_bytes,
        "xz_bits_per_byte": xz_bits_per_byte(raw),
    }


def export_checkpoint(run: Path | str, out: Path | str) -> Path:
    """Write the latest checkpoint of a (possibly unfinished) run as an HF model folder."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    run, out = Path(run), Path(out)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    config = BuiltinConfig(**state["config"])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(run))
    model = LlamaForCausalLM(model_config(config, len(tokenizer)))
    model.load_state_dict(load_file(str(run / "checkpoint" / "model.safetensors")), strict=False)
    model.tie_weights()
    model.eval().save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
