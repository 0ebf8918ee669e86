"""sample_to_file in a process of its own, alone or under torchrun, for tests/test_sample_to_file.py.

--kill-after N: the last rank dies by SIGKILL (as under kill -9 or the OOM killer) once it has
written N shards; the failure is injected here, from the test's side, by wrapping ShardStore.write.
"""
import argparse
import os
import signal

import torch

from ddpm_fast.distributed import ShardStore, sample_to_file, world
from ddpm_fast.pipeline import DDPMPipeline


def die_after(shards: int) -> None:
    write, written = ShardStore.write, []

    def write_then_die(self, seeds, images):
        path = write(self, seeds, images)
        written.append(path)
        rank, size = world()
        if rank == size - 1 and len(written) >= shards:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    ShardStore.write = write_then_die


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--seeds", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--shard-size", type=int, required=True)
    p.add_argument("--kill-after", type=int, default=None)
    args = p.parse_args()
    if args.kill_after:
        die_after(args.kill_after)
    # as `ddpm-fast sample --mode fast --precision fp32 --device cpu` loads it
    pipe = DDPMPipeline.from_pretrained(args.model, mode="fast", device="cpu", dtype=torch.float32)
    sample_to_file(pipe, args.seeds, args.out, batch_size=args.batch_size,
                   shard_size=args.shard_size, num_inference_steps=args.steps, progress=False)


if __name__ == "__main__":
    main()
