#!/usr/bin/env python
"""Render the sample voice prompt that ships in demo/prompts: the Piper "joe" voice (CC0),
the speaker the demo voice was trained on, reading a sentence that is in no corpus split.

    python scripts/make_sample_prompt.py --out demo/prompts/joe
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_corpus import load_voice, synthesise_wav, wav_duration, write_text_atomic  # noqa: E402

TEXT = "Good morning. This short recording is how my voice sounds."


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo/prompts/joe"), help="writes OUT.wav and OUT.txt")
    args = p.parse_args(argv)
    voice, _ = load_voice("joe")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    synthesise_wav(voice, TEXT, args.out.with_suffix(".wav"))
    write_text_atomic(args.out.with_suffix(".txt"), TEXT + "\n")
    print(f"wrote {args.out}.wav ({wav_duration(args.out.with_suffix('.wav')):.2f} s) and {args.out}.txt")


if __name__ == "__main__":
    main()
