"""NCCL all-reduce bandwidth between this node's GPUs (what DDP's gradient all-reduce rides on).

    torchrun --standalone --nproc-per-node N bench/allreduce_bw.py [--gib 1] [--dtype float32]

Prints, on rank 0, the mean time of 10 all-reduces after 3 warm-ups, the algorithm bandwidth
(bytes / time) and the bus bandwidth (x 2(N-1)/N, NCCL's convention).
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

ap = argparse.ArgumentParser()
ap.add_argument("--gib", type=float, default=1.0)
ap.add_argument("--dtype", default="float32")
args = ap.parse_args()
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
dtype = getattr(torch, args.dtype)
n = int(args.gib * 2**30) // torch.tensor([], dtype=dtype).element_size()
x = torch.ones(n, dtype=dtype, device="cuda")
for _ in range(3):
    dist.all_reduce(x)
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    dist.all_reduce(x)
torch.cuda.synchronize()
dt = (time.perf_counter() - t) / 10
if rank == 0:
    size = n * x.element_size()
    print(f"all_reduce {size / 2**30:.2f} GiB {args.dtype} on {world} GPUs: {1e3 * dt:.1f} ms, "
          f"algbw {size / dt / 1e9:.0f} GB/s, busbw {size / dt / 1e9 * 2 * (world - 1) / world:.0f} GB/s",
          flush=True)
dist.destroy_process_group()
