"""The SAE as training sees it: its modules, how it encodes a batch (on the active entries only, or dense) and
the terms of its training loss. Like SAELens' TrainingSAE, it owns its training forward pass; the trainer
(csae.train.trainer) owns the optimiser, the clip, resampling and the loop, and calls only what is here. A new
architecture is a subclass (its own `features` and `training_forward_pass`) plus its config fields.

Shape suffixes: B rows of a batch, D model width, F features, C head width, P anchor rows.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

from csae.shared.config.train import TrainConfig
from csae.shared.errors import UserError
from csae.shared.sae.autoencoder import SAE, Activation, topk_relu
from csae.shared.sae.head import ContrastiveHead
from csae.train import losses, sparse
from csae.train.runtime import Runtime
from csae.train.seeds import DIVERSITY, INIT_HEAD, INIT_SAE, VIEWS, derive_seed, step_generator
from csae.train.sparse import Features

#: The saved (inference) activation of each training architecture: BatchTopK becomes a JumpReLU SAE whose
#: threshold is estimated in training.
INFERENCE_ACTIVATION: dict[str, Activation] = {"relu": "relu", "topk": "topk", "batchtopk": "jumprelu"}


class TrainingSAE:
    """SAE (ReLU + L1, TopK or BatchTopK) + contrastive head with reconstruction, sparsity (L1 for ReLU, Aux-K for
    the top-k ones), InfoNCE and decoder-diversity terms (alpha = beta = 0: the plain SAE)."""

    def __init__(self, cfg: TrainConfig, d_in: int, rt: Runtime, seed: int) -> None:
        self.cfg, self.rt, self.seed = cfg, rt, seed
        d_sae = d_in * cfg.expansion
        if cfg.architecture != "relu" and cfg.k > d_sae:
            raise UserError(f"k={cfg.k} exceeds the dictionary's {d_sae} features (d_model {d_in} x expansion "
                            f"{cfg.expansion}); lower k or raise expansion")
        self.sae = SAE(d_in, d_sae, activation=INFERENCE_ACTIVATION[cfg.architecture], k=cfg.k,
                       high_level=cfg.high_level(d_sae), device=rt.device)
        # the same for every run with this seed (the CSAE and its baseline start from the same weights)
        self.sae.reset_parameters_(torch.Generator().manual_seed(derive_seed(seed, INIT_SAE)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, INIT_HEAD))
            self.head = ContrastiveHead(d_sae, cfg.head_dim, cfg.head_hidden).to(rt.device)
        # W_enc (d_in, d_sae) and the head's first weight (c, d_sae) stored feature-major (their transposes
        # contiguous): the sparse path reads and writes them feature by feature, and a gradient laid out
        # like its parameter is used as is (else autograd copies it every step); matmuls read either layout
        # at the same speed
        self.sae.W_enc = torch.nn.Parameter(self.sae.W_enc.detach().t().contiguous().t())
        self.head.first.weight = torch.nn.Parameter(self.head.first.weight.detach().t().contiguous().t())
        # sparse path: decided per step from the previous step's density (dense at the start: a fresh
        # SAE has about half its features active)
        self.sparse_pays = self.sparse_now = False
        self.density = 1.0  # of the last step
        self.step_rng = torch.Generator()  # re-seeded for each use by step_generator (creating one costs 0.1 ms)
        self.dead_F: torch.Tensor | None = None  # set by the trainer before each step (Aux-K's dead features)
        self.select = {"relu": None, "topk": functools.partial(sparse.top_k_rows, k=cfg.k),
                       "batchtopk": functools.partial(sparse.top_k_batch, k=cfg.k)}[cfg.architecture]

    @property
    def trains_head(self) -> bool:
        """Whether the head gets gradients (and optimiser state): only when InfoNCE is on and runs on the head."""
        return self.cfg.trains_head

    @torch.no_grad()
    def init_b_dec_(self, sample_ND: torch.Tensor, iters: int = 30) -> None:
        """b_dec = geometric median of a sample (Weiszfeld iterations from the mean)."""
        x = sample_ND.float()
        m = x.mean(dim=0)
        for _ in range(iters):
            w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-6)
            m = (w[:, None] * x).sum(dim=0) / w.sum()
        if self.rt.distributed:
            dist.broadcast(m, src=0)
        self.sae.b_dec.copy_(m)

    def l1_at(self, step: int) -> float:
        """The L1 weight: ramped linearly from 0 over the first l1_warmup_steps (features that the full
        penalty would switch off before the reconstruction term has shaped them survive the start). 0 for
        the top-k architectures (k sets their sparsity)."""
        if self.cfg.architecture != "relu":
            return 0.0
        w = self.cfg.l1_warmup_steps
        return self.cfg.l1 * min(1.0, (step + 1) / w) if w else self.cfg.l1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.rt.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.rt.autocast_dtype)

    def begin_step(self) -> None:
        """Choose this step's path: sparse always with sparse=on, with auto when the last density said it pays."""
        self.sparse_now = self.cfg.sparse == "on" or (self.cfg.sparse == "auto" and self.sparse_pays)

    def end_step(self, l0: torch.Tensor) -> None:
        """The next step takes the sparse path when this step's density says it pays."""
        self.density = float(l0) / self.sae.d_sae
        self.sparse_pays = sparse.pays(self.density, self.rt.device, self.rt.compute_dtype)

    def views(self, x_PD: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two SimCLR-style views of each row: dropout then Gaussian noise (augment positives)."""
        g = step_generator(self.seed, step + self.rt.rank * 1_000_000_007, VIEWS, self.step_rng)
        out = []
        for _ in range(2):
            keep = torch.rand(x_PD.shape, generator=g).to(x_PD.device) >= self.cfg.augment_dropout
            noise = torch.randn(x_PD.shape, generator=g).to(x_PD.device) * self.cfg.augment_noise
            out.append(x_PD * keep / (1 - self.cfg.augment_dropout) + noise)
        return out[0], out[1]

    def features(self, x_BD: torch.Tensor) -> Features:
        """The SAE's features of a batch: on the active entries only (sparse path) or dense."""
        sae = self.sae
        if self.sparse_now:
            return sparse.encode(x_BD, sae.W_enc, sae.b_enc, sae.b_dec, self.rt.compute_dtype, self.select)
        with self.autocast():
            p_BF = sae.pre_activation(x_BD)
            if self.cfg.architecture == "topk":
                f_BF = topk_relu(p_BF, self.cfg.k)
            elif self.cfg.architecture == "batchtopk":  # the k x B largest of the batch, then ReLU
                idx = sparse.batch_top(p_BF.reshape(-1), self.cfg.k * len(p_BF))
                keep = torch.zeros(p_BF.numel(), dtype=torch.bool, device=p_BF.device).index_fill_(0, idx, True)
                f_BF = torch.relu(p_BF) * keep.view_as(p_BF)
            else:
                f_BF = torch.relu(p_BF)
            return sparse.DenseFeatures(f_BF, self.rt.autocast_dtype)

    @torch.no_grad()
    def update_threshold_(self, feats: Features, step: int) -> None:
        """BatchTopK: the inference threshold, a moving average of each batch's smallest kept activation
        (over all ranks), bias-corrected as Adam's moments are, so the zero it starts from does not linger."""
        kept = feats.vals_K if isinstance(feats, sparse.SparseFeatures) else feats.f_BF[feats.f_BF > 0]
        low = kept.float().min() if kept.numel() else self.sae.threshold.new_zeros(())
        if self.rt.distributed:
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
        # the average itself is the stored threshold times the last step's bias correction: no extra state, so a
        # resumed run repeats an uninterrupted one
        lr, thr = self.cfg.threshold_lr, self.sae.threshold
        ema = float(thr[0]) * (1 - (1 - lr) ** step) * (1 - lr) + lr * float(low)
        thr.fill_(ema / (1 - (1 - lr) ** (step + 1)))

    def aux_k_loss(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor | None:
        """Gao et al.'s auxiliary loss: the top k_aux = d_model / 2 pre-activations among the dead features
        reconstruct the residual x - x_hat (detached), so dead features get gradients. None: nothing dead."""
        if self.dead_F is None or not bool(self.dead_F.any()):
            return None
        dead_S = self.dead_F.nonzero().squeeze(1)
        k_aux = min(self.sae.d_in // 2, len(dead_S))
        sae = self.sae
        with self.autocast():  # W_enc is stored feature-major: its transpose's rows are the features
            p_BS = (x_BD - sae.b_dec) @ sae.W_enc.t().index_select(0, dead_S).t() + sae.b_enc.index_select(0, dead_S)
            top = torch.topk(p_BS, k_aux, dim=1, sorted=False)
            f_BS = torch.zeros_like(p_BS).scatter(1, top.indices, torch.relu(top.values))
            e_hat_BD = f_BS @ sae.W_dec.index_select(0, dead_S)
        return losses.reconstruction((x_BD - x_hat_BD).detach(), e_hat_BD)

    @torch.no_grad()
    def reconstruct(self, x_BD: torch.Tensor) -> torch.Tensor:
        """x_hat of a batch (the resampling pool's errors), on the path the training step takes."""
        return self.features(x_BD).affine(self.sae.W_dec, self.sae.b_dec, "decoder")

    def head_z(self, feats: Features) -> torch.Tensor:
        """The contrastive head on features; its first layer through feats.affine, so sparse stays sparse."""
        first, second = self.head.first, self.head.second
        z_BC = feats.affine(first.weight.t(), first.bias, "head")
        if second is None:
            return z_BC
        with self.autocast():
            return second(torch.relu(z_BC))

    def split_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loader's rows as (the batch every run reads and reconstructs, the anchors' neighbours or None):
        with adjacent positives the loader appends one neighbour per anchor pair, the last third (ChunkLoader)."""
        if self.cfg.positives != "adjacent":
            return x, None
        B = len(x) // 3 * 2
        return x[:B], x[B:]

    def training_forward_pass(self, x: torch.Tensor, step: int
                              ) -> tuple[dict[str, torch.Tensor], torch.Tensor, Features]:
        """Each loss term (recon_loss, recon_high, l1, aux_k, info_nce, diversity) and their weighted sum `loss`,
        the reconstruction x_hat_BD and the features of the batch (`split_batch`'s first part)."""
        cfg, h = self.cfg, self.sae.high_level
        x_BD, x_adj_PD = self.split_batch(x)
        zero = x_BD.new_zeros(())
        feats = self.features(x_BD)
        x_hat_BD = feats.affine(self.sae.W_dec, self.sae.b_dec, "decoder")
        terms = {"recon_loss": losses.reconstruction(x_BD, x_hat_BD), "recon_high": zero, "l1": feats.l1(),
                 "info_nce": zero, "diversity": zero, "aux_k": zero}
        # each weighted term added by one op (torch.add's alpha), one graph node
        loss = torch.add(terms["recon_loss"], terms["l1"], alpha=self.l1_at(step))
        high = feats.prefix(h) if h else None  # the high-level block's codes (a Matryoshka prefix)
        if high is not None:  # it reconstructs on its own too, with the same b_dec
            x_hat_high_BD = high.affine(self.sae.W_dec[:h], self.sae.b_dec, "decoder_high")
            terms["recon_high"] = losses.reconstruction(x_BD, x_hat_high_BD)
            loss = torch.add(loss, terms["recon_high"], alpha=cfg.high_level_weight)
        if cfg.architecture != "relu" and cfg.aux_k > 0 and (aux := self.aux_k_loss(x_BD, x_hat_BD)) is not None:
            terms["aux_k"] = aux
            loss = torch.add(loss, aux, alpha=cfg.aux_k)
        if cfg.architecture == "batchtopk":
            self.update_threshold_(feats, step)
        if cfg.alpha > 0:
            terms["info_nce"] = self.info_nce(feats, high, x_BD, x_adj_PD, step)
            loss = torch.add(loss, terms["info_nce"], alpha=cfg.alpha)
        if cfg.beta > 0:  # its matmuls in the compute dtype, the rest in float32 (losses.diversity)
            idx_S = None
            if self.sae.d_sae > cfg.diversity_features:
                g = step_generator(self.seed, step, DIVERSITY, self.step_rng)
                idx_S = torch.randperm(self.sae.d_sae, generator=g)[: cfg.diversity_features].to(x_BD.device)
            # the decoder's rows are unit vectors here (normalise_decoder_ after every step, and at initialisation
            # and resampling), and the gradient's radial part is projected out (project_decoder_gradient_)
            terms["diversity"] = losses.diversity(self.sae.W_dec, idx_S, self.rt.compute_dtype, unit_rows=True)
            loss = torch.add(loss, terms["diversity"], alpha=cfg.beta)
        terms["loss"] = loss  # the terms that are off add nothing (no ops for them in the graph)
        return terms, x_hat_BD, feats

    def info_nce(self, feats: Features, high: Features | None, x_BD: torch.Tensor, x_adj_PD: torch.Tensor | None,
                 step: int) -> torch.Tensor:
        """The contrastive term over the P anchors [0, P) of the batch and their positives: the batch's rows
        [P, 2P) (context), two views of each anchor (augment) or each anchor's neighbour (adjacent, encoded as a
        batch of its own, as T-SAE's authors encode t-1, and not reconstructed); on the head's outputs or on the
        high-level codes (contrast_on; `high` is the batch's, feats.prefix(h)). Its products in the compute
        dtype, the rest in float32."""
        cfg, P, dtype = self.cfg, len(x_BD) // 2, self.rt.compute_dtype
        if cfg.positives == "context":  # rows [0, P) are anchors, [P, 2P) their positives
            pairs: Features | None = feats
        elif cfg.positives == "augment":  # two views of each anchor, stacked in halves as well
            pairs = self.features(torch.cat(self.views(x_BD[:P], step)))
        else:
            assert x_adj_PD is not None, "adjacent positives need the loader's neighbour rows"
            pairs, adjacent = None, self.features(x_adj_PD)
        if cfg.contrast_on == "head":
            z_BC = self.head_z(pairs) if pairs is not None else torch.cat([self.head_z(feats)[:P],
                                                                           self.head_z(adjacent)])
            return losses.info_nce(z_BC, cfg.temperature, dtype)
        h = self.sae.high_level
        if pairs is not None:
            f_BH = (high if pairs is feats and high is not None else pairs.prefix(h)).dense()
            return losses.temporal_info_nce(f_BH[:P], f_BH[P:], cfg.temperature, dtype)
        f_PH = (high if high is not None else feats.prefix(h)).dense()[:P]
        return losses.temporal_info_nce(f_PH, adjacent.prefix(h).dense(), cfg.temperature, dtype)
