"""Optimiser × learning-rate study for WGAN-GP on MNIST, the whole grid of cells trained as one stack.

Paper: "Study of Optimiser Performance for Wasserstein Loss Function in Generative Adversarial Networks",
Anton Hosgood, Fedor Sergeev, Younes Moussaif (EPFL, 2022); code github.com/TheodorSergeev/optml_gan.

One WGAN-GP (MLP generator, Table II; MLP critic with dropout, Table III; five critic steps on each real batch,
then one generator step) is trained on MNIST with SGD, RMSprop or Adam (PyTorch's defaults, the same lr for G and D)
at learning rates 1e-1 … 1e-7, and every (optimiser, lr) cell is scored by FID (Table I, Fig. 4). Each cell is one
slice of stacked parameters: the networks run as batched matrix products over cells and the three update rules are
one set of elementwise ops with per-cell coefficients, so a grid costs the operator calls of one cell. A cell whose
loss, gradients or weights turn non-finite is frozen at its last finite state and reported as N/A.

    python wgan_optimizer_study.py                          # the paper's setup: 21 cells, 300 epochs, λ = 10 per sample
    python wgan_optimizer_study.py --preset table1          # Table I as the authors' code produced it (per-pixel GP)
    python wgan_optimizer_study.py --optimizers adam --lr 1e-4                  # one cell
    python wgan_optimizer_study.py --preset cpu-mini        # Table I's regime at CPU scale, digit-CNN FID
"""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.datasets import Batches, load_dataset, to_float, to_uint8
from common.fid import FID, full_precision

# The authors' metrics.ipynb scores the models saved after the 0-indexed epochs 0, 50, …, 250, 290, i.e. after
# 1, 51, …, 291 completed epochs; Table I is the last of them.
AUTHORS_FID_EPOCHS = (1, 51, 101, 151, 201, 251, 291)
LOSS_KEYS = ("d_loss", "gradient_penalty", "wasserstein", "g_loss")
EVAL_TAGS = {"fid": "fid", "kid": "kid_mean", "is": "is_mean", "precision": "precision", "recall": "recall"}


@dataclass
class Args:
    # experiment
    preset: Literal["default", "paper-gp", "table1", "cpu-mini"] = "default"
    """paper experiment to start from; every other flag overrides it: default (= paper-gp), paper-gp (the paper's
    λ = 10 per-sample penalty), table1 (the authors' code's per-pixel penalty, which produced Table I), cpu-mini"""
    seed: int = 1
    """seed of the initial networks (the same in every cell), the batch order and the noise"""
    cuda: bool = True
    """use CUDA when available"""
    track: bool = False
    """log to Weights & Biases (TensorBoard synced; respects WANDB_MODE=offline)"""
    wandb_project_name: str = "gan-stability"
    """Weights & Biases project"""
    output_dir: str = "runs"
    """folder that holds the run folders"""
    run_name: str | None = None
    """run folder name (default: {dataset}__wgan_optimizer_study__{seed}__{time}-{random})"""
    save_model: bool = False
    """write checkpoint.pt (the whole grid, to resume) at every FID evaluation, at the end and on Ctrl-C"""
    resume: str | None = None
    """run folder to continue (its args.json and checkpoint.pt); flags given with it override the saved ones"""
    # data
    dataset: Literal["mnist", "fashion-mnist", "fake"] = "mnist"
    """training images (28×28 grey); 'fake' is the synthetic set used by the tests"""
    data_root: str = "data"
    """data folder (MNIST IDX files at {data_root}/MNIST/raw/)"""
    num_train: int = 0
    """use only the first n training images (0: all 60,000); an epoch is then ceil(n / batch) generator iterations"""
    # method (Sec. IV, Appendix C)
    optimizers: tuple[Literal["sgd", "rmsprop", "adam"], ...] = ("adam", "sgd", "rmsprop")
    """optimisers of the grid (Table I's columns), PyTorch's defaults"""
    lrs: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
    """learning rates of the grid, the same for G and D (Table I's rows)"""
    lr: float = 0.0
    """one learning rate for every optimiser, in place of --lrs (0: the grid of --lrs)"""
    penalty: Literal["per-sample", "per-pixel"] = "per-sample"
    """'per-sample': the paper's GP, norm of ∇D over the image; 'per-pixel': the authors' code, (|∂D/∂x_p| − 1)²"""
    gp_weight: float = 10.0
    """penalty weight λ (the paper: 10; the authors' code: 10 × 0.1 = 1)"""
    g_noise: Literal["fresh", "last-critic"] = "fresh"
    """generator step on 'fresh' noise (WGAN-GP) or on the last critic step's fake batch, as the authors' code"""
    dropout: float = 0.3
    """dropout after each hidden layer of the critic (Table III), active in every critic evaluation"""
    z_dim: int = 128
    """noise dimension"""
    # training
    epochs: int = 300
    """epochs; one epoch = one pass over the real data = ceil(N / batch) generator iterations (469 on MNIST)"""
    batch_size: int = 128
    """real (and fake) images per step"""
    n_critic: int = 5
    """critic steps per generator step, all on the same real batch with fresh noise"""
    log_every: int = 50
    """generator iterations between logged losses (also at every epoch end)"""
    # evaluation
    fid_extractor: Literal["inception", "digits"] = "inception"
    """'inception': standard FID Inception; 'digits': the in-domain digit CNN (offline, fast on a CPU)"""
    fid_samples: int = 1000
    """generated images and real training images (drawn with replacement) per FID: the paper's 1,000"""
    fid_epochs: tuple[int, ...] = AUTHORS_FID_EPOCHS
    """completed epochs after which every cell is scored and sampled (Fig. 3, 4); Table I reads the last one"""
    inception_weights: str | None = None
    """path of the FID Inception weights when torch-fidelity cannot download them"""
    # performance
    threads: int = 0
    """torch.set_num_threads for the CPU (0: torch's default)"""
    matmul_precision: Literal["auto", "highest", "high", "medium"] = "auto"
    """training matmuls: highest = full float32; high = TF32 on CUDA (float32 elsewhere); medium = bf16-backed
    float32 on capable CPUs/GPUs (about 2× on a recent CPU); auto = high on CUDA, highest on CPU. Metrics: always full"""
    compile: bool = False
    """torch.compile the generator iteration (critic steps with the penalty via torch.func, G step, the optimisers)"""


PRESETS: dict[str, Args] = {
    "default": Args(),
    # Sec. IV and Appendix C as written: Gulrajani et al.'s per-sample penalty, λ = 10 (identical to the default).
    "paper-gp": replace(Args(), preset="paper-gp"),
    # Table I as the authors' code (src/training.py) produced it: λ = 10 × lambda_reg 0.1 on the per-pixel norm,
    # the generator step on the last critic step's fake batch; FID on 1,000 vs 1,000 after AUTHORS_FID_EPOCHS.
    "table1": replace(Args(), preset="table1", penalty="per-pixel", gp_weight=1.0, g_noise="last-critic"),
}
# Table I's regime at CPU scale (about an hour of 2 cores): all 21 cells, 6,400 MNIST images (50 generator
# iterations an epoch), 6 epochs = 300 generator iterations, digit-CNN FID after every epoch.
PRESETS["cpu-mini"] = replace(PRESETS["table1"], preset="cpu-mini", num_train=6400, epochs=6,
                              fid_epochs=(1, 2, 3, 4, 5, 6), fid_extractor="digits", log_every=10)


def load_saved_args(run_dir: Path) -> Args:
    """The Args a run folder was started with (its args.json), with resume = that folder."""
    try:
        saved, names = json.loads((run_dir / "args.json").read_text()), {f.name for f in fields(Args)}
        args = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names})
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: cannot read {run_dir / 'args.json'} ({type(e).__name__}): --resume takes a run "
                         "folder written by this script (it holds args.json)") from None
    return replace(args, resume=str(run_dir))


def parse_args(argv: list[str] | None = None) -> Args:
    """--preset (or --resume's saved args.json) becomes tyro's default, so every other flag overrides it
    and --help shows the values that will be used."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="default")
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.resume is not None:
        default = load_saved_args(Path(known.resume))
    elif known.preset in PRESETS:
        default = PRESETS[known.preset]
    else:
        raise SystemExit(f"error: unknown --preset '{known.preset}': choose one of {', '.join(PRESETS)}")
    return tyro.cli(Args, default=default, args=argv, description=__doc__)


def validate(args: Args) -> None:
    """Every user error, before anything is written: one line naming the flag that fixes it."""
    for flag, value in [("--lr", args.lr), ("--gp-weight", args.gp_weight), ("--dropout", args.dropout)] + [
            ("--lrs", lr) for lr in args.lrs]:
        if not math.isfinite(value):
            raise SystemExit(f"error: {flag} is {value}: give a finite number")
    problems = {f"{flag} is {value}: give a positive number": value < 1 for flag, value in (
        ("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--z-dim", args.z_dim),
        ("--n-critic", args.n_critic), ("--log-every", args.log_every))} | {
        f"--lr is {args.lr}: give a positive learning rate, or 0 to use --lrs": args.lr < 0,
        f"--lrs is {args.lrs}: give distinct positive learning rates":
            not args.lrs or min(args.lrs) <= 0 or len(set(args.lrs)) < len(args.lrs),
        f"--optimizers is {args.optimizers}: name each optimiser once":
            not args.optimizers or len(set(args.optimizers)) < len(args.optimizers),
        f"--gp-weight is {args.gp_weight}: give a weight ≥ 0": args.gp_weight < 0,
        f"--dropout is {args.dropout}: give a probability in [0, 1)": not 0 <= args.dropout < 1,
        f"--fid-samples is {args.fid_samples}: give at least 2": args.fid_samples < 2,
        f"--fid-epochs is {args.fid_epochs}: give epochs ≥ 1, at least one of them ≤ --epochs {args.epochs}":
            min(args.fid_epochs, default=0) < 1 or min(args.fid_epochs) > args.epochs,
        f"--num-train is {args.num_train}: give a count ≥ 0 (0: all images)": args.num_train < 0,
        f"--threads is {args.threads}: give a count ≥ 0 (0: torch's default)": args.threads < 0}
    for problem, bad in problems.items():
        if bad:
            raise SystemExit(f"error: {problem}")


# ---------------------------------------------------------------- networks (Tables II and III)

def make_generator(z_dim: int = 128) -> nn.Sequential:
    """Table II: z → 256 → 512 → 1024 (LeakyReLU 0.2) → 784, tanh, as 1×28×28. 1,493,520 parameters."""
    return nn.Sequential(nn.Linear(z_dim, 256), nn.LeakyReLU(0.2), nn.Linear(256, 512), nn.LeakyReLU(0.2),
                         nn.Linear(512, 1024), nn.LeakyReLU(0.2), nn.Linear(1024, 784), nn.Tanh(),
                         nn.Unflatten(1, (1, 28, 28)))


def make_critic(dropout: float = 0.3) -> nn.Sequential:
    """Table III: 784 → 1024 → 512 → 256 (LeakyReLU 0.2, Dropout 0.3) → 1, no sigmoid. 1,460,225 parameters."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.LeakyReLU(0.2), nn.Dropout(dropout),
                         nn.Linear(1024, 512), nn.LeakyReLU(0.2), nn.Dropout(dropout),
                         nn.Linear(512, 256), nn.LeakyReLU(0.2), nn.Dropout(dropout), nn.Linear(256, 1))


def stack_params(module: nn.Module, num_cells: int) -> list[torch.Tensor]:
    """The module's Linear layers as [W1, b1, W2, b2, …] repeated over cells: W as C×in×out (ready for bmm),
    b as C×1×out. Every cell starts from the same weights."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return [t.detach().expand(num_cells, -1, -1).clone().requires_grad_(True)
            for layer in linears for t in (layer.weight.t(), layer.bias.view(1, -1))]


def load_cell(module: nn.Module, params: list[torch.Tensor], cell: int) -> nn.Module:
    """Copy one cell of stacked parameters into a plain module (e.g. make_generator()) of the same layers."""
    layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer, weight, bias in zip(layers, params[0::2], params[1::2]):
            layer.weight.copy_(weight[cell].t()), layer.bias.copy_(bias[cell, 0])
    return module


def mlp(params: list[torch.Tensor], x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Stacked MLP: x C×B×in → C×B×out; LeakyReLU(0.2) after each hidden layer, then × its dropout mask."""
    num_layers = len(params) // 2
    for i in range(num_layers):
        x = torch.baddbmm(params[2 * i + 1], x, params[2 * i])
        if i < num_layers - 1:
            x = F.leaky_relu(x, 0.2) if masks is None else F.leaky_relu(x, 0.2) * masks[i]
    return x


def generate(g_params: list[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """G(z): C×B×z_dim → C×B×784 in [-1, 1]."""
    return torch.tanh(mlp(g_params, z))


def critic(d_params: list[torch.Tensor], x: torch.Tensor, masks: list[torch.Tensor] | None) -> torch.Tensor:
    """D(x): C×B×784 → C×B scores."""
    return mlp(d_params, x, masks).squeeze(-1)


def dropout_masks(uniform: torch.Tensor, p: float, widths: list[int]) -> list[torch.Tensor]:
    """Inverted-dropout masks (keep with probability 1 − p, scaled by 1/(1 − p)) from uniforms C×B×sum(widths).
    Each cell and each sample gets its own mask, as separate runs would."""
    return list(((uniform >= p).to(uniform.dtype) / (1 - p)).split(widths, dim=-1))


# ---------------------------------------------------------------- WGAN-GP

def gradient_penalty(d_params, interp: torch.Tensor, masks, per_pixel: bool) -> torch.Tensor:
    """Per cell: E_x̂[(‖∇_x̂ D(x̂)‖₂ − 1)²] over the batch (Gulrajani et al., eq. 3), or with per_pixel the
    authors' code: the norm over the (size-1) channel axis, i.e. E over samples and pixels of (|∂D/∂x̂_p| − 1)².
    interp: C×B×784. Returns C values, differentiable w.r.t. the critic's parameters (torch.func: compilable)."""
    grad = torch.func.grad(lambda x: critic(d_params, x, masks).sum())(interp.detach())  # rows independent
    return ((grad.abs() - 1) ** 2).mean(dim=(1, 2)) if per_pixel else ((grad.norm(2, dim=-1) - 1) ** 2).mean(dim=1)


def critic_loss(d_params, real: torch.Tensor, fake: torch.Tensor, uniforms: torch.Tensor, args: Args):
    """−W + λ·GP per cell from C×B×784 real, fake and one critic step's uniforms; summed for the gradient (aux: per cell)."""
    batch, widths = real.shape[1], [p.shape[-1] for p in d_params[0:-2:2]]
    masks = dropout_masks(uniforms[..., :-1], args.dropout, widths)
    scores = critic(d_params, torch.cat([real, fake], 1), [m[:, :2 * batch] for m in masks])
    wasserstein = scores[:, :batch].mean(1) - scores[:, batch:].mean(1)   # eq. (2): E[D(x)] − E[D(G(z))]
    eps = uniforms[:, 2 * batch:, -1:]
    interp = eps * real + (1 - eps) * fake                                # x̂ = εx + (1 − ε)G(z), ε per sample
    gp = gradient_penalty(d_params, interp, [m[:, 2 * batch:] for m in masks], args.penalty == "per-pixel")
    loss = -wasserstein + args.gp_weight * gp                             # the critic maximises W − λ·GP
    return loss.sum(), (loss, gp, wasserstein)


def generator_loss(g_params, d_params, z: torch.Tensor, uniforms: torch.Tensor, args: Args):
    """min_G −E[D(G(z))] per cell, summed for the gradient; aux: the C values."""
    masks = dropout_masks(uniforms, args.dropout, [p.shape[-1] for p in d_params[0:-2:2]])
    g_loss = -critic(d_params, generate(g_params, z), masks).mean(1)
    return g_loss.sum(), g_loss


class StackedOptimizer:
    """SGD, RMSprop (α = 0.99, ε = 1e-8) and Adam (β = 0.9, 0.999, ε = 1e-8) over stacked parameters, one
    (optimiser, lr) per cell, as one set of elementwise ops (Appendix B, PyTorch's defaults). One rule covers all:
        m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²,   θ ← θ − (lr / c1)·m / (√v / √c2 + ε)
    SGD: β1 = 0 (m = g), β2 = 1 and ε = 1 (v stays 0: the denominator is exactly 1). RMSprop: β1 = 0, β2 = α,
    c1 = c2 = 1, ε outside the root as in PyTorch. Adam: c1 = 1 − β1ᵗ, c2 = 1 − β2ᵗ. The operations and their
    order follow torch.optim's single-tensor code, so a cell matches it step for step (see the tests)."""

    def __init__(self, params: list[torch.Tensor], names: list[str], lrs: list[float], eps: float = 1e-8):
        f64 = dict(dtype=torch.float64, device=params[0].device)
        self.params = params
        self.lr = torch.tensor(lrs, **f64)
        self.beta1 = torch.tensor([0.9 if n == "adam" else 0.0 for n in names], **f64)
        self.beta2 = torch.tensor([{"adam": 0.999, "rmsprop": 0.99, "sgd": 1.0}[n] for n in names], **f64)
        self.eps = torch.tensor([1.0 if n == "sgd" else eps for n in names], **f64).to(params[0].dtype)
        self.adam = torch.tensor([n == "adam" for n in names], device=params[0].device)
        self.step_count = torch.zeros((), **f64)
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], active: torch.Tensor) -> torch.Tensor:
        """Update the active cells; return those whose new second moments and new weights are all finite (a
        non-finite gradient makes the second moment non-finite). The others keep their weights: a diverged cell
        is frozen at its last finite weights (its moments, which flagged it, are not used again)."""
        self.step_count += 1
        dtype = self.params[0].dtype
        bias1 = torch.where(self.adam, 1 - self.beta1 ** self.step_count, 1.0)
        bias2_sqrt = torch.where(self.adam, (1 - self.beta2 ** self.step_count).sqrt(), 1.0).to(dtype)
        neg_step = torch.where(active, -(self.lr / bias1), 0.0).to(dtype)
        weight1, beta2, one_minus_beta2 = (1 - self.beta1).to(dtype), self.beta2.to(dtype), (1 - self.beta2).to(dtype)
        finite, new_params = active.clone(), []
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            view, dims = (-1,) + (1,) * (p.dim() - 1), tuple(range(1, p.dim()))
            m.lerp_(g, weight1.view(view))                                     # PyTorch: exp_avg.lerp_(g, 1 − β1)
            v.mul_(beta2.view(view)).addcmul_(g * one_minus_beta2.view(view), g)   # v·β2 + ((1 − β2)·g)·g
            denom = v.sqrt().div_(bias2_sqrt.view(view)).add_(self.eps.view(view))
            new_params.append(torch.addcdiv(p, m * neg_step.view(view), denom))  # θ + (−step·m) / denom
            # one fast reduction per cell: a NaN or ±inf anywhere makes the sum non-finite (so does a sum beyond
            # float32's 3.4e38, i.e. entries around 1e32: no longer a working network either)
            finite &= (v.sum(dims) + new_params[-1].sum(dims)).isfinite()
        for p, new in zip(self.params, new_params):
            p.copy_(torch.where(finite.view((-1,) + (1,) * (p.dim() - 1)), new, p))
        return finite


def train_iteration(g_params, d_params, g_opt: StackedOptimizer, d_opt: StackedOptimizer, real: torch.Tensor,
                    alive: torch.Tensor, args: Args, gen: torch.Generator, step=None):
    """One generator iteration of every cell: args.n_critic critic updates on one real batch B×784 (fresh noise each),
    then one generator update. gen draws all noise, dropout uniforms and ε first; `step` (`iteration`, or compiled)
    does the arithmetic. Returns stats 4×C (critic loss, GP, W estimate, G loss) and the alive mask (see StackedOptimizer)."""
    num_cells, batch, widths = alive.numel(), len(real), sum(p.shape[-1] for p in d_params[0:-2:2])
    draw = dict(generator=gen, device=real.device, dtype=real.dtype)
    critic_draws = [(torch.randn(num_cells, batch, args.z_dim, **draw), torch.rand(num_cells, 3 * batch, widths + 1,
                                                                                     **draw)) for _ in range(args.n_critic)]
    z = torch.randn(num_cells, batch, args.z_dim, **draw) if args.g_noise == "fresh" else critic_draws[-1][0]
    return (step or iteration)(g_params, d_params, g_opt, d_opt, real, alive, args, critic_draws, z,
                               torch.rand(num_cells, batch, widths, **draw))


def iteration(g_params, d_params, g_opt, d_opt, real, alive, args, critic_draws, z, g_uniforms):
    """train_iteration's arithmetic on drawn random numbers: no generator object, no host sync (compilable)."""
    real = real.unsqueeze(0).expand(alive.numel(), -1, -1)                    # every cell sees the same batch
    for z_critic, uniforms in critic_draws:
        fake = generate([p.detach() for p in g_params], z_critic)
        grads, (loss, gp, wasserstein) = torch.func.grad(critic_loss, has_aux=True)(d_params, real, fake, uniforms, args)
        alive = d_opt.step(grads, alive & torch.isfinite(loss))
    grads, g_loss = torch.func.grad(generator_loss, has_aux=True)(g_params, d_params, z, g_uniforms, args)
    alive = g_opt.step(grads, alive & torch.isfinite(g_loss))
    return torch.stack([loss, gp, wasserstein, g_loss]).detach(), alive


# ---------------------------------------------------------------- tables and figures (from results.json dicts)

def fid_text(cell: dict, epoch: int | None = None) -> str:
    """A cell's FID after `epoch` (None: its last one, Table I); N/A once it has diverged, — if not evaluated."""
    scores = [m["fid"] for m in cell["metrics"] if epoch in (None, m["epoch"])]
    if cell["status"] == "diverged" and (epoch is None or not scores):
        return "N/A"
    return f"{scores[-1]:.2f}" if scores else "—"


def summarize(results: list[dict]) -> str:
    """Table I (rows lr, columns optimiser, FID at each cell's last evaluation, N/A = diverged) and every cell's
    FID after each evaluated epoch, as Markdown, from the results.json dicts of one or more runs."""
    seeds = {}  # Table I has one number per cell: never let a second seed's cell silently replace the first's
    if any(seeds.setdefault(name, r["args"]["seed"]) != r["args"]["seed"] for r in results for name in r["cells"]):
        raise ValueError("the same cell appears with several seeds: build one Table I per seed")
    cells = {name: cell for r in results for name, cell in r["cells"].items()}
    optimizers = list(dict.fromkeys(c["optimizer"] for c in cells.values()))
    epochs = sorted({m["epoch"] for c in cells.values() for m in c["metrics"]})
    sources = sorted({f"{m['extractor']}, {m['num_real']} real / {m['num_fake']} fake"
                      for c in cells.values() for m in c["metrics"]})
    lines = [f"FID [{'; '.join(sources) or 'not evaluated'}] at each cell's last evaluation (epoch "
             f"{max(epochs, default='—')}), lower is better; N/A = diverged\n",
             "| learning rate | " + " | ".join({"sgd": "SGD", "rmsprop": "RMSprop", "adam": "Adam"}[o]
                                             for o in optimizers) + " |", "|---" * (len(optimizers) + 1) + "|"]
    by_key = {(c["optimizer"], c["lr"]): c for c in cells.values()}
    lines += [f"| {lr:g} | " + " | ".join(fid_text(by_key[o, lr]) if (o, lr) in by_key else "" for o in optimizers)
              + " |" for lr in dict.fromkeys(c["lr"] for c in cells.values())]
    lines += ["", "FID after each evaluated epoch\n", "| cell | diverged at G-iteration | "
              + " | ".join(f"epoch {e}" for e in epochs) + " |", "|---" * (len(epochs) + 2) + "|"]
    lines += [f"| {name} | {cell['diverged_at_iteration'] or ''} | " + " | ".join(fid_text(cell, e) for e in epochs)
              + " |" for name, cell in cells.items()]
    return "\n".join(lines) + "\n"


def write_figures(run_dir: Path, results: dict, sample_epochs: list[int], samples: list[torch.Tensor]) -> None:
    """fig1_losses.png (Fig. 1): critic and generator loss against the generator iteration, one panel per cell
    (rows: optimisers, columns: lrs). fig4_fid.png (Fig. 4): FID against epoch, one panel per optimiser.
    fig3_samples.png (Fig. 3): fixed-noise samples of every cell (rows) after each evaluated epoch (columns),
    titled with that FID; samples[k] holds C×S×1×28×28 uint8 images of every cell after sample_epochs[k]."""
    from matplotlib.figure import Figure   # no pyplot: nothing global to close, no display backend
    from torchvision.utils import make_grid
    cells = results["cells"]
    optimizers, lrs = (list(dict.fromkeys(c[k] for c in cells.values())) for k in ("optimizer", "lr"))
    fig1 = Figure(figsize=(2.6 * len(lrs), 2 * len(optimizers) + 0.4), layout="tight")
    fig4 = Figure(figsize=(4.2 * len(optimizers), 3.4), layout="tight")
    axes1 = fig1.subplots(len(optimizers), len(lrs), squeeze=False)
    axes4 = fig4.subplots(1, len(optimizers), squeeze=False)
    for name, cell in cells.items():
        row = optimizers.index(cell["optimizer"])
        ax = axes1[row, lrs.index(cell["lr"])]
        for key, label in (("d_loss", "D"), ("g_loss", "G")):
            ax.plot(cell["losses"]["iteration"], cell["losses"][key], lw=0.8, label=label)
        ax.set_title(name + (f", N/A at {cell['diverged_at_iteration']}" if cell["status"] == "diverged" else ""),
                     fontsize=8)
        epochs, fids = zip(*[(m["epoch"], m["fid"]) for m in cell["metrics"]]) if cell["metrics"] else ((), ())
        axes4[0, row].plot(epochs, fids, "o-", label=f"lr {cell['lr']:g}")
        axes4[0, row].set(title=cell["optimizer"], xlabel="epoch", ylabel="FID"), axes4[0, row].legend(fontsize=7)
    axes1[0, 0].legend(fontsize=6)
    fig1.savefig(run_dir / "fig1_losses.png", dpi=100), fig4.savefig(run_dir / "fig4_fid.png", dpi=100)
    fig3 = Figure(figsize=(1.9 * len(samples), 0.75 * len(cells) + 0.4), layout="tight")
    for i, (name, cell) in enumerate(cells.items()):
        for k, (epoch, images) in enumerate(zip(sample_epochs, samples)):
            ax = fig3.add_subplot(len(cells), len(samples), i * len(samples) + k + 1, xticks=[], yticks=[])
            grid = make_grid(images[i], nrow=images.shape[1], padding=1, pad_value=255)[0]
            ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{name}, epoch {epoch}: {fid_text(cell, epoch)}", fontsize=6)
    if samples:
        fig3.savefig(run_dir / "fig3_samples.png", dpi=100)


def save_atomic(obj, path: Path) -> None:
    """torch.save or a str (written as text) to a temporary file, then renamed: never a half-written file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(obj) if isinstance(obj, str) else torch.save(obj, tmp)
    os.replace(tmp, path)


def main() -> None:
    args = parse_args()
    validate(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if args.threads > 0: torch.set_num_threads(args.threads)  # noqa: E701
    torch.set_float32_matmul_precision({"auto": "high" if device.type == "cuda" else "highest"}.get(args.matmul_precision, args.matmul_precision))
    torch.backends.cudnn.allow_tf32 = torch.get_float32_matmul_precision() != "highest"
    lrs = (args.lr,) if args.lr > 0 else args.lrs
    cell_opts, cell_lrs = [o for o in args.optimizers for _ in lrs], [lr for _ in args.optimizers for lr in lrs]
    names = [f"{o}_{lr:g}" for o, lr in zip(cell_opts, cell_lrs)]     # cell names, e.g. adam_0.0001
    num_cells = len(names)

    # the run folder: a new one (never an existing non-empty one), or the resumed one with its checkpoint
    run_name = args.run_name or (f"{args.dataset}__{Path(__file__).stem}__{args.seed}__"
                                 f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}")
    run_dir, checkpoint = Path(args.resume or Path(args.output_dir) / run_name), None
    if args.resume is None and run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"error: {run_dir} already exists: choose another --run-name, or continue it with "
                         f"--resume {run_dir}")
    if args.resume is not None:
        if not (run_dir / "checkpoint.pt").is_file():
            raise SystemExit(f"error: {run_dir} has no checkpoint.pt: only runs started with --save-model can be "
                             "resumed")
        try:
            checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"error: {run_dir / 'checkpoint.pt'} is not a readable checkpoint ({type(e).__name__}): "
                             "start a new run instead of --resume") from None
        if not isinstance(checkpoint, dict) or checkpoint.get("cells") != names or "opt_state" not in checkpoint:
            raise SystemExit(f"error: {run_dir / 'checkpoint.pt'} does not hold this script's grid {names}: resume it "
                             "without --optimizers/--lrs/--lr, or start a new run")

    if args.track:
        try:
            import wandb
        except ImportError:
            raise SystemExit("error: --track needs Weights & Biases: pip install wandb, or drop --track") from None

    # data (uint8 on the device, batches to [-1, 1] when drawn), FID's real statistics: before the folder exists
    data = load_dataset(args.dataset, "train", image_size=28, root=args.data_root, num_samples=args.num_train or None)
    batches = Batches(data.x.to(device).flatten(1), batch_size=args.batch_size, drop_last=False,
                      generator=torch.Generator(device).manual_seed(args.seed))
    fid = FID(data.x, extractor=args.fid_extractor, num_samples=args.fid_samples, root=args.data_root,
              inception_weights=args.inception_weights, device=device, dataset=args.dataset, seed=args.seed,
              replace=True)
    eval_noise = torch.randn(args.fid_samples, args.z_dim, device=device,
                             generator=torch.Generator(device).manual_seed(args.seed + 1))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_atomic(json.dumps(asdict(args), indent=2), run_dir / "args.json")
    if args.track:
        wandb.init(project=args.wandb_project_name, name=run_dir.name, config=asdict(args), sync_tensorboard=True,
                   dir=str(run_dir), resume="allow", id=run_dir.name)

    # models: every cell starts from the same PyTorch-default initialisation, then follows its own optimiser
    torch.manual_seed(args.seed)
    g_params, d_params = ([p.detach().to(device).requires_grad_(True) for p in stack_params(net, num_cells)]
                          for net in (make_generator(args.z_dim), make_critic(args.dropout)))
    g_opt, d_opt = StackedOptimizer(g_params, cell_opts, cell_lrs), StackedOptimizer(d_params, cell_opts, cell_lrs)
    opt_state = [t for opt in (g_opt, d_opt) for t in (opt.step_count, *opt.exp_avg, *opt.exp_avg_sq)]
    noise_rng = torch.Generator(device).manual_seed(args.seed + 2)
    step = torch.compile(iteration) if args.compile else iteration   # first iterations compile (tens of seconds)
    alive = torch.ones(num_cells, dtype=torch.bool, device=device)
    diverged_at = torch.zeros(num_cells, dtype=torch.long, device=device)     # generator iteration, 0 = alive
    window, window_n, done = torch.zeros(4, num_cells, device=device), 0, 0   # loss sums since the last log
    loss_history: list[list] = []     # [iteration, 4×C window means (LOSS_KEYS), alive mask] per log point
    metric_history: list[list] = []   # [epoch, iteration, C metric dicts (None for a diverged cell)]
    samples: list[torch.Tensor] = []  # Fig. 3: 6 fixed-noise samples of every cell (uint8) at each evaluation
    if checkpoint is not None:
        with torch.no_grad():
            for mine, saved in zip(g_params + d_params + opt_state,
                                   checkpoint["g_params"] + checkpoint["d_params"] + checkpoint["opt_state"]):
                mine.copy_(saved)
        batches.load_state_dict(checkpoint["batches"])
        noise_rng.set_state(checkpoint["noise_rng"])
        torch.set_rng_state(checkpoint["torch_rng"])
        alive, diverged_at, window = (checkpoint[k].to(device) for k in ("alive", "diverged_at", "window"))
        window_n, done, loss_history, metric_history, samples = (
            checkpoint[k] for k in ("window_n", "iteration", "loss_history", "metric_history", "samples"))

    writer = SummaryWriter(str(run_dir), purge_step=done or None)
    if done == 0:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                        "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    per_epoch = batches.steps_per_epoch
    total, last = args.epochs * per_epoch, done >= args.epochs * per_epoch
    stop = threading.Event()   # set by Ctrl-C/SIGTERM; the loop stops at the next step boundary
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"training {num_cells} cells, {args.epochs} epochs × {per_epoch} generator iterations, {device}; {run_dir}",
          flush=True)
    bar = tqdm(initial=done, total=total, unit="it", dynamic_ncols=True, disable=not sys.stdout.isatty())
    t_window = time.time()
    while not last:
        # Every cell takes the same WGAN-GP iteration on the same real batch (n_critic penalised critic steps, one
        # G step) with its own update rule and lr; a non-finite loss, gradient or weight freezes it (N/A).
        (real,) = batches.next()
        stats, now_alive = train_iteration(g_params, d_params, g_opt, d_opt, to_float(real), alive, args, noise_rng, step)
        done += 1
        diverged_at = torch.where(alive & ~now_alive, done, diverged_at)
        alive, window, window_n = now_alive, window + stats, window_n + 1
        bar.update()
        epoch_end = done % per_epoch == 0
        evaluate = epoch_end and done // per_epoch in args.fid_epochs
        last = done == total or stop.is_set()
        if done % args.log_every == 0 or epoch_end:   # window means: one host sync per log point
            means, alive_now = (window / window_n).cpu(), alive.cpu()
            loss_history.append([done, means.tolist(), alive_now.tolist()])
            for c in alive_now.nonzero().flatten().tolist():
                for k, key in enumerate(LOSS_KEYS):
                    writer.add_scalar(f"losses/{key}/{names[c]}", means[k, c].item(), done)
            writer.add_scalar("charts/SPS", window_n / (time.time() - t_window), done)
            window, window_n, t_window = torch.zeros_like(window), 0, time.time()
            last = last or not alive_now.any()
        if evaluate:
            # FID of every alive cell on the fixed noise (Table I, Fig. 4) and a few samples (Fig. 3)
            epoch, alive_now = done // per_epoch, alive.cpu()
            with full_precision(), torch.no_grad():   # every cell's images of the same fixed noise: C×N×1×28×28
                images = generate(g_params, eval_noise.expand(num_cells, -1, -1)).view(num_cells, -1, 1, 28, 28)
                metrics = [fid.evaluate(images[c]) if alive_now[c] else None for c in range(num_cells)]
            metric_history.append([epoch, done, metrics])
            samples.append(to_uint8(images[:, :6]).cpu())
            for name, m in zip(names, metrics):
                for tag, key in EVAL_TAGS.items():
                    if m is not None and key in m:
                        writer.add_scalar(f"eval/{tag}/{name}", m[key], epoch)
            tqdm.write(f"epoch {epoch}: FID " + ", ".join(n + (" N/A" if m is None else f" {m['fid']:.1f}")
                                                          for n, m in zip(names, metrics)))
        if args.save_model and (evaluate or last):
            save_atomic({"cells": names, "iteration": done, "g_params": [p.detach() for p in g_params],
                         "d_params": [p.detach() for p in d_params], "opt_state": opt_state,
                         "batches": batches.state_dict(), "noise_rng": noise_rng.get_state(), "torch_rng": torch.get_rng_state(), "alive": alive,
                         "diverged_at": diverged_at, "window": window, "window_n": window_n,
                         "loss_history": loss_history, "metric_history": metric_history,
                         "samples": samples}, run_dir / "checkpoint.pt")
    bar.close()

    # outputs: results.json, read back for Table I (summarize); Fig. 1, 3 and 4 as PNG files
    alive_now, diverged_at = alive.cpu(), diverged_at.cpu()
    status = "diverged" if not alive_now.any() else "interrupted" if done < total else "finished"
    cells = {}
    for c, name in enumerate(names):
        logged = [(it, means) for it, means, alive_then in loss_history if alive_then[c]]
        cells[name] = {"optimizer": cell_opts[c], "lr": cell_lrs[c], "status": status if alive_now[c] else "diverged",
                       "diverged_at_iteration": int(diverged_at[c]) or None,
                       "metrics": [{"epoch": e, "iteration": it, **ms[c]} for e, it, ms in metric_history if ms[c]],
                       "losses": {"iteration": [it for it, _ in logged],
                                  **{key: [means[k][c] for _, means in logged] for k, key in enumerate(LOSS_KEYS)}}}
    save_atomic(json.dumps({"status": status, "script": Path(__file__).name, "run_name": run_dir.name,
                            "device": str(device), "iterations": done, "iterations_per_epoch": per_epoch,
                            "args": asdict(args), "cells": cells}, indent=1), run_dir / "results.json")
    results = json.loads((run_dir / "results.json").read_text())
    save_atomic(table := summarize([results]), run_dir / "table1.md")
    resume_hint = (f"continue with: python {Path(__file__).name} --resume {run_dir}" if args.save_model else
                   "no checkpoint (only runs started with --save-model can be resumed)")
    note = {"finished": "", "diverged": "**diverged**: every cell diverged\n\n",
            "interrupted": f"**interrupted** after {done} of {total} generator iterations; {resume_hint}\n\n"}[status]
    save_atomic(f"{note}# {run_dir.name}\n\n{done} generator iterations ({per_epoch} an epoch), {args.penalty} "
                f"penalty λ = {args.gp_weight}, {device}\n\n{table}", run_dir / "results.md")
    write_figures(run_dir, results, [epoch for epoch, _, _ in metric_history], samples)
    writer.close()
    print(f"interrupted after {done}/{total} generator iterations: results in {run_dir}; {resume_hint}"
          if status == "interrupted" else f"{table}\n{note}wrote {run_dir}")
    sys.exit({"interrupted": 130, "diverged": 3}.get(status, 0))   # 3: done, every cell diverged


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:   # Ctrl-C before the training loop's handler was installed
        print("interrupted before training began", file=sys.stderr)
        sys.exit(130)
