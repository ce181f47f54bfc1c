"""Optimiser × learning-rate study for WGAN-GP on MNIST, one grid of cells trained as one stack.

Paper: "Study of Optimiser Performance for Wasserstein Loss Function in Generative Adversarial Networks",
Anton Hosgood, Fedor Sergeev, Younes Moussaif (EPFL); code github.com/TheodorSergeev/optml_gan.

An MLP generator (Table II) and an MLP critic with dropout (Table III) are trained on MNIST with the
Wasserstein loss and the gradient penalty of Gulrajani et al. (λ = 10): five critic steps on each real batch,
then one generator step. The study varies only the optimiser (SGD, RMSprop, Adam with PyTorch's defaults, the
same lr for G and D) and the learning rate (1e-1 … 1e-7), and scores every cell by FID (Table I, Fig. 4).
Here every (optimiser, lr) cell of the grid is one slice of stacked parameters: the networks run as batched
matrix products over cells and the three update rules are one set of elementwise ops with per-cell
coefficients, so a whole grid costs the same number of operator calls per iteration as one cell. A cell whose
losses turn non-finite is frozen and reported as N/A; the others go on.

    python wgan_optimizer_study.py                                   # Table I: 3 optimisers × 7 lrs, 300 epochs
    python wgan_optimizer_study.py --optimizer adam --lr 1e-4        # one cell
    python wgan_optimizer_study.py --penalty per-pixel               # the authors' code's penalty (λ = 1, per pixel)
    OMP_NUM_THREADS=1 python wgan_optimizer_study.py --lrs 1e-3 1e-4 1e-5 --num-train 3200 --epochs 6 \
        --fid-every 1 --fid-extractor digits --threads 1             # CPU quick run (docs), in-domain FID
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common.datasets import Batches, load_dataset, to_float, to_uint8
from common.fid import FID

OptimizerName = Literal["sgd", "rmsprop", "adam"]
TABLE_I_LRS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


@dataclass
class Args:
    # experiment
    exp_name: str = Path(__file__).stem
    """name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the initial networks, the noise and the batch order"""
    torch_deterministic: bool = True
    """cudnn.deterministic (CPU runs are deterministic anyway)"""
    cuda: bool = True
    """use CUDA when available"""
    threads: int | None = None
    """torch.set_num_threads for the CPU (None: PyTorch's default)"""
    save_model: bool = False
    """write a checkpoint of the whole grid at every FID evaluation and per-cell G/D weights at the end"""
    resume: str | None = None
    """path of a checkpoint.pt to continue from (same grid); the run goes on in that checkpoint's folder"""
    output_dir: str = "runs"
    """folder that holds the run folder"""
    run_name: str | None = None
    """run folder name (default: {dataset}__{exp_name}__{seed}__{unix time})"""
    # data
    dataset: Literal["mnist", "fashion-mnist", "fake"] = "mnist"
    """training images (28×28 grey); 'fake' is the synthetic set used by the tests"""
    data_root: str = "data"
    """data folder (MNIST IDX files at {data_root}/MNIST/raw/)"""
    num_train: int | None = None
    """use only the first n training images (None: all 60,000); an epoch is then ceil(n / batch) iterations"""
    # the grid
    optimizers: tuple[OptimizerName, ...] = ("adam", "sgd", "rmsprop")
    """optimisers of the grid (Table I's columns)"""
    lrs: tuple[float, ...] = TABLE_I_LRS
    """learning rates of the grid, the same for G and D (Table I's rows)"""
    optimizer: OptimizerName | None = None
    """one optimiser only (overrides --optimizers)"""
    lr: float | None = None
    """one learning rate only (overrides --lrs)"""
    # method (Appendix C)
    epochs: int = 300
    """epochs; one epoch = one pass over the real data = ceil(N / batch) generator iterations (469 on MNIST)"""
    batch_size: int = 128
    """real (and fake) images per step"""
    z_dim: int = 128
    """noise dimension"""
    critic_steps: int = 5
    """critic steps per generator step, all on the same real batch with fresh noise"""
    penalty: Literal["per-sample", "per-pixel"] = "per-sample"
    """'per-sample': the paper's GP, norm of the gradient over the whole image; 'per-pixel': the authors' code
    (norm over the channel axis only, i.e. |∂D/∂x| per pixel, averaged)"""
    gp_lambda: float | None = None
    """penalty weight (None: 10 for per-sample as in the paper, 1 for per-pixel as in the authors' code)"""
    dropout: float = 0.3
    """dropout after each hidden layer of the critic (Table III)"""
    # evaluation
    fid_extractor: Literal["inception", "digits"] = "inception"
    """'inception': standard FID Inception; 'digits': the in-domain digit CNN (offline, fast on a CPU)"""
    fid_samples: int = 1000
    """generated images and real training images (drawn with replacement) per FID: the paper uses 1,000"""
    fid_every: int = 50
    """epochs between FID evaluations (and at the last epoch)"""
    inception_weights: str | None = None
    """path of pt_inception-2015-12-05 weights when torch-fidelity cannot download them"""
    log_every: int = 50
    """generator iterations between logged losses (also logged at every epoch end)"""
    # filled at runtime
    cells: tuple[str, ...] = ()
    """(filled at runtime) the cell names"""

    def __post_init__(self):
        if self.optimizer is not None:
            self.optimizers = (self.optimizer,)
        if self.lr is not None:
            self.lrs = (self.lr,)
        if not self.optimizers or not self.lrs:
            raise SystemExit("error: the grid is empty: give at least one optimiser and one learning rate")
        if any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            raise SystemExit(f"error: learning rates must be positive and finite, got {self.lrs}")
        if len(set(self.optimizers)) != len(self.optimizers) or len(set(self.lrs)) != len(self.lrs):
            raise SystemExit("error: --optimizers and --lrs must not repeat a value")
        for name, value in (("--batch-size", self.batch_size), ("--epochs", self.epochs), ("--z-dim", self.z_dim),
                            ("--critic-steps", self.critic_steps), ("--fid-every", self.fid_every),
                            ("--log-every", self.log_every)):
            if value <= 0:
                raise SystemExit(f"error: {name} must be positive, got {value}")
        if self.num_train is not None and self.num_train <= 0:
            raise SystemExit(f"error: --num-train must be positive, got {self.num_train}")
        if not 0 <= self.dropout < 1:
            raise SystemExit(f"error: --dropout must be in [0, 1), got {self.dropout}")
        if self.gp_lambda is None:
            self.gp_lambda = 10.0 if self.penalty == "per-sample" else 1.0
        if self.gp_lambda < 0:
            raise SystemExit(f"error: --gp-lambda must be ≥ 0, got {self.gp_lambda}")
        if self.fid_samples < 2:
            raise SystemExit(f"error: --fid-samples must be at least 2, got {self.fid_samples}")
        self.cells = tuple(cell_name(o, lr) for o in self.optimizers for lr in self.lrs)


def cell_name(optimizer: str, lr: float) -> str:
    return f"{optimizer}_lr{lr:g}"


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
    params = []
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            params += [layer.weight.detach().t().expand(num_cells, -1, -1).clone(),
                       layer.bias.detach().expand(num_cells, 1, -1).clone()]
    return [p.requires_grad_(True) for p in params]


def load_cell(module: nn.Module, params: list[torch.Tensor], cell: int) -> nn.Module:
    """Copy one cell of stacked parameters into a plain module (e.g. make_generator()) of the same layers."""
    layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer, weight, bias in zip(layers, params[0::2], params[1::2]):
            layer.weight.copy_(weight[cell].t())
            layer.bias.copy_(bias[cell, 0])
    return module


def mlp(params: list[torch.Tensor], x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Stacked MLP: x C×B×in → C×B×out; LeakyReLU(0.2) after each hidden layer, then × its dropout mask."""
    num_layers = len(params) // 2
    for i in range(num_layers):
        x = torch.baddbmm(params[2 * i + 1], x, params[2 * i])
        if i < num_layers - 1:
            x = F.leaky_relu(x, 0.2)
            if masks is not None:
                x = x * masks[i]
    return x


def generate(g_params: list[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """G(z): C×B×z_dim → C×B×784 in [-1, 1]."""
    return torch.tanh(mlp(g_params, z))


def critic(d_params: list[torch.Tensor], x: torch.Tensor, masks: list[torch.Tensor] | None) -> torch.Tensor:
    """D(x): C×B×784 → C×B scores."""
    return mlp(d_params, x, masks).squeeze(-1)


def dropout_masks(uniform: torch.Tensor, p: float, widths: list[int]) -> list[torch.Tensor] | None:
    """Inverted-dropout masks (keep with probability 1 − p, scaled by 1/(1 − p)) from uniforms C×B×sum(widths).
    Each cell and each sample gets its own mask, as separate runs would."""
    if p == 0:
        return None
    return list(((uniform >= p).to(uniform.dtype) / (1 - p)).split(widths, dim=-1))


# ---------------------------------------------------------------- WGAN-GP losses

def gradient_penalty(critic_fn: Callable[[torch.Tensor], torch.Tensor], interp: torch.Tensor,
                     per_pixel: bool) -> torch.Tensor:
    """Per cell: E_x̂[(‖∇_x̂ D(x̂)‖₂ − 1)²] over the batch (Gulrajani et al., eq. 3), or with per_pixel the
    authors' code: the norm taken over the (size-1) channel axis, i.e. E over samples and pixels of
    (|∂D/∂x̂_p| − 1)². interp: C×B×784. Returns C values, differentiable w.r.t. the critic's parameters."""
    interp = interp.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic_fn(interp).sum(), interp, create_graph=True)  # rows are independent
    if per_pixel:
        return ((grad.abs() - 1) ** 2).mean(dim=(1, 2))
    return ((grad.norm(2, dim=-1) - 1) ** 2).mean(dim=1)


def critic_losses(d_params, real, fake, eps, pair_masks, interp_masks, gp_lambda: float, per_pixel: bool):
    """Critic loss per cell: E[D(G(z))] − E[D(x)] + λ·GP (eq. (2) with the sign fixed, plus the penalty).
    real: 1×B×784 (shared by the cells), fake: C×B×784, eps: C×B×1 uniform. Returns (loss, gp, W estimate)."""
    num_cells, batch = fake.shape[:2]
    scores = critic(d_params, torch.cat([real.expand(num_cells, -1, -1), fake], 1), pair_masks)
    wasserstein = scores[:, :batch].mean(1) - scores[:, batch:].mean(1)
    interp = eps * real + (1 - eps) * fake                                   # x̂ = εx + (1 − ε)G(z), ε per sample
    gp = gradient_penalty(lambda x: critic(d_params, x, interp_masks), interp, per_pixel)
    return -wasserstein + gp_lambda * gp, gp, wasserstein


# ---------------------------------------------------------------- optimisers (Appendix B, PyTorch defaults)

class StackedOptimizer:
    """SGD, RMSprop (α = 0.99, ε = 1e-8) and Adam (β = 0.9, 0.999, ε = 1e-8) over stacked parameters, one
    (optimiser, lr) per cell, as one set of elementwise ops. One rule covers all three:
        m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²,   θ ← θ − (lr / c1)·m / (√v / √c2 + ε)
    SGD: β1 = 0 (m = g), β2 = 1 and ε = 1 (v stays 0: the denominator is exactly 1). RMSprop: β1 = 0, β2 = α,
    c1 = c2 = 1, ε outside the root as in PyTorch (the appendix's Alg. 2 omits the square on g). Adam:
    c1 = 1 − β1ᵗ, c2 = 1 − β2ᵗ. The operations and their order follow torch.optim's single-tensor code, so a
    cell matches it step for step (see the tests). A cell with active = False gets a zero gradient and a zero
    step: its parameters stay where they were (frozen after divergence)."""

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
    def step(self, grads: list[torch.Tensor], active: torch.Tensor) -> None:
        self.step_count += 1
        dtype = self.params[0].dtype
        bias1 = torch.where(self.adam, 1 - self.beta1 ** self.step_count, 1.0)
        bias2_sqrt = torch.where(self.adam, (1 - self.beta2 ** self.step_count).sqrt(), 1.0).to(dtype)
        neg_step = torch.where(active, -(self.lr / bias1), 0.0).to(dtype)
        weight1, beta2, one_minus_beta2 = (1 - self.beta1).to(dtype), self.beta2.to(dtype), (1 - self.beta2).to(dtype)
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            view = (-1,) + (1,) * (p.dim() - 1)
            g = torch.where(active.view(view), g, 0.0)
            m.lerp_(g, weight1.view(view))                                     # PyTorch: exp_avg.lerp_(g, 1 − β1)
            v.mul_(beta2.view(view)).addcmul_(g * one_minus_beta2.view(view), g)   # v·β2 + ((1 − β2)·g)·g
            denom = v.sqrt().div_(bias2_sqrt.view(view)).add_(self.eps.view(view))
            p.addcdiv_(m * neg_step.view(view), denom)                         # θ + (−step·m) / denom

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self.step_count.copy_(state["step_count"])
        for mine, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            mine.copy_(saved)


# ---------------------------------------------------------------- one generator iteration

def train_iteration(g_params, d_params, g_opt: StackedOptimizer, d_opt: StackedOptimizer, real: torch.Tensor,
                    alive: torch.Tensor, args: Args, randn: Callable, rand: Callable):
    """critic_steps critic updates on one real batch (fresh noise each), then one generator update, for all
    cells at once. real: B×784. randn/rand(shape) draw the noise, interpolation weights and dropout uniforms
    (tests pass recorders). Returns stats 4×C (critic loss, GP, W estimate, G loss) and the new alive mask:
    a cell whose loss is non-finite skips that update and stays frozen from then on."""
    num_cells, batch = alive.numel(), len(real)
    real = real.unsqueeze(0)
    widths = [p.shape[-1] for p in d_params[0:-2:2]]
    for _ in range(args.critic_steps):
        with torch.no_grad():
            fake = generate(g_params, randn((num_cells, batch, args.z_dim)))
        uniforms = rand((num_cells, 3 * batch, sum(widths) + 1))
        masks = dropout_masks(uniforms[..., :-1], args.dropout, widths)
        pair_masks = None if masks is None else [m[:, :2 * batch] for m in masks]
        interp_masks = None if masks is None else [m[:, 2 * batch:] for m in masks]
        loss, gp, wasserstein = critic_losses(d_params, real, fake, uniforms[:, 2 * batch:, -1:], pair_masks,
                                              interp_masks, args.gp_lambda, args.penalty == "per-pixel")
        grads = torch.autograd.grad(loss.sum(), d_params)   # cells are independent: the sum keeps each cell's scale
        alive = alive & torch.isfinite(loss)
        d_opt.step(grads, alive)
    fake = generate(g_params, randn((num_cells, batch, args.z_dim)))
    masks = dropout_masks(rand((num_cells, batch, sum(widths))), args.dropout, widths)
    g_loss = -critic(d_params, fake, masks).mean(1)                           # min_G −E[D(G(z))]
    grads = torch.autograd.grad(g_loss.sum(), g_params)
    alive = alive & torch.isfinite(g_loss)
    g_opt.step(grads, alive)
    return torch.stack([loss, gp, wasserstein, g_loss]).detach(), alive


@torch.no_grad()
def generate_images(g_params, noise: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    """Images of every cell for a fixed noise N×z_dim: C×N×1×28×28 floats in [-1, 1]."""
    out = [generate(g_params, noise[i:i + chunk].unsqueeze(0).expand(len(g_params[0]), -1, -1))
           for i in range(0, len(noise), chunk)]
    return torch.cat(out, 1).view(len(g_params[0]), len(noise), 1, 28, 28)


def top_level_op_counts(prof) -> Counter:
    """Operator calls a profiled region issued itself: aten ops not nested inside another aten op."""
    counts = Counter()
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and parent is None:
            counts[event.name] += 1
    return counts


# ---------------------------------------------------------------- outputs

def write_table(path_stem: Path, optimizers, lrs, final_fid: dict, fid_name: str) -> str:
    """Table I as CSV and Markdown: rows = lr, columns = optimisers, 'N/A' for diverged cells."""
    def fmt(name):
        value = final_fid.get(name)
        return "N/A" if value is None else f"{value:.2f}"
    rows = [[f"{lr:g}"] + [fmt(cell_name(o, lr)) for o in optimizers] for lr in lrs]
    with open(path_stem.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows([["learning_rate", *optimizers], *rows])
    header = ["learning rate", *[{"sgd": "SGD", "rmsprop": "RMSprop", "adam": "Adam"}[o] for o in optimizers]]
    markdown = "\n".join([f"FID ({fid_name}, lower is better; N/A = diverged)\n",
                          "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                          *["| " + " | ".join(r) + " |" for r in rows]]) + "\n"
    path_stem.with_suffix(".md").write_text(markdown)
    return markdown


def plot_fid_curves(path: Path, optimizers, lrs, history: dict, fid_name: str) -> None:
    """Fig. 4: FID against epoch, one panel per optimiser, one line per learning rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(optimizers), figsize=(4.2 * len(optimizers), 3.4), squeeze=False)
    for ax, opt in zip(axes[0], optimizers):
        for lr in lrs:
            points = [(e, f) for e, f in history[cell_name(opt, lr)] if f is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"lr {lr:g}")
        ax.set(title=opt, xlabel="epoch", ylabel="FID")
        ax.legend(fontsize=7)
    fig.suptitle(fid_name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


if __name__ == "__main__":
    import torchvision.utils as vutils
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    args = tyro.cli(Args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.deterministic = args.torch_deterministic
    names, num_cells = list(args.cells), len(args.cells)
    cell_opts = [o for o in args.optimizers for _ in args.lrs]
    cell_lrs = [lr for _ in args.optimizers for lr in args.lrs]

    checkpoint = None
    if args.resume is not None:
        if not Path(args.resume).is_file():
            raise SystemExit(f"error: --resume: no checkpoint at '{args.resume}' (runs write "
                             "runs/<run>/checkpoint.pt with --save-model)")
        checkpoint = torch.load(args.resume, map_location=device, weights_only=True)
        if checkpoint["cells"] != names:
            raise SystemExit(f"error: the checkpoint holds the grid {checkpoint['cells']}, not {names}: "
                             "pass the same --optimizers/--lrs")
        run_dir = Path(args.resume).parent
        run_name = run_dir.name
    else:
        run_name = args.run_name or f"{args.dataset}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = Path(args.output_dir) / run_name
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)

    # data: 28×28 grey in [-1, 1], flattened, on the device; batches by index
    data = load_dataset(args.dataset, "train", image_size=28, root=args.data_root, num_samples=args.num_train)
    if data.x.shape[1] != 1:
        raise SystemExit(f"error: the MLPs take 1×28×28 images, '{args.dataset}' has {data.x.shape[1]} channels")
    real_data = to_float(data.x.to(device)).flatten(1)
    batches = Batches(real_data, batch_size=args.batch_size, drop_last=False,
                      generator=torch.Generator(device).manual_seed(args.seed))
    fid = FID(data.x, extractor=args.fid_extractor, num_samples=args.fid_samples, root=args.data_root,
              inception_weights=args.inception_weights, device=device, dataset=args.dataset, seed=args.seed,
              replace=True)
    eval_noise = torch.randn(args.fid_samples, args.z_dim, device=device,
                             generator=torch.Generator(device).manual_seed(args.seed + 1))

    # models: every cell starts from the same PyTorch-default initialisation
    torch.manual_seed(args.seed)
    g_params = stack_params(make_generator(args.z_dim), num_cells)
    d_params = stack_params(make_critic(args.dropout), num_cells)
    g_params, d_params = [p.detach().to(device).requires_grad_(True) for p in g_params], \
        [p.detach().to(device).requires_grad_(True) for p in d_params]
    g_opt, d_opt = StackedOptimizer(g_params, cell_opts, cell_lrs), StackedOptimizer(d_params, cell_opts, cell_lrs)
    noise_rng = torch.Generator(device).manual_seed(args.seed + 2)
    alive = torch.ones(num_cells, dtype=torch.bool, device=device)
    diverged_at = torch.full((num_cells,), -1, dtype=torch.long, device=device)
    fid_history = {n: [] for n in names}      # cell → [(epoch, FID or None)]
    loss_history = {n: [] for n in names}     # cell → [(epoch, critic loss, GP, W, G loss)] epoch means
    start = 0
    if checkpoint is not None:
        with torch.no_grad():
            for p, saved in zip(g_params + d_params, checkpoint["g_params"] + checkpoint["d_params"]):
                p.copy_(saved)
        g_opt.load_state_dict(checkpoint["g_opt"])
        d_opt.load_state_dict(checkpoint["d_opt"])
        batches.load_state_dict(checkpoint["batches"])
        noise_rng.set_state(checkpoint["noise_rng"].cpu())
        alive, diverged_at = checkpoint["alive"], checkpoint["diverged_at"]
        fid_history, loss_history = json.loads(checkpoint["fid_history"]), json.loads(checkpoint["loss_history"])
        start = checkpoint["iteration"]

    def randn(shape):
        return torch.randn(shape, device=device, generator=noise_rng)

    def rand(shape):
        return torch.rand(shape, device=device, generator=noise_rng)

    writer = SummaryWriter(str(run_dir), purge_step=start if checkpoint is not None else None)
    if checkpoint is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                        "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    per_epoch = batches.steps_per_epoch
    total = args.epochs * per_epoch
    print(f"{num_cells} cells × {args.epochs} epochs × {per_epoch} generator iterations on {device}; {fid.name}")

    def save_checkpoint(iteration: int) -> None:
        save_atomic({"cells": names, "iteration": iteration, "g_params": [p.detach() for p in g_params],
                     "d_params": [p.detach() for p in d_params], "g_opt": g_opt.state_dict(),
                     "d_opt": d_opt.state_dict(), "batches": batches.state_dict(), "noise_rng": noise_rng.get_state(),
                     "alive": alive, "diverged_at": diverged_at, "fid_history": json.dumps(fid_history),
                     "loss_history": json.dumps(loss_history), "args": json.dumps(asdict(args))},
                    run_dir / "checkpoint.pt")

    window, epoch_sum = torch.zeros(4, num_cells, device=device), torch.zeros(4, num_cells, device=device)
    window_n, done, t_start, t_window = 0, start, time.time(), time.time()
    bar = tqdm(range(start, total), initial=start, total=total, unit="it", dynamic_ncols=True)
    try:
        for iteration in bar:
            (real,) = batches.next()
            before = alive
            stats, alive = train_iteration(g_params, d_params, g_opt, d_opt, real, alive, args, randn, rand)
            diverged_at = torch.where(before & ~alive, iteration, diverged_at)
            done = iteration + 1
            window += stats
            epoch_sum += stats
            window_n += 1
            epoch_end = (iteration + 1) % per_epoch == 0
            if (iteration + 1) % args.log_every == 0 or epoch_end:
                means, alive_now = (window / window_n).cpu(), alive.cpu()
                speed = window_n / (time.time() - t_window)
                for c, name in enumerate(names):
                    if alive_now[c]:
                        for k, tag in enumerate(("critic_loss", "gradient_penalty", "wasserstein", "g_loss")):
                            writer.add_scalar(f"losses/{tag}/{name}", means[k, c].item(), iteration + 1)
                writer.add_scalar("charts/generator_iterations_per_sec", speed, iteration + 1)
                writer.add_scalar("charts/alive_cells", int(alive_now.sum()), iteration + 1)
                best = means[3][alive_now]
                bar.set_postfix(alive=f"{int(alive_now.sum())}/{num_cells}", it_s=f"{speed:.2f}",
                                g_loss=f"{best.mean().item():.3g}" if len(best) else "nan")
                window.zero_()
                window_n, t_window = 0, time.time()
                if not alive_now.any():
                    print("every cell has diverged; stopping")
                    break
            if not epoch_end:
                continue
            epoch = (iteration + 1) // per_epoch
            means, alive_now = (epoch_sum / per_epoch).cpu(), alive.cpu()
            epoch_sum.zero_()
            for c, name in enumerate(names):
                loss_history[name].append([epoch] + (means[:, c].tolist() if alive_now[c] else [None] * 4))
            if epoch % args.fid_every == 0 or epoch == args.epochs:
                images = generate_images(g_params, eval_noise)
                for c, name in enumerate(names):
                    score = fid(images[c]) if alive_now[c] else None
                    fid_history[name].append([epoch, score])
                    if score is not None:
                        writer.add_scalar(f"eval/fid/{name}", score, epoch)
                        writer.add_image(f"samples/{name}", vutils.make_grid(images[c, :64], nrow=8, normalize=True,
                                                                             value_range=(-1, 1)), epoch)
                tqdm.write(f"epoch {epoch}: FID " + ", ".join(
                    f"{n} {'N/A' if s is None else f'{s:.1f}'}" for n, (_, s) in
                    ((n, fid_history[n][-1]) for n in names)))
                if args.save_model:
                    save_checkpoint(iteration + 1)
    except KeyboardInterrupt:
        print("interrupted: writing the results so far" + (" (the last checkpoint is kept)" if args.save_model else ""))
    finally:
        writer.flush()
    bar.close()

    # outputs: Table I, Fig. 4, a sample grid per cell, results files, per-cell weights
    alive_now, diverged_at = alive.cpu(), diverged_at.cpu()
    images = generate_images(g_params, eval_noise[:64]).cpu()
    for c, name in enumerate(names):
        vutils.save_image(to_uint8(images[c]).float() / 255, run_dir / "samples" / f"{name}.png", nrow=8)
    final_fid = {n: (fid_history[n][-1][1] if fid_history[n] and alive_now[c] else None)
                 for c, n in enumerate(names)}
    table = write_table(run_dir / "table1", args.optimizers, args.lrs, final_fid, fid.name)
    plot_fid_curves(run_dir / "fid_curves.png", args.optimizers, args.lrs, fid_history, fid.name)
    results = {"paper": "Hosgood, Sergeev, Moussaif: optimiser study for WGAN-GP (Table I)", "fid": fid.name,
               "fid_extractor": fid.extractor_name, "fid_samples": args.fid_samples, "device": str(device),
               "epochs_completed": len(next(iter(loss_history.values()))), "iterations_per_epoch": per_epoch,
               "iterations": done, "wall_time_s": round(time.time() - t_start, 1),
               "args": asdict(args), "cells": {}}
    for c, name in enumerate(names):
        last = next((row for row in reversed(loss_history[name]) if row[1] is not None), None)
        results["cells"][name] = {
            "optimizer": cell_opts[c], "lr": cell_lrs[c], "diverged": not bool(alive_now[c]),
            "diverged_at_iteration": None if alive_now[c] else int(diverged_at[c]), "final_fid": final_fid[name],
            "fid_history": fid_history[name], "loss_history": loss_history[name],
            "final_losses": None if last is None else dict(zip(("epoch", "critic_loss", "gradient_penalty",
                                                                 "wasserstein", "g_loss"), last))}
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    (run_dir / "results.md").write_text(
        f"# {run_name}\n\n{results['epochs_completed']} epochs × {per_epoch} generator iterations, "
        f"penalty {args.penalty} (λ = {args.gp_lambda}), {device}, {results['wall_time_s']} s\n\n{table}")
    if args.save_model:
        (run_dir / "models").mkdir(exist_ok=True)
        for c, name in enumerate(names):
            torch.save({"generator": load_cell(make_generator(args.z_dim), g_params, c).state_dict(),
                        "critic": load_cell(make_critic(args.dropout), d_params, c).state_dict(),
                        "optimizer": cell_opts[c], "lr": cell_lrs[c], "diverged": not bool(alive_now[c])},
                       run_dir / "models" / f"{name}.pt")
    writer.close()
    print(table)
    print(f"wrote {run_dir}")
