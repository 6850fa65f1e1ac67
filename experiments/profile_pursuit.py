"""Where an encoder's time goes: torch.profiler over encoding a synthetic problem of SAE size.

    python experiments/profile_pursuit.py --encoder omp --n-atoms 16384 --d 576 --k 32 --set variant=gram
    python experiments/profile_pursuit.py --device cuda --n-samples 16384 --set variant=gram-free

Prints the operators that take the most time (device time on a GPU, CPU time otherwise) and the
encoding's throughput, so a change to a kernel can be judged by what dominates before and after.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import sparsecode as sc
from sparsecode._validation import resolve_device
from sparsecode.encoder import coerce_field
from sparsecode.synthetic import make_sparse_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="omp")
    parser.add_argument("--n-atoms", type=int, default=16384)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--n-samples", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="an encoder option, e.g. variant=gram-free (repeatable)")
    parser.add_argument("--rows", type=int, default=15, help="operators listed")
    args = parser.parse_args()
    device = resolve_device(args.device)
    config = sc.encoder_class(args.encoder).Config
    options = {}
    for item in args.set:
        field, _, value = item.partition("=")
        options[field] = coerce_field(config, field, value)
    data = make_sparse_data(args.n_samples, args.d, args.n_atoms, args.k, seed=0)
    x, dictionary = data.x.to(device), data.dictionary.to(device)
    enc = sc.get_encoder(args.encoder, k=args.k, **options).fit(dictionary)
    info = enc.encode_with_info(x)                      # warm-up: caches, kernels, allocator
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    enc.encode(x)
    sync()
    seconds = time.perf_counter() - start
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        enc.encode(x)
        sync()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=48))
    print(f"{args.encoder} {options or ''} on {device}: {args.n_samples / seconds:,.0f} signals/s "
          f"(n_atoms={args.n_atoms}, d={args.d}, k={args.k}, variant={info.variant}, precision={info.precision})")


if __name__ == "__main__":
    main()
