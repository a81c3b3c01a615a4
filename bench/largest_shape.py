"""The largest Mamba shape whose SDLoRA trial step fits one GPU under ZeRO-3, with and without offload to the host.

    python bench/largest_shape.py --out largest_shape.json [--shapes 8192x48 8192x80 ...] [--batch 1 --seq 1024]

Each shape (``<hidden>x<layers>``, state 16, expand 2, vocab 50280) is tried in a fresh process, smallest first:
the bf16 model is built on the GPU, SDLoRA's warmup runs 2 real steps, then the trial's DeepSpeed engine
(``pipeline.trial.worker.make_engine``, ZeRO stage 3, with ``offload_parameters`` and ``offload_optimizer`` for the
offload run) takes 3 steps. A shape fits when those steps finish; the first shape that does not ends that run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROBE_TIMEOUT_S = 150


def probe(hidden: int, layers: int, offload: bool, batch: int, seq: int) -> dict:
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    import sdt
    from pipeline.spec.job import parse_job
    from pipeline.trial.worker import make_engine, train_micro_batch

    os.environ.update(
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}
    )
    config = MambaConfig(
        vocab_size=50280,
        hidden_size=hidden,
        num_hidden_layers=layers,
        state_size=16,
        expand=2,
        tie_word_embeddings=True,
    )
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: an fp32 build of the large shapes would not fit
    with torch.device("cuda"):
        model = MambaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    tuner = sdt.apply(
        sdt.to_compute_dtype(model, torch.bfloat16).train(), sdt.SDTConfig.preset("sdlora", warmup_steps=2)
    )
    optimizer = torch.optim.AdamW(tuner.trainable_parameters(), lr=1e-3)
    tokens = torch.randint(0, 50280, (batch, seq), device="cuda")
    for _ in range(2):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    del optimizer
    tuner.start_training(tuner.select())
    training = {
        "zero_stage": 3,
        "batch_size": batch,
        "lr": 1e-3,
        "offload_parameters": offload,
        "offload_optimizer": offload,
    }
    spec = parse_job(
        {"name": "largest", "model": {"architecture": "mamba"}, "method": {"name": "sdlora"}, "training": training}
    )
    engine = make_engine(tuner, spec, 1e-3, total_steps=10)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_micro_batch(engine, {"input_ids": tokens, "labels": tokens})
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "parameters": parameters,
        "trainable": tuner.num_trainable_parameters(),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "tokens_per_s": batch * seq / min(times[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x64", "8192x48", "8192x80", "8192x112", "8192x144"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--offload", choices=["off", "on", "both"], default="both")
    parser.add_argument("--probe", help="internal: run one <hidden>x<layers>[+offload] in this process")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.probe:
        shape, _, offload = args.probe.partition("+")
        hidden, layers = map(int, shape.split("x"))
        print("PROBE " + json.dumps(probe(hidden, layers, bool(offload), args.batch, args.seq)), flush=True)
        return
    results = []
    for offload in {"off": [False], "on": [True], "both": [False, True]}[args.offload]:
        for shape in args.shapes:
            command = [
                sys.executable,
                __file__,
                "--probe",
                shape + ("+offload" if offload else ""),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
            ]
            began = time.time()
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
                lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
                outcome = (
                    json.loads(lines[-1][6:])
                    if lines
                    else {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
                )
            except subprocess.TimeoutExpired:
                outcome = {"error": f"timed out after {PROBE_TIMEOUT_S} s"}
            outcome.update(shape=shape, offload=offload, fits="error" not in outcome, seconds=time.time() - began)
            print(json.dumps(outcome), flush=True)
            results.append(outcome)
            if args.out:
                with open(args.out, "w") as file:
                    json.dump(results, file, indent=2)
            if not outcome["fits"]:
                break


if __name__ == "__main__":
    main()
