"""``promptstore bench engine``: what serving many tenants in one batch costs.

Builds ``--tasks`` tasks of mixed methods on one backbone (each prompt is its method's
own initialisation plus noise, see ``api.bench.seeding.random_module``: timing does not depend on
how well a prompt was tuned), then times, on the same images, interleaved round by round:

  mixed      ``forward_mixed`` with every image owned by a random task of the pool
             (per-image frames and VPT prompts gathered, per-task heads);
  per-method (a) the same images as if all images of a method belonged to ONE task of
             that method: each method's images go through that task alone (its prompts
             broadcast, no per-image gathering, one head): the cost without mixing;
  one-task   forward_mixed with the owners remapped to that one task per method:
             the engine's own pass layout without the per-task work (a diagnostic);
  tower      (b) the bare image tower on the same images, no prompts and no heads.

Every task of a method has the same prompt length, so (a) and mixed run the same
tokens. Throughput is images per second; ``mixed / per-method`` is the mixing cost
(target >= 0.9). Memory per resident prompt is ``ResidentPrompt.nbytes``: the bytes a
task keeps on the device (learned tensors, derived class-text features, serving copies).

    promptstore bench engine                        # ViT-B-32 random, 100 tasks, CPU-friendly
    promptstore bench engine --device cuda --batch 256 --iters 20
    python -m api.bench.engine --backbone open_clip:tiny:random --tasks 8 --iters 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

from api.bench.harness import machine_info
from api.bench.seeding import SERVE_CONFIGS, TEXT_METHODS

DEFAULT_BACKBONE = "open_clip:ViT-B-32:random"
DEFAULT_OUT = "bench-results/engine.json"

#: One config per registered method, so all tasks of a method share their prompt length, and the
#: methods that need a CLIP text tower (left out on timm backbones): the seeding's, shared.
METHOD_CONFIGS: dict[str, dict[str, Any]] = SERVE_CONFIGS


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="promptstore bench engine",
        description="Images/s of the mixed-tenant forward against per-method batches and the bare image tower.",
    )
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"backbone spec (default {DEFAULT_BACKBONE})")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--tasks", type=int, default=100, help="number of resident tasks (default 100)")
    p.add_argument("--classes", type=int, default=10, help="classes per task (default 10)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 32 on CPU, 256 on GPU)")
    p.add_argument("--iters", type=int, default=4, help="timed rounds, each runs every variant once (default 4)")
    p.add_argument(
        "--seconds", type=float, default=None,
        help="instead of --iters: timed rounds until this many seconds have passed (at least one round)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--methods", default=",".join(METHOD_CONFIGS), help="comma-separated methods to mix (default all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, images and owners")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON result path (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    for name in ("tasks", "classes", "iters", "batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.seconds is not None and args.seconds <= 0:
        p.error("--seconds must be > 0")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def build_pool(bb, methods: list[str], n_tasks: int, n_classes: int, seed: int) -> list:
    """``n_tasks`` resident prompts, methods assigned round-robin."""
    from api.bench.seeding import random_module
    from backbone.serving import resident_from_module
    from backbone.tuning import prompt_of

    pool = []
    for t in range(n_tasks):
        method = methods[t % len(methods)]
        classes = [f"object {t} {c}" for c in range(n_classes)]
        module = random_module(bb, method, classes, METHOD_CONFIGS[method], seed=seed + t)
        pool.append(resident_from_module(bb, prompt_of(bb, method, module), module))  # no second build
    return pool


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from backbone import forward_mixed, load_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bb = load_backbone(args.backbone, device=args.device)
    dev = bb.device
    load_s = time.perf_counter() - t0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_CONFIGS]
    if unknown or not methods:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHOD_CONFIGS)}")
    if not bb.has_text:
        methods = [m for m in methods if m not in TEXT_METHODS]
        if not methods:
            raise SystemExit(f"backbone {bb.spec} has no text tower; choose image-side methods")
        log(f"backbone has no text tower: mixing {', '.join(methods)}")
    batch = args.batch or (256 if dev.type == "cuda" else 32)
    log(f"backbone {bb.fingerprint} on {dev} ({bb.dtype}), loaded in {load_s:.1f}s; building {args.tasks} tasks ...")

    t0, c0 = time.perf_counter(), time.process_time()
    pool = build_pool(bb, methods, args.tasks, args.classes, args.seed)
    build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    first_of: dict[str, int] = {}
    for i, r in enumerate(pool):
        first_of.setdefault(r.method, i)
    rep_index = torch.tensor([first_of[r.method] for r in pool])  # task -> the one task of its method
    log(f"built {len(pool)} tasks in {build_s:.1f}s ({build_cpu_s:.1f} cpu-s); batch {batch}, {len(first_of)} methods")

    s = bb.image_size
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(batch, 3, s, s, generator=gen).to(dev, bb.dtype)  # (B, 3, S, S)

    def new_owners() -> torch.Tensor:  # (B,) a fresh draw over the whole pool each round
        return torch.randint(0, len(pool), (batch,), generator=gen)

    def mixed(owner: torch.Tensor) -> Any:
        return forward_mixed(bb, pool, images, owner)

    def one_task(owner: torch.Tensor) -> Any:
        return forward_mixed(bb, pool, images, rep_index[owner])

    def per_method(owner: torch.Tensor) -> Any:
        rows_of: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(rep_index[owner].tolist()):
            rows_of[r].append(i)
        return [pool[r].forward(images[torch.tensor(rows, device=dev)]) for r, rows in rows_of.items()]

    def tower(owner: torch.Tensor) -> Any:
        return bb.vision.forward(images).embeds.float().cpu()

    variants: dict[str, Callable[[torch.Tensor], Any]] = {
        "mixed": mixed, "per_method": per_method, "one_task": one_task, "tower": tower,
    }
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}  # wall seconds per round
    cpu_times: dict[str, list[float]] = {n: [] for n in names}  # process CPU seconds per round
    owners_used: set[int] = set()
    with torch.inference_mode():
        for _ in range(args.warmup):
            owner = new_owners()
            for n in names:
                variants[n](owner)
        t0 = time.perf_counter()
        k = 0
        while True:
            owner = new_owners()
            owners_used.update(owner.tolist())
            order = names[k % len(names):] + names[:k % len(names)]  # rotate: no variant always runs first
            for n in order:
                wall, cpu = _timed(lambda: variants[n](owner), dev)
                times[n].append(wall)
                cpu_times[n].append(cpu)
            k += 1
            elapsed = time.perf_counter() - t0
            log(f"round {k}: " + ", ".join(
                f"{n} {batch / times[n][-1]:.1f} img/s ({batch / cpu_times[n][-1]:.1f}/cpu-s)" for n in names
            ))
            if (args.seconds is not None and elapsed >= args.seconds) or (args.seconds is None and k >= args.iters):
                break

    def summary(n: str) -> dict[str, Any]:
        med, cpu = statistics.median(times[n]), statistics.median(cpu_times[n])
        return {
            "images_per_s": batch / med, "median_s": med, "round_s": times[n],
            "images_per_cpu_s": batch / cpu, "median_cpu_s": cpu, "round_cpu_s": cpu_times[n],
        }

    def ratio(a: str, b: str) -> dict[str, Any]:  # throughput of a relative to b, per round
        wall = [tb / ta for ta, tb in zip(times[a], times[b])]
        cpu = [tb / ta for ta, tb in zip(cpu_times[a], cpu_times[b])]
        return {
            "median": statistics.median(wall), "per_round": wall,
            "median_cpu": statistics.median(cpu), "per_round_cpu": cpu,
        }

    per_method_mem: dict[str, Any] = {}
    for m in first_of:
        rs = [r for r in pool if r.method == m]
        per_method_mem[m] = {
            "tasks": len(rs),
            "config": METHOD_CONFIGS[m],
            "resident_bytes": statistics.mean(r.nbytes for r in rs),
            "stored_bytes": statistics.mean(r.prompt.nbytes for r in rs),
            "prompt_tokens": rs[0].n_tokens,
        }
    mix = ratio("mixed", "per_method")
    # On a CPU shared with other processes the wall clock measures their load as much as ours;
    # the process's CPU time counts only this work, so it decides there. On a GPU: wall clock.
    basis = "cpu_time" if dev.type == "cpu" else "wall"
    headline = mix["median_cpu"] if basis == "cpu_time" else mix["median"]
    return {
        "benchmark": "engine",
        "backbone": bb.fingerprint,
        "dtype": str(bb.dtype).replace("torch.", ""),
        "machine": machine_info(dev),
        "params": {
            "tasks": len(pool), "classes_per_task": args.classes, "batch": batch, "rounds": len(times["mixed"]),
            "warmup_rounds": args.warmup, "seed": args.seed, "methods": list(first_of),
            "distinct_tasks_seen": len(owners_used),
        },
        "setup_s": {"load_backbone": load_s, "build_tasks": build_s, "build_tasks_cpu": build_cpu_s},
        "throughput": {n: summary(n) for n in names},
        "ratios": {
            "mixed_vs_per_method": mix,
            "mixed_vs_one_task": ratio("mixed", "one_task"),
            "mixed_vs_tower": ratio("mixed", "tower"),
            "per_method_vs_tower": ratio("per_method", "tower"),
        },
        "target": {"mixed_vs_per_method_min": 0.9, "basis": basis, "value": headline, "met": headline >= 0.9},
        "memory_per_resident_prompt": per_method_mem,
    }


def format_table(res: dict[str, Any]) -> str:
    p, th, ra, m, target = res["params"], res["throughput"], res["ratios"], res["machine"], res["target"]
    lines = [
        f"engine bench: {res['backbone']} {res['dtype']} on {m['device']} ({m['device_name']}), "
        f"torch {m['torch']}, {m['torch_threads']} threads / {m['cpu_count']} cpus",
        f"{p['tasks']} tasks x {p['classes_per_task']} classes, batch {p['batch']}, median of {p['rounds']} "
        f"interleaved rounds, {p['distinct_tasks_seen']} distinct tasks in the timed batches",
        "",
        f"{'variant':<36}{'img/s':>9}{'s/batch':>9}{'img/cpu-s':>11}{'cpu-s/batch':>13}",
    ]
    labels = {
        "mixed": f"mixed: forward_mixed, {p['tasks']} tasks",
        "per_method": "(a) one task per method, alone",
        "one_task": "    forward_mixed, 1 task/method",
        "tower": "(b) bare image tower",
    }
    for n, label in labels.items():
        t = th[n]
        lines.append(
            f"{label:<36}{t['images_per_s']:>9.2f}{t['median_s']:>9.3f}"
            f"{t['images_per_cpu_s']:>11.2f}{t['median_cpu_s']:>13.3f}"
        )
    mix, tow = ra["mixed_vs_per_method"], ra["mixed_vs_tower"]
    lines += [
        "",
        f"{'throughput ratio (median of rounds)':<36}{'wall':>9}{'cpu time':>11}",
        f"{'mixed / (a)':<36}{mix['median']:>9.3f}{mix['median_cpu']:>11.3f}",
        f"{'mixed / (b)':<36}{tow['median']:>9.3f}{tow['median_cpu']:>11.3f}",
        f"target mixed / (a) >= {target['mixed_vs_per_method_min']} on {target['basis'].replace('_', ' ')}: "
        f"{target['value']:.3f} -> {'met' if target['met'] else 'NOT met'}",
        "",
        f"{'memory per resident prompt':<28}{'tokens':>7}{'resident KiB':>14}{'stored KiB':>12}{'tasks':>7}",
    ]
    for meth, mm in res["memory_per_resident_prompt"].items():
        lines.append(
            f"{meth:<28}{mm['prompt_tokens']:>7}{mm['resident_bytes'] / 1024:>14.1f}"
            f"{mm['stored_bytes'] / 1024:>12.1f}{mm['tasks']:>7}"
        )
    return "\n".join(lines)


def run_engine_bench(argv: list[str]) -> dict[str, Any]:
    """Entry point of ``promptstore bench engine``: parse, run, print the table, write JSON."""
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res = run(args, log)
    print(format_table(res), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {out}", flush=True)
    return res


if __name__ == "__main__":  # pragma: no cover
    run_engine_bench(sys.argv[1:])
