"""Test data for the evaluate tests (the fixtures in conftest.py build it once): a tiny Gemma 3 that mostly
predicts "the next token repeats the current one", a topic corpus whose documents repeat words (so that
prediction is often right), a store pointing at both, and a writer of checkpoint directories in `train fit`'s
layout.

Topics use disjoint vocabularies, so a feature that fires exactly on forget-topic tokens can be planted.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import zarr

from csae.shared.config.base import to_dict
from csae.shared.config.harvest import HarvestConfig
from csae.shared.config.train import TrainConfig
from csae.shared.sae.autoencoder import SAE
from csae.shared.sae.checkpoint import LayerInfo, layer_dir, write_final
from csae.shared.sae.head import ContrastiveHead
from csae.shared.store.schema import ActivationStore, make_test_store

FORGET = "Biology and health sciences"
TOPIC_WORDS = {
    FORGET: "cell gene protein virus blood heart brain enzyme".split(),
    "History": "empire king war treaty dynasty battle revolt throne".split(),
    "Geography": "river mountain ocean desert island valley lake coast".split(),
    "Arts": "painting music poem sculpture novel opera dance film".split(),
    "Mathematics": "prime number matrix vector integral proof lemma graph".split(),
}
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
D_MODEL = 64
N_LAYERS = 4


def make_word_tokenizer(directory: Path) -> None:
    """One token per word: <pad>=0, <eos>=1, <bos>=2, <unk>=3, then the topic words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for ws in TOPIC_WORDS.values() for w in ws]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(directory)


def make_tiny_gemma3(directory: Path, seed: int = 0) -> Path:
    """A random Gemma 3 (4 blocks, d 64, tied embeddings) whose blocks add little to the residual (the
    post-norm gains are 0.01), so the logits favour the current token."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    make_word_tokenizer(directory)
    vocab = len(SPECIALS) + sum(len(w) for w in TOPIC_WORDS.values())
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=128, num_hidden_layers=N_LAYERS,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                           sliding_window=8, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                           layer_types=["sliding_attention", "full_attention"] * (N_LAYERS // 2))
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for block in model.model.layers:
            block.post_attention_layernorm.weight.fill_(-0.99)
            block.post_feedforward_layernorm.weight.fill_(-0.99)
    model.save_pretrained(directory)
    return directory


def make_topic_corpus(path: Path, docs_per_topic: int = 40, seed: int = 0) -> Path:
    """jsonl documents of the five topics; each document is its topic's words, each repeated 2-4 times."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(docs_per_topic):
            for topic, words in TOPIC_WORDS.items():
                text = " ".join(w for _ in range(8) for w in [rng.choice(words)] * rng.randint(2, 4))
                fh.write(json.dumps({"text": text, "title": f"{topic} {i}", "topic": topic}) + "\n")
    return path


def make_store(path: Path, model_dir: Path, corpus: Path, *, layers: tuple[int, ...] = (1, 2), n_docs: int = 64,
               seq_len: int = 32, chunk_rows: int = 256) -> ActivationStore:
    """A planted-structure test store (d 64) whose attributes name the tiny model and corpus, as harvest
    would record them."""
    make_test_store(path, layers=layers, d_model=D_MODEL, n_docs=n_docs, seq_len=seq_len, chunk_rows=chunk_rows,
                    topics=tuple(TOPIC_WORDS))
    group = zarr.open_group(str(path), mode="r+")
    hcfg = HarvestConfig(model=str(model_dir), dataset=str(corpus), heldout_doc_fraction=0.5, context=seq_len + 1,
                         layers=layers, tokens=n_docs * seq_len, chunk_rows=chunk_rows)
    group.attrs.update({"model": {"name": str(model_dir.resolve()), "sha256": "tiny"}, "config": to_dict(hcfg)})
    return ActivationStore.open(path)


def write_checkpoint(directory: Path, layer: int, sae: SAE, head: ContrastiveHead | None = None, *,
                     model: dict[str, Any] | None = None, store: str = "", seed: int = 0, **config: Any) -> Path:
    """A `train fit` seed_<seed>/layer_<layer> directory (csae.shared.sae.checkpoint.write_final, scale 1) whose
    TrainConfig holds the defaults with `heldout_tail_fraction` 0.25, overridden by `config`."""
    out = layer_dir(directory, seed, layer)
    out.mkdir(parents=True, exist_ok=True)
    head = head or ContrastiveHead(sae.d_sae, 8)
    cfg = TrainConfig(**{"heldout_tail_fraction": 0.25, **config})
    info = LayerInfo(config=cfg, seed=seed, layer=layer, store=store, model=model if model is not None else {},
                     scale=1.0, d_in=sae.d_in, d_sae=sae.d_sae, train_rows=0)
    write_final(out, sae, head, info)
    return out


def identity_sae(d: int) -> SAE:
    """A perfect SAE: f = [ReLU(x), ReLU(-x)], decoder [I; -I], so x_hat = x exactly."""
    sae = SAE(d, 2 * d)
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def random_sae(d: int, d_sae: int, seed: int = 0, bias: float = -0.5) -> SAE:
    """A random (imperfect) SAE with a negative encoder bias, so features fire sparsely."""
    sae = SAE(d, d_sae)
    sae.reset_parameters_(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.fill_(bias)
    return sae
