"""Write the tiny checkpoint (every file of the real layout, tiny dimensions, seeded random weights).

    python tools/make_tiny_checkpoint.py OUT_DIR [--seed 0]

OUT_DIR/Wan2.2-S2V-14B/ is the checkpoint directory and OUT_DIR/LiveAvatar/liveavatar.safetensors the LoRA,
as the reference's ckpt/ folder; `lowvram run --ckpt-dir OUT_DIR/Wan2.2-S2V-14B --lora ...` runs on it.
"""

import argparse

from lowvram.demo.tiny import write_tiny_checkpoint


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    ckpt, lora = write_tiny_checkpoint(args.out_dir, seed=args.seed)
    print(f"checkpoint: {ckpt}\nLoRA: {lora}")


if __name__ == "__main__":
    main()
