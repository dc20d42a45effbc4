"""Write the user's inputs for the full-size path: a photo-like portrait and real speech (espeak-ng).

    python tools/make_user_inputs.py .media        # portrait.png (720x1280), speech.wav (16 kHz mono), inputs.json

Run it on a CPU machine with `apt-get install espeak-ng` (the GPU machine has no espeak-ng): the files go to an
ignored folder (.media/ is in .gitignore) that the GPU call carries. Without espeak-ng the WAV is lowvram's
voice-like synthetic signal, and inputs.json says so.
"""

import argparse
import json
from pathlib import Path

from lowvram.demo.inputs import SPEECH_TEXT, photo_portrait, speech_wav

PROMPT = ("A person with short hair talks to the camera in a softly lit room, head and shoulders, "
          "natural expression, lips moving with the words.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default=".media")
    ap.add_argument("--width", type=int, default=720)
    ap.add_argument("--height", type=int, default=1280)
    ap.add_argument("--seconds", type=float, default=10.0, help="at least this much speech")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    photo_portrait(str(out / "portrait.png"), width=args.width, height=args.height, seed=args.seed)
    speech = speech_wav(str(out / "speech.wav"), min_seconds=args.seconds)
    info = {"image": "portrait.png", "width": args.width, "height": args.height, "audio": "speech.wav",
            "speech": {**speech, "text": SPEECH_TEXT if speech["source"] != "synth_voice" else None},
            "prompt": PROMPT}
    (out / "inputs.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out / 'portrait.png'} ({args.width}x{args.height}) and {out / 'speech.wav'} "
          f"({speech['seconds']:.1f} s, {speech['source']})")


if __name__ == "__main__":
    main()
