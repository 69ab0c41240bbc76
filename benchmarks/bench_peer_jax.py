"""The 200-bit benchmark's training step in discvae against the same step written in JAX and jit-compiled.

Dynamically binarised MNIST, batch 50, 200 Bernoulli bits with the learned prior, DisARM with one antithetic pair
(M = 2), Adam lr 1e-4 (the DisARM paper's), the ``linear`` and ``nonlinear`` models of :mod:`discvae.models`; one
thread each (``torch.set_num_threads(1)``, XLA's CPU client on one thread). Per model and round, ``--steps`` steps of:

- **jax**: the same model and estimator written in JAX, ``jax.jit`` of the whole step (gather the batch, binarise,
  draw the pair, forward, gradient, Adam written out), its arrays donated;
- **discvae**: the step of ``discvae train`` and ``compare``: ``step.forward_fn`` and ``step.train_step`` with the
  library's model (``training.model_for``), estimator and fused Adam (``speed.adam``), the batch gathered and
  binarised as the loop does (``--compile``: also with ``Config.compile``).

Rounds interleave the two, medians reported. Before timing, both compute the loss on the same weights, batch and
uniform draws, and their difference is printed. JAX is an optional extra (``pip install -e ".[bench]"``); without it
the benchmark says so in one line and exits 0.

    python benchmarks/bench_peer_jax.py --data-dir DATA [--rounds 5] [--steps 200] [--compile]

The last line is ``discvae/jax step time ratio R``: the worse of the two models' discvae / jax step times.
"""
from __future__ import annotations

import importlib.util
import os
import sys

B, C, M, LR = 50, 200, 2, 1e-4  # batch, bits, decoder evaluations per data point (one antithetic pair), Adam's lr
ARCHS = ("linear", "nonlinear")
SLOPE = 0.2  # the nonlinear model's LeakyReLU (models.nonlinear)


def jax_step(arch: str, weights: dict, images, seed: int):
    """The DisARM step of ``arch`` in JAX from discvae's ``weights`` (a state dict): ``(step, loss)``. ``step()``
    runs one jit-compiled step on the next batch of ``images`` ``[N, 784]`` and waits for it; ``loss(x, u)`` is the
    -ELBO of the current weights on the binarised batch ``x`` ``[B, 784]`` with the uniforms ``u`` ``[B, 200]`` of
    the antithetic pair, and its gradient (name -> torch tensor)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    params = {name: jnp.asarray(t.numpy()) for name, t in weights.items()}
    enc = sorted({name.rsplit(".", 1)[0] for name in params if name.startswith("encoder.")},
                 key=lambda n: int(n.split(".")[1]))
    dec = sorted({name.rsplit(".", 1)[0] for name in params if name.startswith("decoder.")},
                 key=lambda n: int(n.split(".")[1]) if "." in n else 0)

    def mlp(p, layers, h):
        """Affine maps h W^T + b, LeakyReLU(0.2) between them (the linear model: one map)."""
        for i, layer in enumerate(layers):
            h = h @ p[f"{layer}.weight"].T + p[f"{layer}.bias"]
            if i < len(layers) - 1:
                h = jnp.where(h > 0, h, SLOPE * h)
        return h

    def neg_elbo(p, x, u):
        """KL(q || p_lambda) - DisARM surrogate of E_q ln p(x|z) (the value -ELBO, the gradient DisARM's)."""
        sg = jax.lax.stop_gradient
        eta = mlp(p, enc, x)
        prob = jax.nn.sigmoid(sg(eta))
        b, b_anti = (u < prob).astype(x.dtype), (1 - u < prob).astype(x.dtype)
        logits = mlp(p, dec, jnp.concatenate([b, b_anti]))
        f = (logits * jnp.concatenate([x, x])).sum(-1) - jax.nn.softplus(logits).sum(-1)
        fb, fa = f[:B], f[B:]
        direction = ((b - b_anti) * sg(jax.nn.sigmoid(jnp.abs(eta))) * (eta - sg(eta))).sum(-1)
        ell = (0.5 * (fb + fa) + 0.5 * sg(fb - fa) * direction).mean()
        lam = p["prior.logits.bernoulli"]
        ls = jax.nn.log_sigmoid
        kl = (jax.nn.sigmoid(eta) * (ls(eta) - ls(lam)) + jax.nn.sigmoid(-eta) * (ls(-eta) - ls(-lam))).sum(-1)
        return kl.mean() - ell

    def adam(p, g, m, v, t):
        """torch.optim.Adam's update (betas 0.9, 0.999, eps 1e-8), bias-corrected at step t."""
        m = jax.tree.map(lambda m_, g_: 0.9 * m_ + 0.1 * g_, m, g)
        v = jax.tree.map(lambda v_, g_: 0.999 * v_ + 0.001 * g_ * g_, v, g)
        c1, c2 = 1 - 0.9 ** t, 1 - 0.999 ** t
        p = jax.tree.map(lambda p_, m_, v_: p_ - LR * (m_ / c1) / (jnp.sqrt(v_ / c2) + 1e-8), p, m, v)
        return p, m, v

    def step(state, data, order, i):
        p, m, v, t, key = state
        key, k_bin, k_u = jax.random.split(key, 3)
        x = data[jax.lax.dynamic_slice(order, (i * B,), (B,))]
        x = (jax.random.uniform(k_bin, x.shape) < x).astype(x.dtype)
        u = jax.random.uniform(k_u, (B, C))
        g = jax.grad(neg_elbo)(p, x, u)
        p, m, v = adam(p, g, m, v, t + 1)
        return p, m, v, t + 1, key

    state = [params, *(jax.tree.map(jnp.zeros_like, params) for _ in "mv"), jnp.zeros(()), jax.random.key(seed)]
    data = jnp.asarray(images.numpy())
    order = jax.random.permutation(jax.random.key(seed + 1), len(images))
    count = [0]
    step = jax.jit(step, donate_argnums=0)

    def run():
        i = count[0] % (len(images) // B)
        state[:] = step(tuple(state), data, order, i)
        count[0] += 1
        jax.block_until_ready(state[0])

    def loss(x, u):
        value, grads = jax.value_and_grad(neg_elbo)(state[0], x, u)
        return float(value), {name: torch.from_numpy(np.array(g)) for name, g in grads.items()}
    return run, loss


def discvae_step(arch: str, data, compile_: bool, seed: int):
    """The step of ``discvae train`` for ``arch``: ``(step, model, forward)``; ``step()`` trains on the next batch."""
    import torch

    from discvae import Config
    from discvae.likelihoods import binarize
    from discvae.speed import adam
    from discvae.step import forward_fn, objective, train_step
    from discvae.training import estimator_for, estimator_options, model_for

    cfg = Config(dataset="mnist", arch=arch, latent_dim=C, prior="learned", binarize="dynamic", estimator="disarm",
                 estimator_options={"num_samples": M}, batch_size=B, lr=LR, seed=seed, compile=compile_,
                 device="cpu")
    torch.manual_seed(seed)
    model = model_for(cfg, data)
    optimizer, estimator = adam(model.parameters(), cfg.lr), estimator_for(cfg)
    forward = forward_fn(model, estimator, cfg)
    x_train = data.x_train
    order = torch.randperm(len(x_train))
    count = [0]

    def run():
        i = count[0] % (len(x_train) // B)
        x = binarize(x_train.index_select(0, order[i * B:(i + 1) * B]), cfg.binarize)
        train_step(optimizer, forward, x, estimator_options(cfg, count[0]),
                   lambda terms: objective(terms, cfg, count[0]))
        count[0] += 1

    return run, model, forward


def main():
    from timing import interleaved_medians, parse_args

    def more(parser):
        parser.add_argument("--data-dir", default=None, help="folder holding mnist/ (default $DISCVAE_DATA)")
        parser.add_argument("--compile", action="store_true", help="also time discvae's step with --compile")
        parser.add_argument("--seed", type=int, default=0)

    args = parse_args(__doc__, rounds=5, steps=200, more=more, threads=1)
    if importlib.util.find_spec("jax") is None:
        print("bench_peer_jax: JAX is not installed (pip install -e \".[bench]\"); nothing measured")
        return
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch

    from discvae import load_dataset
    from discvae.likelihoods import binarize
    from discvae.speed import flush_denormals

    data = load_dataset("mnist", args.data_dir)
    images = data.x_train.flatten(1)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}; batch {B}, {C} bits, disarm M = {M}, Adam lr {LR}; "
          f"{args.rounds} rounds x {args.steps} steps")
    ratios = {}
    with flush_denormals():
        for arch in ARCHS:
            ours, model, forward = discvae_step(arch, data, False, args.seed)
            theirs, jax_loss = jax_step(arch, model.state_dict(), images, args.seed)
            # the same loss on the same weights, batch and uniforms: discvae's disarm draws u = rand_like(probs)
            x = binarize(data.x_train[:B], "dynamic", torch.Generator().manual_seed(args.seed))
            torch.manual_seed(args.seed)
            loss = forward(x, {}).loss
            grads = dict(zip(model.state_dict(), torch.autograd.grad(loss, list(model.parameters())), strict=True))
            torch.manual_seed(args.seed)
            u = torch.rand(1, B, C)[0]
            loss_jax, grads_jax = jax_loss(x.flatten(1).numpy(), u.numpy())
            worst = max(((grads[n] - grads_jax[n]).abs().max() / grads[n].abs().max()).item() for n in grads)
            print(f"{arch}: -ELBO of one batch, discvae {loss.item():.4f}, jax {loss_jax:.4f}, difference "
                  f"{loss.item() - loss_jax:.2e}; gradients' largest difference {worst:.1e} of their largest entry")
            steps = {"jax": theirs, "discvae": ours}
            if args.compile:
                steps["discvae --compile"] = discvae_step(arch, data, True, args.seed)[0]
            for fn in steps.values():  # compile and warm up outside the timed rounds
                for _ in range(20):
                    fn()
            times = interleaved_medians(steps, args.rounds, args.steps)
            print(f"{arch}: " + ", ".join(f"{name} {1e3 * t:.3f} ms" for name, t in times.items())
                  + f"; discvae/jax {times['discvae'] / times['jax']:.2f}"
                  + (f", --compile/jax {times['discvae --compile'] / times['jax']:.2f}" if args.compile else ""))
            ratios[arch] = times["discvae"] / times["jax"]
    print(f"discvae/jax step time ratio {max(ratios.values()):.2f}")


if __name__ == "__main__":
    sys.exit(main())
