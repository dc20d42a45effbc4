"""Write the tiny checkpoint (every file of the real layout, tiny dimensions, seeded random weights), or with
--full the full-size one (the real shapes and dtypes, 47 GB; lowvram.demo.full).

    python tools/make_tiny_checkpoint.py OUT_DIR [--seed 0]
    python tools/make_tiny_checkpoint.py --full OUT_DIR [--device cuda] [--shard-dir /dev/shm/x] [--resume]
    python tools/make_tiny_checkpoint.py --full OUT_DIR --small      # every key at tiny widths (CPU tests)

OUT_DIR/Wan2.2-S2V-14B/ is the checkpoint directory and OUT_DIR/LiveAvatar/liveavatar.safetensors the LoRA,
as the reference's ckpt/ folder; `lowvram run --ckpt-dir OUT_DIR/Wan2.2-S2V-14B --lora ...` runs on it.
--full writes tensor by tensor (peak host RAM: a few 8-16 MiB pieces per generating thread, plus the
tokenizer build) and prints the time and peak RSS of each file; --device cuda makes the random numbers on
the GPU, which a 16-core host needs to write the 47 GB in about a minute rather than ten.
"""

import argparse
import json

from lowvram.demo.tiny import write_tiny_checkpoint


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="the full-size checkpoint (47 GB) instead of the tiny one")
    ap.add_argument("--small", action="store_true", help="with --full: every key and file at tiny widths")
    ap.add_argument("--device", default="cpu", help="with --full: where the random numbers are made (cpu, cuda)")
    ap.add_argument("--shard-dir", default=None, help="with --full: write the DiT shards here and symlink them")
    ap.add_argument("--resume", action="store_true", help="with --full: keep files an earlier call wrote")
    ap.add_argument("--report", default=None, help="with --full: write the report (JSON) here")
    args = ap.parse_args(argv)
    if not args.full:
        ckpt, lora = write_tiny_checkpoint(args.out_dir, seed=args.seed)
        print(f"checkpoint: {ckpt}\nLoRA: {lora}")
        return
    from lowvram.demo.full import FullSpec, write_full

    spec = FullSpec.small() if args.small else FullSpec.real()
    rep = write_full(args.out_dir, spec, seed=args.seed, device=args.device, shard_dir=args.shard_dir,
                     resume=args.resume)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(rep, f, indent=2)
    print(f"checkpoint: {rep['ckpt_dir']}\nLoRA: {rep['lora']}\n{rep['bytes'] / 1e9:.2f} GB in {rep['seconds']:.1f} s "
          f"on {rep['device']}, peak RSS {rep['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"(start {rep['start_rss_bytes'] / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
