"""Training-step time of our Glow vs the same architecture built from FrEIA, side by side.

    python benchmarks/bench_vs_freia.py                    # default CPU grid, depth 8
    python benchmarks/bench_vs_freia.py --device cuda      # on a GPU machine

One flow (the PET flow of DualGlow; the MRI flow is the same network), 3D, levels 3, depth 8,
hidden 64, batch 1, input 1 x 40 x 48 x 40 (the default CPU grid). One step = standard-normal
NLL of the latents minus the log-determinant, backward, AdaMax update. Models, in one
process, timed in rotating order (each repetition starts with a different model, so drift in
machine load hits all of them alike); medians and their ratios are reported, and the ratio
of the minima (the least disturbed repeat of each) as a check on a loaded machine.

- ``ours``: ``dualglow_app.model.flows.Glow``, plain autograd;
- ``ours (memory saving)``: the same, with ``set_memory_saving(True)``;
- ``FrEIA``: ``FrEIA.framework.GraphINN`` of ``FrEIA.modules.AllInOneBlock`` (affine
  coupling with the same subnet and soft clamp 2, global affine = actnorm, fixed random
  rotation = 1x1x1 conv), a 3D squeeze module (FrEIA ships 2D ones only) before each level
  and ``FrEIA.modules.Split`` after each non-final level. FrEIA has no memory-saving mode, so
  the equal-memory comparison is ours (plain) vs FrEIA.

Also reported: bytes autograd saves for backward per model (saved-tensor hooks), to show the
memory modes. Prints a markdown table and writes
benchmarks/results/vs_freia_<device>_h<hidden>_b<batch>.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import perfkit
import torch
from FrEIA.modules.base import InvertibleModule as FreiaModule
from perfkit import BATCH, DEPTH, GRID, HIDDEN, LEVELS
from torch import Tensor, nn

from dualglow_app.model.flows import Glow, Squeeze, conv, zero_conv
from dualglow_app.model.memory import saved_tensor_bytes
from dualglow_app.runtime import native_bf16


class FreiaSqueeze3d(FreiaModule):
    """Our 2x2x2 squeeze as a FrEIA module (FrEIA's IRevNet/Haar downsampling are 2D)."""

    def __init__(self, dims_in: list[tuple[int, ...]], dims_c: list | None = None) -> None:
        super().__init__(dims_in, dims_c)
        self.squeeze = Squeeze(3)

    def forward(
        self, x: list[Tensor], c: list | None = None, rev: bool = False, jac: bool = True
    ) -> tuple[tuple[Tensor], Tensor]:
        y = self.squeeze.inverse(x[0]) if rev else self.squeeze(x[0])[0]
        return (y,), x[0].new_zeros(x[0].shape[0])

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        c, *spatial = input_dims[0]
        return [(c * 8, *(s // 2 for s in spatial))]


def subnet(hidden: int, ours: bool = False) -> Callable[[int, int], nn.Module]:
    """The coupling network of our AffineCoupling: 3x3x3 conv, ReLU, 1x1x1, ReLU, zero 3x3x3.

    ``ours``: built from flows.conv/zero_conv (oneDNN for float32 on the CPU); else from stock
    nn.Conv3d, as a FrEIA user writes it (the reference row).
    """

    def stock(c_in: int, c_out: int, k: int) -> nn.Module:
        return nn.Conv3d(c_in, c_out, k, padding=k // 2)

    def make(c_in: int, c_out: int) -> nn.Module:
        layer = (lambda a, b, k: conv(3, a, b, k)) if ours else stock
        last = zero_conv(3, hidden, c_out) if ours else stock(hidden, c_out, 3)
        if not ours:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        return nn.Sequential(layer(c_in, hidden, 3), nn.ReLU(), layer(hidden, hidden, 1), nn.ReLU(), last)

    return make


def freia_glow(grid: tuple[int, ...], levels: int, depth: int, hidden: int, our_conv: bool = False) -> Ff.GraphINN:
    nodes: list[Ff.Node] = [Ff.InputNode(1, *grid, name="x")]
    outputs: list[Ff.Node] = []
    current: Ff.Node | tuple[Ff.Node, int] = nodes[0]
    for level in range(levels):
        squeeze = Ff.Node(current, FreiaSqueeze3d, {}, name=f"squeeze{level}")
        nodes.append(squeeze)
        current = squeeze
        for d in range(depth):
            step = Ff.Node(
                current,
                Fm.AllInOneBlock,
                {"subnet_constructor": subnet(hidden, our_conv), "affine_clamping": 2.0,
                 "permute_soft": True},
                name=f"step{level}.{d}",
            )
            nodes.append(step)
            current = step
        channels = step.output_dims[0][0]
        if level < levels - 1:
            keep = channels // 2
            split = Ff.Node(current, Fm.Split, {"section_sizes": [keep, channels - keep], "dim": 0},
                            name=f"split{level}")
            nodes.append(split)
            outputs.append(Ff.OutputNode((split, 1), name=f"z{level}"))
            current = (split, 0)
        else:
            outputs.append(Ff.OutputNode(current, name=f"z{level}"))
    return Ff.GraphINN(nodes + outputs)


def nll(latents: list[Tensor] | tuple[Tensor, ...], logdet: Tensor) -> Tensor:
    return (0.5 * sum(z.square().flatten(1).sum(1) for z in latents) - logdet).mean()




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs=3, default=list(GRID))
    parser.add_argument("--levels", type=int, default=LEVELS)
    parser.add_argument("--depth", type=int, default=DEPTH)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="also time both flows under bf16 autocast (auto: where the device supports it)")
    perfkit.add_device_options(parser)
    args = parser.parse_args()
    device = perfkit.start(args)
    grid = tuple(args.grid)
    x = torch.randn(args.batch, 1, *grid, device=device)

    ours = Glow(1, 3, args.levels, args.depth, args.hidden, memory_saving=False).to(device)
    ours_saving = Glow(1, 3, args.levels, args.depth, args.hidden, memory_saving=True).to(device)
    ours_saving.load_state_dict(ours.state_dict())  # the overhead of the mode alone, same weights
    freia = freia_glow(grid, args.levels, args.depth, args.hidden).to(device)
    freia_our_conv = freia_glow(grid, args.levels, args.depth, args.hidden, our_conv=True).to(device)
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16(device))
    n_params = {
        "ours": sum(p.numel() for p in ours.parameters()),
        "FrEIA": sum(p.numel() for p in freia.parameters() if p.requires_grad),
    }

    def step(model: nn.Module, autocast: bool = False) -> Callable[[], Tensor]:
        def run() -> Tensor:
            # Under autocast our couplings run their networks in bf16 and the flow arithmetic,
            # logdet and NLL in float32 (flows.py); FrEIA runs as autocast makes it.
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                zs, logdet = model(x)
            return nll(zs, logdet)

        return run

    models: dict[str, tuple[nn.Module, Callable[[], Tensor]]] = {
        "ours": (ours, step(ours)),
        "ours (memory saving)": (ours_saving, step(ours_saving)),
        "FrEIA AllInOneBlock": (freia, step(freia)),
        "FrEIA, our conv layers": (freia_our_conv, step(freia_our_conv)),
    }
    if bf16:
        ours_bf16 = Glow(1, 3, args.levels, args.depth, args.hidden, memory_saving=False).to(device)
        ours_bf16.load_state_dict(ours.state_dict())
        freia_bf16 = freia_glow(grid, args.levels, args.depth, args.hidden).to(device)
        freia_bf16.load_state_dict(freia.state_dict())
        models["ours (bf16 subnets)"] = (ours_bf16, step(ours_bf16, autocast=True))
        models["FrEIA (bf16 autocast)"] = (freia_bf16, step(freia_bf16, autocast=True))
    optimizers = {
        name: torch.optim.Adamax([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for name, (m, _) in models.items()
    }
    memory = {}
    for name, (model, run) in models.items():
        perfkit.train_step(run, optimizers[name], device)  # warm-up, ActNorm init
        memory[name] = saved_tensor_bytes(run, model.parameters()) / 2**20

    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            times[name].append(perfkit.train_step(models[name][1], optimizers[name], device))
    medians = {name: perfkit.median(t) for name, t in times.items()}
    ref = medians["FrEIA AllInOneBlock"]

    print(f"training step, one flow: levels {args.levels}, depth {args.depth}, hidden "
          f"{args.hidden}, batch {args.batch}, input 1x{'x'.join(map(str, grid))}, "
          f"{args.device}, {args.threads} threads, {args.repeats} alternating repeats")
    ref_min = min(times["FrEIA AllInOneBlock"])
    perfkit.print_table(
        ["model", "median step s", "min s", "max s", "median ratio to FrEIA",
         "min ratio to FrEIA", "autograd-saved MiB"],
        [[name, medians[name], min(times[name]), max(times[name]), medians[name] / ref,
          min(times[name]) / ref_min, memory[name]] for name in names],
    )
    print(f"memory-saving overhead (ours saving / ours plain): "
          f"{medians['ours (memory saving)'] / medians['ours']:.3f}; parameters {n_params}")
    path = perfkit.write_json(
        f"vs_freia_{args.device}_h{args.hidden}_b{args.batch}.json",
        {"levels": args.levels, "depth": args.depth, "hidden": args.hidden, "batch": args.batch,
         "grid": grid, "repeats": args.repeats, "times_s": times, "median_s": medians,
         "ratio_to_freia": {n: m / ref for n, m in medians.items()},
         "min_ratio_to_freia": {n: min(t) / ref_min for n, t in times.items()},
         "saving_overhead": medians["ours (memory saving)"] / medians["ours"],
         "autograd_saved_mib": memory, "parameters": n_params}, results=args.results_dir,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
