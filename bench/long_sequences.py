"""Write a classification JSONL file of long pixel-token sequences, for timing trials at sequence ~1024.

    python bench/long_sequences.py OUT.jsonl [--rows 2048] [--length 1020]

Each row's text is ``length`` space-separated pixel values 0..16 (the built-in digits vocabulary) and its label
whether the values sum above their expected total: learnable, and long enough to time the scan kernels. Every row
has the same number of tokens, so a batch of them has no padding.
"""

import argparse
import json
import random


def write_rows(out: str, rows: int, length: int) -> None:
    rng = random.Random(0)
    with open(out, "w") as f:
        for _ in range(rows):
            values = [rng.randint(0, 16) for _ in range(length)]
            f.write(json.dumps({"text": " ".join(map(str, values)), "label": int(sum(values) > 8 * length)}) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--length", type=int, default=1020)
    args = parser.parse_args()
    write_rows(args.out, args.rows, args.length)
