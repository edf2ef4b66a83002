"""Distributed multi-task training step: plain DDP + Sum against exact HRGrad across ranks.

For each world size (``--ranks``, default 1 2 4) it starts that many processes on one
``torch.distributed`` group (gloo on the CPU by default; ``--backend nccl --device cuda``: one
GPU per rank) and times a full training step of the transport APNN (``--K`` eps tasks,
``--points`` interior points per task and rank, MLPs ``--width`` x ``--depth``) for

* ``ddp_sum``        - the model in ``DistributedDataParallel``, ``sum(task losses).backward()``:
                        plain multi-task training, one all-reduce of the gradient (n numbers);
* ``dp_hrgrad``      - ``distributed.mode = "data_parallel"``: the K task gradients all-reduced
                        (K n numbers), HRGrad on every rank;
* ``sharded_hrgrad`` - ``distributed.mode = "sharded"``: K reduce-scatters, a K x K all-reduce,
                        each rank steps its 1/R of the parameters, an all-gather of them.

Each rank draws its own points (weak scaling: the global batch grows with the ranks) and uses
``--threads`` torch threads. A step's time is the slowest rank's; bytes are the payload of the
step's collectives (the full tensor each reduces; see ``hrgrad_ext.distributed``).

    python bench/bench_distributed.py --out docs/bench/distributed_cpu.json    # gloo, CPU
    python bench/bench_distributed.py --backend nccl --device cuda --ranks 1 2 4 8
    python bench/bench_distributed.py --quick                                # smoke run

Prints a markdown table and writes JSON (one record per method and world size).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

METHODS = ("ddp_sum", "dp_hrgrad", "sharded_hrgrad")
EPS = [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-8]


def make_trainer(args, method: str, device: str):
    from hrgrad_ext.train.config import TrainConfig
    from hrgrad_ext.train.trainer import Trainer

    net = {"kind": "mlp", "width": args.width, "depth": args.depth, "activation": "tanh"}
    cfg = TrainConfig(problem="transport", method="sum" if method == "ddp_sum" else "hrgrad", eps=EPS[:args.K],
                      iters=10**6, device=device, dtype=args.dtype, threads=args.threads, nv=args.nv,
                      points={"interior": args.points, "boundary": max(2, args.points // 4),
                              "initial": max(2, args.points // 2)},
                      model={"encoding": {"fourier": 2}, "rho": net, "g": net, "half_range": True},
                      out=os.path.join(tempfile.gettempdir(), "hrgrad_bench_unused"))
    cfg.distributed.mode = "sharded" if method == "sharded_hrgrad" else "data_parallel"
    cfg.log.progress = False
    return Trainer(cfg)


class _SumOfTaskLosses(torch.nn.Module):
    """The segmented task losses summed, as a module for DDP (plain multi-task training)."""

    def __init__(self, trainer):
        super().__init__()
        self.model = trainer.model
        self._trainer = [trainer]  # not a submodule

    def forward(self, batch):
        tr = self._trainer[0]
        K = len(tr.layout.eps)
        params = [p for p in self.model.parameters() if p.requires_grad]
        expanded = [[p.unsqueeze(0).expand(K, *p.shape) for p in params] for _ in range(tr.losses_fn.copies)]
        losses, _ = tr.losses_fn(expanded, batch)
        return losses.sum()


def _step_fn(tr, method: str):
    if method != "ddp_sum":
        return tr.train_step
    world = dist.get_world_size() if dist.is_initialized() else 1
    module = _SumOfTaskLosses(tr)
    ddp = torch.nn.parallel.DistributedDataParallel(module) if world > 1 else module

    def step():
        batch = tr.sampler.sample(tr.form, tr.eps_tensor, tr.device, tr.dtype)
        tr.optimizer.zero_grad(set_to_none=True)
        ddp(batch).backward()  # DDP averages the gradients over the ranks: the global mean loss
        tr.optimizer.step()

    return step


def _rank(rank: int, world: int, store: str, args, results):
    torch.set_num_threads(args.threads)
    device = "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    if world > 1:
        dist.init_process_group(args.backend, init_method=f"file://{store}", rank=rank, world_size=world)
    sync = (lambda: torch.cuda.synchronize()) if args.device == "cuda" else (lambda: None)
    for method in args.methods:
        tr = make_trainer(args, method, device)
        step = _step_fn(tr, method)
        for _ in range(args.warmup):
            step()
        sync()
        times = []
        for _ in range(args.steps):
            if world > 1:
                dist.barrier()  # every rank starts the step together; the step's time is the slowest rank's
            t0 = time.perf_counter()
            step()
            sync()
            times.append(1e3 * (time.perf_counter() - t0))
        n = sum(p.numel() for p in tr.params)
        itemsize = tr.params[0].element_size()
        if method == "ddp_sum":
            sent = n * itemsize if world > 1 else 0  # DDP's buckets hold the gradient once
            kept = 0
        elif tr.dist is None:
            sent, kept = 0, tr.layout.num_tasks * n * itemsize
        else:
            sent = tr.dist.step_bytes
            layout = tr.shard.layout if tr.shard is not None else tr.dist.layout
            kept = tr.layout.num_tasks * (layout.shard_numel if tr.shard is not None else n) * itemsize
        mine = torch.tensor([statistics.median(times)], dtype=torch.float64)
        medians = [mine.clone() for _ in range(world)]
        if world > 1:
            dist.all_gather_object(medians, mine)
        if rank == 0:
            results.append({"method": method, "ranks": world, "backend": args.backend if world > 1 else "none",
                            "device": args.device_name, "threads_per_rank": args.threads, "dtype": args.dtype,
                            "K": args.K, "points_per_task_per_rank": args.points, "parameters": n,
                            "step_ms": max(float(m) for m in medians), "rank_step_ms": [float(m) for m in medians],
                            "bytes_per_step": sent, "ddp_bytes": n * itemsize if world > 1 else 0,
                            "task_gradient_bytes_per_rank": kept, "torch": torch.__version__})
    if world > 1:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--K", type=int, default=6)
    p.add_argument("--points", type=int, default=64, help="interior points per task and rank")
    p.add_argument("--nv", type=int, default=16)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="small sizes, few steps: a smoke run")
    p.add_argument("--out", "--json", dest="json", help="write the records here (JSON)")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.points, args.K, args.warmup, args.steps = 16, 16, 4, 1, 3
    if args.backend == "nccl" and args.device != "cuda":
        p.error("--backend nccl needs --device cuda")
    if args.device == "cuda" and max(args.ranks) > torch.cuda.device_count():
        p.error(f"--ranks {max(args.ranks)} needs as many GPUs; {torch.cuda.device_count()} visible")
    args.device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    records = []
    with mp.Manager() as manager:
        for world in args.ranks:
            results = manager.list()
            store = tempfile.mktemp(prefix="hrgrad-bench-")
            # spawn: fresh interpreters, as torchrun starts them (and CUDA needs)
            mp.start_processes(_rank, args=(world, store, args, results), nprocs=world, start_method="spawn")
            if os.path.exists(store):
                os.unlink(store)
            records += list(results)
    ddp = {r["ranks"]: r["step_ms"] for r in records if r["method"] == "ddp_sum"}
    print(f"\n{records[0]['parameters']} parameters, K = {args.K} tasks, {args.points} interior points per task and "
          f"rank, {args.dtype}, {args.threads} thread(s) per rank, {args.device_name}, backend {args.backend}\n")
    print("| method | ranks | step (ms) | vs DDP+Sum | bytes / step | x DDP bytes | task gradients / rank (bytes) |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        rel = r["step_ms"] / ddp[r["ranks"]] if r["ranks"] in ddp else float("nan")
        xb = r["bytes_per_step"] / r["ddp_bytes"] if r["ddp_bytes"] else float("nan")
        print(f"| {r['method']} | {r['ranks']} | {r['step_ms']:.1f} | {rel:.2f} | {r['bytes_per_step']} | {xb:.2f} | "
              f"{r['task_gradient_bytes_per_rank']} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
