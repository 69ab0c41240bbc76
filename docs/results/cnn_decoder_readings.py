"""Readings of Table I's CNN decoder (Bartler et al. 2019) and their sensitivity to z at initialisation.

spread = std over the 100 one-hot states of each output logit, averaged over the 784 pixels (decoder);
         std over 1000 MNIST test images of each of the 100 encoder logits, averaged (encoder).
Run:  OMP_NUM_THREADS=1 python docs/results/cnn_decoder_readings.py DATA   (DATA: the directory holding mnist/; ~5 s)
"""
import math
import sys
import time

import torch
from torch import nn

torch.set_num_threads(1)
C = 100  # 100-way categorical latent (CVAE)


class Crop(nn.Module):  # Keras Cropping2D(((top, bottom), (left, right))), same on both axes
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, h):
        return h[..., self.a:h.shape[-2] - self.b, self.a:h.shape[-1] - self.b]


def ct(cin, cout, s, pad):
    """Keras Conv2DTranspose(cout, 3, strides=s, padding=pad): 'same' -> in*s, 'valid' -> (in-1)*s+3,
    'same0' = 'same' with output_padding=0 -> (in-1)*s+1 (4 -> 7)."""
    if pad == "same":
        return nn.ConvTranspose2d(cin, cout, 3, s, 1, output_padding=s - 1)
    if pad == "same0":
        return nn.ConvTranspose2d(cin, cout, 3, s, 1, output_padding=0)
    return nn.ConvTranspose2d(cin, cout, 3, s, 0)


def dec(fc_units, shape, convs, crop=None):
    """FC c->fc_units /ReLU, reshape to shape (C,H,W), then convs [(cout, stride, pad)], ReLU between, logits out."""
    layers = [nn.Linear(C, fc_units), nn.ReLU(), nn.Unflatten(1, shape)]
    cin = shape[0]
    for i, (cout, s, pad) in enumerate(convs):
        layers.append(ct(cin, cout, s, pad))
        cin = cout
        if i < len(convs) - 1:
            layers.append(nn.ReLU())
    if crop:
        layers.append(Crop(*crop))
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


W = [64, 64, 32, 1]  # Table I channels
READINGS = {
    # name: (builder, description)
    "a  ours": (lambda: dec(512, (128, 2, 2), [(64, 2, "same"), (64, 2, "same0"), (32, 2, "same"), (1, 2, "same")]),
                "FC 512=2x2x128; s2 x4: 2-4-7-14-28"),
    "a2 2x2 same+crop": (lambda: dec(512, (128, 2, 2), [(w, 2, "same") for w in W], crop=(2, 2)),
                         "FC 512=2x2x128; s2 same x4: 2-4-8-16-32, crop 2/2"),
    "b1 1x1xc valid+crop": (lambda: dec(C, (C, 1, 1), [(w, 2, "valid") for w in W], crop=(1, 2)),
                            "FC c=1x1x100; s2 valid x4: 1-3-7-15-31, crop 1/2"),
    "b2 1x1xc valid/same": (lambda: dec(C, (C, 1, 1), [(64, 2, "valid"), (64, 2, "valid"), (32, 2, "same"),
                                                        (1, 2, "same")]),
                            "FC c=1x1x100; s2 v,v,same,same: 1-3-7-14-28"),
    "c1 7x7x64 s2,2,1,1": (lambda: dec(3136, (64, 7, 7), [(64, 2, "same"), (64, 2, "same"), (32, 1, "same"),
                                                          (1, 1, "same")]),
                           "FC 3136=7x7x64; same, s2,2,1,1: 7-14-28-28-28"),
    "c2 7x7x64 s1,1,2,2": (lambda: dec(3136, (64, 7, 7), [(64, 1, "same"), (64, 1, "same"), (32, 2, "same"),
                                                          (1, 2, "same")]),
                           "FC 3136=7x7x64; same, s1,1,2,2: 7-7-7-14-28"),
    "d1 4x4x128 s2,2,2,1": (lambda: dec(2048, (128, 4, 4), [(64, 2, "same0"), (64, 2, "same"), (32, 2, "same"),
                                                           (1, 1, "same")]),
                            "FC 2048=4x4x128; s2,2,2,1: 4-7-14-28-28"),
    "d2 4x4x128 s1,2,2,2": (lambda: dec(2048, (128, 4, 4), [(64, 1, "same"), (64, 2, "same0"), (32, 2, "same"),
                                                           (1, 2, "same")]),
                            "FC 2048=4x4x128; s1,2,2,2: 4-4-7-14-28"),
    "FC ref": (lambda: nn.Sequential(nn.Linear(C, 1024), nn.ReLU(), nn.Linear(1024, 784)), "100-1024-784"),
}


def encoder(pad):  # Table I encoder; pad 1 = Keras 'same' (28-14-7-4), 0 = 'valid' (28-13-6-2)
    n = 4 if pad else 2
    return nn.Sequential(nn.Conv2d(1, 32, 3, 2, pad), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, pad), nn.ReLU(),
                         nn.Conv2d(64, 128, 3, 2, pad), nn.ReLU(), nn.Flatten(), nn.Linear(128 * n * n, C))


def keras_fans(w):
    """Fans as Keras 2.x initializers._compute_fans computes them on the Keras kernel. Keras kernels: Dense (in, out),
    Conv2D (kh, kw, in, out), Conv2DTranspose (kh, kw, OUT, IN); fan_in = shape[-2]*kh*kw, fan_out = shape[-1]*kh*kw.
    Torch weights: Linear (out, in), Conv2d (out, in, kh, kw), ConvTranspose2d (in, out, kh, kw) -- so for all three
    Keras' fan_in is torch's dim 1 (times kh*kw) and its fan_out torch's dim 0."""
    rf = w[0, 0].numel()  # kh*kw (1 for a Linear)
    return w.shape[1] * rf, w.shape[0] * rf


def initialize(model, init):
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            continue
        if init == "glorot":
            fi, fo = keras_fans(m.weight)
            limit = math.sqrt(6 / (fi + fo))
            tfi, tfo = nn.init._calculate_fan_in_and_fan_out(m.weight)  # what xavier_uniform_ would use
            assert fi + fo == tfi + tfo  # same sum -> xavier_uniform_ gives the identical limit
            nn.init.uniform_(m.weight, -limit, limit)
            nn.init.zeros_(m.bias)
        elif init == "he":  # N(0, 2/fan_in), torch fan_in (ConvT: out*kh*kw, = Keras's fan_in) as the library does
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


def build(reading, init, seed, enc_pad=1):
    """Same RNG order as discvae.build_model: construct encoder, then decoder; initialise encoder, then decoder."""
    torch.manual_seed(seed)
    model = nn.Sequential(encoder(enc_pad), READINGS[reading][0]())
    initialize(model, init)
    return model[0], model[1]


def main():
    from discvae import build_model, load_dataset
    t0 = time.time()
    x = load_dataset("mnist", sys.argv[1]).x_test[:1000]
    inits, seeds = ("torch", "glorot", "he"), (0, 1, 2)
    z = torch.eye(C)
    print("| reading | layer sizes | dec params | " + " | ".join(f"dec {i} s0 [min-max s0-2]" for i in inits) + " |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for name, (_, desc) in READINGS.items():
            cells = []
            for init in inits:
                v = []
                for s in seeds:
                    _, d = build(name, init, s)
                    out = d(z)
                    assert out.shape == (C, 784), (name, out.shape)
                    v.append(out.std(0).mean().item())
                cells.append(f"{v[0]:.4f} [{min(v):.4f}-{max(v):.4f}]")
            npar = sum(p.numel() for p in d.parameters())
            print(f"| {name} | {desc} | {npar:,} | " + " | ".join(cells) + " |")
        for pad, lab in ((1, "same 28-14-7-4, FC 2048->100"), (0, "valid 28-13-6-2, FC 512->100")):
            cells = []
            for init in inits:
                v = [build("a  ours", init, s, pad)[0](x).std(0).mean().item() for s in seeds]
                cells.append(f"{v[0]:.4f} [{min(v):.4f}-{max(v):.4f}]")
            npar = sum(p.numel() for p in encoder(pad).parameters())
            print(f"| encoder | {lab} | {npar:,} | " + " | ".join(cells) + " |")
        # check against the library's own model (reading a), seed 0
        for init in ("torch", "he"):
            torch.manual_seed(0)
            m = build_model("cnn", (1, 28, 28), "categorical", 100, init=init)
            dec, enc = m.decode(z).std(0).mean().item(), m.encoder(x).std(0).mean().item()
            print(f"library cnn {init}: dec {dec:.4f} enc {enc:.4f}")
    print(f"runtime {time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
