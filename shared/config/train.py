"""What `train fit` does: the CSAE's size, loss weights, optimiser, schedule and data handling.

Three presets: `default` (ours), `paper` (the CSAE paper's Gemma-2-2B setup) and `tsae` (Temporal SAEs,
Bhalla et al. 2025: a Matryoshka BatchTopK SAE with InfoNCE on adjacent tokens' high-level codes). See PRESETS.

The default preset fits the embedded model on a 2-core CPU: a 4x dictionary, 300 steps, lr 5e-4 with a short
warmup and an L1 ramp; why each value, and what it costs against longer training: docs/training.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from csae.shared.config.base import ConfigError, check_finite, from_dict


@dataclass(frozen=True)
class TrainConfig:
    expansion: int = 4
    """Dictionary size as a multiple of d_model (paper: 1, i.e. 2304 features for Gemma-2-2B)."""

    batch_size: int = 512
    """Activation rows per optimiser step, over all ranks: batch_size/2 anchor/positive pairs (two tokens
    of one sequence) for every run, contrastive or not, so runs with the same seed read the same rows;
    every row is reconstructed. Even, and divisible by 2 x the number of ranks."""

    tokens: int = 153_600
    """Training rows per layer; steps = tokens // batch_size. More than the store holds means several epochs."""

    lr: float = 5e-4
    """Peak AdamW learning rate."""

    warmup_steps: int = 50
    """Linear warmup from 0 to lr over this many steps."""

    decay_fraction: float = 0.2
    """Linear decay to 0 over this final fraction of the steps (0: constant after warmup)."""

    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""

    grad_clip: float = 1.0
    """Clip the SAE's gradient norm to this, and the contrastive head's, each by its own norm (0: no
    clipping)."""

    architecture: Literal["relu", "topk", "batchtopk"] = "relu"
    """How sparsity is imposed. relu: ReLU + L1 (the paper's; sparsity set by l1); topk: the k largest ReLU
    pre-activations of each row (Gao et al. 2024; L0 = k exactly); batchtopk: the k x B largest of a batch of
    B rows while training (Bussmann et al. 2024), then one threshold estimated in training (saved as a
    JumpReLU SAE, as SAELens saves it)."""

    k: int = 64
    """topk: active features per row; batchtopk: per row on average over a batch. Unused by relu."""

    aux_k: float = 0.03125
    """topk/batchtopk: weight of Gao et al.'s auxiliary loss (the dead features' top k_aux = d_model/2
    pre-activations reconstruct the main reconstruction's residual; 1/32 as in the paper; 0: off)."""

    dead_steps: int = 50
    """topk/batchtopk: a feature that has not fired for this many steps counts as dead for the Aux-K loss."""

    threshold_lr: float = 0.1
    """batchtopk: rate of the moving average of each batch's smallest kept activation that becomes the
    inference threshold. SAELens' 0.01 averages over ~100 steps, which lags the still-moving weights of a
    run of a few hundred steps (held-out L0 15% under k at 300 steps; 0.1: within 4%)."""

    l1: float = 1.0
    """relu: lambda, weight of the L1 sparsity term sum_i |f_i| (inputs scaled to mean norm sqrt(d_model))."""

    l1_warmup_steps: int = 200
    """relu: ramp the L1 weight linearly from 0 to l1 over this many steps (0: full weight from the start)."""

    alpha: float = 2.0
    """Weight of the InfoNCE contrastive term (0 with beta 0: a plain ReLU SAE)."""

    beta: float = 10.0
    """Weight of the decoder diversity penalty: mean squared cosine of distinct decoder rows."""

    temperature: float = 0.1
    """InfoNCE temperature."""

    head_dim: int = 128
    """Output width c of the contrastive head h: R^d_sae -> R^c."""

    head_hidden: int = 0
    """Hidden width of the contrastive head (0: a single linear map)."""

    positives: Literal["context", "augment", "adjacent"] = "context"
    """InfoNCE positives: context = another token of the same sequence at a random offset; augment = two
    stochastic views (dropout + Gaussian noise) of the same activation; adjacent = the token next to the anchor
    in its sequence, (t-1, t) (T-SAE): the loader adds each anchor's neighbour to the batch that every run
    reads, for the contrastive term only."""

    matryoshka_high: float = 0.0
    """Fraction of the dictionary in the high-level block (T-SAE: 0.2): features [0, h) must also reconstruct x
    on their own (a Matryoshka prefix), so the reconstruction term is that of the prefix plus that of the whole
    dictionary. 0: no block, the plain reconstruction term."""

    high_level_weight: float = 0.25
    """Weight of the high-level prefix's reconstruction term, the whole dictionary's weighing 1 (T-SAE's authors
    weight the two 0.2 and 0.8). Unused without a high-level block (matryoshka_high 0)."""

    contrast_on: Literal["head", "high_level"] = "head"
    """What InfoNCE compares: head = the contrastive head's outputs h(f) (the CSAE); high_level = the
    high-level block's codes f[:, :h] themselves, by cosine, no head (T-SAE; needs matryoshka_high > 0)."""

    augment_dropout: float = 0.1
    """augment positives: probability of zeroing each input dimension in a view."""

    augment_noise: float = 0.1
    """augment positives: std of Gaussian noise added to a view (inputs have per-dimension rms about 1)."""

    diversity_features: int = 256
    """Decoder rows sampled per step for the diversity penalty (all rows when the dictionary is smaller)."""

    resample_every: int = 120
    """Every this many steps, features that did not fire in that window are resampled (0: never)."""

    resample_pool: int = 65_536
    """Training rows read (uniformly, or whole random chunks when streaming) to draw resampled directions
    from: without replacement, in proportion to squared reconstruction error."""

    resample_scale: float = 0.2
    """Encoder norm of a resampled feature, as a multiple of the mean living encoder norm."""

    resample_until: float = 0.8
    """No resampling after this fraction of the steps, so late-resampled features still get trained."""

    heldout_tail_fraction: float = 0.1
    """Tail of the store (whole sequences) that training never reads; the evaluator uses it."""

    in_memory_max_mb: int = 2048
    """Load a layer's whole training part into RAM when it is at most this many MiB, else stream chunks."""

    shuffle_rows: int = 65_536
    """When streaming: rows of whole random chunks read and shuffled together (the shuffle buffer)."""

    sparse: Literal["auto", "on", "off"] = "auto"
    """Run the SAE's decoder and the gradients on the active features only (same math, less work; see
    train/sparse.py). auto: on a CPU, whenever the previous step's feature density was below the measured
    break-even (train/sparse.py SPARSE_BELOW); on: always; off: the dense path."""

    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Autocast dtype of the forward; auto: bfloat16 where the hardware has fast bfloat16 matmuls (GPUs,
    CPUs with AVX512-BF16/AMX), else float32. Parameters and optimiser state are always float32."""

    device: str = "auto"
    """torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""

    seeds: tuple[int, ...] = (0, 1)
    """Training seeds: each trains its own SAE per layer (OUT/seed_<s>/layer_<L>/). A seed fixes the
    initialisation, data order, augmentations and resampling; runs that share a seed (the CSAE and its
    baseline) start from the same weights and read the same rows. Several seeds give seed-to-seed spread."""

    checkpoint_every: int = 500
    """Write a resumable checkpoint every this many steps (and at the end)."""

    def __post_init__(self) -> None:
        check_finite(self)
        positive = ("expansion", "batch_size", "tokens", "head_dim", "diversity_features", "checkpoint_every",
                    "shuffle_rows", "resample_pool", "k", "dead_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        nonneg = ("warmup_steps", "l1_warmup_steps", "weight_decay", "grad_clip", "l1", "alpha", "beta", "head_hidden",
                  "augment_noise", "resample_every", "resample_scale", "in_memory_max_mb", "aux_k",
                  "high_level_weight")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigError(f"lr and temperature must be positive, got lr={self.lr} temperature={self.temperature}")
        if self.batch_size < 4 or self.batch_size % 2:
            raise ConfigError(f"batch_size must be even and at least 4 (anchor/positive pairs), got {self.batch_size}")
        if not 0.0 < self.threshold_lr <= 1.0:
            raise ConfigError(f"threshold_lr must be in (0, 1], got {self.threshold_lr}")
        for name in ("decay_fraction", "resample_until", "augment_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.matryoshka_high < 1.0:
            raise ConfigError(f"matryoshka_high must be in [0, 1), got {self.matryoshka_high}")
        if self.contrast_on == "high_level" and self.matryoshka_high == 0:
            raise ConfigError("contrast_on=high_level needs a high-level block: set matryoshka_high (T-SAE: 0.2)")
        if not 0.0 <= self.heldout_tail_fraction < 1.0:
            raise ConfigError(f"heldout_tail_fraction must be in [0, 1), got {self.heldout_tail_fraction}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"seeds must be distinct non-negative integers, at least one, got {list(self.seeds)}")
        if self.steps < 1:
            raise ConfigError(f"tokens ({self.tokens}) must be at least batch_size ({self.batch_size})")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def contrastive(self) -> bool:
        return self.alpha > 0

    @property
    def trains_head(self) -> bool:
        """Whether the contrastive head gets gradients: InfoNCE is on and runs on the head."""
        return self.contrastive and self.contrast_on == "head"

    def high_level(self, d_sae: int) -> int:
        """Width of the high-level block of a dictionary of d_sae features (0: none); at least 1 when on."""
        return max(1, int(self.matryoshka_high * d_sae)) if self.matryoshka_high > 0 else 0

    @property
    def sparsity(self) -> tuple[str, float]:
        """The knob that sets this run's sparsity and its value: (k, k) for topk/batchtopk, (l1, l1) for relu."""
        return ("l1", self.l1) if self.architecture == "relu" else ("k", self.k)

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not what the user meant."""
        out = []
        if self.warmup_steps > self.steps:
            out.append(f"warmup_steps ({self.warmup_steps}) exceeds the run's {self.steps} steps: the learning "
                       f"rate never reaches lr={self.lr} (peak {self.lr * self.steps / self.warmup_steps:.2g})")
        return out


#: The paper's reference setup (Gemma-2-2B, 100k Pile tokens): every value the paper states.
PAPER: dict[str, Any] = {
    "expansion": 1,  # dictionary 2304 = Gemma-2-2B's d_model
    "batch_size": 512,
    "tokens": 100_000,
    "lr": 1e-4,  # AdamW
    "warmup_steps": 1000,
    "grad_clip": 1.0,
    "l1": 0.04,
    "alpha": 2.0,
    "temperature": 0.1,
    "head_dim": 128,
    "dtype": "bfloat16",
    "architecture": "relu",  # ReLU + L1
    "resample_every": 100,
    "resample_scale": 0.2,
}

#: Values the paper preset needs that the paper does not give: ours (docs/training.md, the paper preset).
PAPER_OURS: dict[str, Any] = {
    "l1_warmup_steps": 0,  # no L1 warmup described
    "k": 64,  # (topk/batchtopk only)
    "aux_k": 0.03125,  # (topk/batchtopk only)
    "dead_steps": 50,  # (topk/batchtopk only)
    "threshold_lr": 0.1,  # (batchtopk only)
    "decay_fraction": 0.0,  # no decay described: constant after warmup
    "weight_decay": 0.0,  # AdamW's decoupled decay not given; 0 keeps the loss the only pull on the weights
    "beta": 10.0,  # the diversity penalty's weight is not given: our default's, stated, not inherited
    "head_hidden": 0,  # a linear head
    "positives": "context",  # another token of the same sequence
    "matryoshka_high": 0.0,  # no high-level block (that is T-SAE's)
    "contrast_on": "head",  # InfoNCE on the contrastive head's outputs
    "high_level_weight": 0.25,  # (with a high-level block only)
    "augment_dropout": 0.1,  # (augment positives only)
    "augment_noise": 0.1,  # (augment positives only)
    "diversity_features": 256,  # rows per step of the diversity penalty (a 2304^2 Gram matrix every step is slow)
    "resample_pool": 65_536,  # Anthropic's recipe reads a pool of rows; the paper gives no size
    "resample_until": 1.0,  # "every 100 steps" with no end given: to the end
    "heldout_tail_fraction": 0.1,
    "in_memory_max_mb": 2048,
    "shuffle_rows": 65_536,
    "sparse": "auto",  # engineering: the same math either way
    "device": "auto",
    "seeds": (0, 1),
    "checkpoint_every": 500,
}

#: T-SAE (Bhalla et al., arXiv 2511.05541): what the paper gives, and (marked) what its authors' public code
#: (AI4LIFE-GROUP/temporal-saes, train_temporal.py and trainers/temporal_sequence_top_k.py) sets where the text
#: we could read gives no number.
TSAE: dict[str, Any] = {
    "architecture": "batchtopk",  # a Matryoshka BatchTopK SAE
    "matryoshka_high": 0.2,  # high-level block: 20% of the features, the low-level one 80%
    "high_level_weight": 0.25,  # authors' code: group weights 0.2 (prefix) and 0.8 (whole dictionary)
    "contrast_on": "high_level",  # InfoNCE on the high-level codes, cosine similarity, no projection head
    "positives": "adjacent",  # tokens t-1 and t of one sequence; in-batch negatives
    "beta": 0.0,  # no decoder-diversity term
    "l1": 0.0,  # no L1 (BatchTopK sets the sparsity)
    "resample_every": 0,  # no resampling: Aux-K revives dead features
    "alpha": 0.25,  # authors' code: temp_alpha 0.1 beside reconstruction terms weighted 0.4 (0.8 / 2 groups)
    "k": 20,  # authors' code: --k 20
    "expansion": 21,  # authors' code: 16,384 features on Pythia-160m's 768 dims (21.3x)
    "batch_size": 512,  # authors' code
    "tokens": 102_400_000,  # authors' code: 200,000 steps of 512
    "lr": 3e-4,  # authors' code: Adam
    "warmup_steps": 1000,  # authors' code
    "decay_fraction": 0.0,  # authors' code: no decay
    "weight_decay": 0.0,  # authors' code: Adam, no decay
    "grad_clip": 1.0,  # authors' code
    "aux_k": 0.03125,  # authors' code: auxk_alpha 1/32
    "dead_steps": 19_531,  # authors' code: dead after 10M tokens without firing (/ 512)
    "threshold_lr": 0.001,  # authors' code: threshold_beta 0.999
}

#: Values the tsae preset needs that neither the paper nor its code gives: ours (docs/training.md, T-SAE).
TSAE_OURS: dict[str, Any] = {
    "temperature": 0.1,  # not given; the authors' code uses raw dot products (no cosine, no temperature). A
    # cosine of non-negative codes lies in [0, 1]: at temperature 1 the logits would span 1. The CSAE's 0.1.
    "l1_warmup_steps": 0,  # (relu only)
    "head_dim": 128,  # no head is trained (contrast_on=high_level); one is still saved, as for the baseline
    "head_hidden": 0,
    "augment_dropout": 0.1,  # (augment positives only)
    "augment_noise": 0.1,
    "diversity_features": 256,  # (beta > 0 only)
    "resample_pool": 65_536,  # (resample_every > 0 only)
    "resample_scale": 0.2,
    "resample_until": 0.8,
    "heldout_tail_fraction": 0.1,
    "in_memory_max_mb": 2048,
    "shuffle_rows": 65_536,
    "sparse": "auto",  # engineering: the same math either way
    "dtype": "auto",
    "device": "auto",
    "seeds": (0, 1),
    "checkpoint_every": 500,
}

#: Presets: overrides of the TrainConfig defaults. `default` is ours; `paper` and `tsae` state every field.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {**PAPER, **PAPER_OURS},
    "tsae": {**TSAE, **TSAE_OURS},
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A preset with some fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return from_dict(TrainConfig, {**PRESETS[name], **overrides})
