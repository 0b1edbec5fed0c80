"""Tiny stand-ins for tests and benchmarks: a random-weight Gemma-2 with its own small tokenizer.

The paper's model (Gemma-2-2B, 26 blocks) cannot be downloaded here, so tests exercise the same
loading and forward code on a random-weight model with the same architecture and depth.
"""

from __future__ import annotations

from pathlib import Path

import torch

SAMPLE_TEXT = (
    "The cell is the basic unit of life. Rivers carry water to the sea. The empire fell in the fifth "
    "century. A prime number has exactly two divisors. Paintings hang in the museum. Proteins fold into "
    "shapes. Mountains rise above the plain. Kings and queens ruled the land."
)


def make_tokenizer(directory: Path, vocab_size: int = 300) -> None:
    """A byte-level BPE tokenizer with <pad>=0, <eos>=1, <bos>=2 (Gemma's ids), saved to `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(directory)


def make_tiny_gemma2(directory: Path, *, n_layers: int = 26, hidden: int = 64, seed: int = 0) -> Path:
    """A random-weight Gemma-2 (26 blocks like Gemma-2-2B, tiny width) plus tokenizer, saved to `directory`."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    make_tokenizer(directory)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(directory))
    cfg = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=256,
                       sliding_window=32, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(seed)
    Gemma2ForCausalLM(cfg).save_pretrained(directory)
    return directory
