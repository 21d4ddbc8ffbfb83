"""Model worker benchmark on a CUDA GPU at SmolVLM-256M's dimensions, through HTTP, against plain generate.

    python -m bench.gpu_worker [--clients 32] [--new-tokens 128] [--out DIR]

Run it in the same lease as /work/shared/gpu/gpu_anchor.py, so that every ratio compares figures
from one machine. It builds `build_tiny_model(arch="smolvlm-256m")` (random weights, the real
processor's tiling: a 1536x384 photo becomes 5 tiles, 320 image tokens, like the anchor's inputs),
serves it with the real app on a loopback port, and measures, each answer running to exactly
`--new-tokens` (vLLM's `ignore_eos`):

- batch 1: one client through HTTP against `model.generate` in-process on the same prompt;
- `--clients` concurrent clients through HTTP against one in-process `generate` of that batch,
  and against batch 1 (what dynamic batching buys);
- arrivals (issue 14): `--arrival-requests` streamed requests at Poisson times (`--rates` per second,
  then all at once), answer lengths drawn from 16..512 tokens, through the continuous scheduler
  and the static one with the fast path off, then the continuous one with it on (compiled, warmed
  up before the worker is ready): time to first token p50/p95 and tok/s each
  (`bench.bench_scheduler.poisson`). `--rates none` skips it.

Writes JSON to $OUT/gpu_worker.json (or --out) after every section, so a failure keeps the
figures before it. Without CUDA it stops at once with exit status 2; `--device cpu --arch tiny`
runs the same code on a CPU as a dry run (figures meaningless).

The GPU machine has torch, transformers, peft, aiohttp, pillow and prometheus-client; carry
wheels for pydantic, pydantic-core, pydantic-settings, python-dotenv, annotated-types and
typing-inspection, and put the repository on PYTHONPATH (or `pip install --no-deps -e .`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def in_process_batch(engine: Any, bodies: Sequence[dict[str, Any]]) -> float:
    """One plain `generate` over the requests' encoded prompts, left-padded like the worker's batches."""
    from bench.bench_worker import conversation

    inputs = engine.collate([engine.encode(*conversation(body)) for body in bodies])
    new_tokens = bodies[0]["max_tokens"]
    _sync(engine.device)
    started = time.perf_counter()
    with torch.inference_mode():
        engine.model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=engine.pad_token_id,
        )
    _sync(engine.device)
    return time.perf_counter() - started


async def measure(
    engine: Any, settings: Any, args: argparse.Namespace, record: dict[str, Any], dump: Any
) -> None:
    import aiohttp

    from bench.bench_worker import (
        all_at_once,
        chat_body,
        client_session,
        conversation,
        listening_worker,
        photo_jpeg,
        post,
    )

    image = photo_jpeg((1536, 384))
    bodies = [chat_body(i, image, args.new_tokens) for i in range(args.clients)]
    first = engine.encode(*conversation(bodies[0]))
    record["inputs"] = {
        "prompt_tokens": first.prompt_tokens,
        "image_tiles": int(first.pixel_values.shape[0]) if first.pixel_values is not None else 0,
        "new_tokens": args.new_tokens,
        "clients": args.clients,
    }
    print(record["inputs"], flush=True)
    tokens = args.clients * args.new_tokens
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=3600)
    async with (
        listening_worker(settings, engine) as url,
        client_session(settings, timeout=timeout) as session,
    ):

        async def over_http(batch: Sequence[dict[str, Any]]) -> float:
            if len(batch) == 1:
                started = time.perf_counter()
                await post(session, url, batch[0])
                return time.perf_counter() - started
            return await all_at_once(session, url, batch)

        async def in_process(batch: Sequence[dict[str, Any]]) -> float:
            return await loop.run_in_executor(None, in_process_batch, engine, batch)

        for name, batch in (("b1", bodies[:1]), (f"b{args.clients}", bodies)):
            await in_process(batch)  # warm-up: allocator, kernels, the first tiles
            await over_http(batch)
            inproc, http = [], []
            for _ in range(args.repeats):
                inproc.append(await in_process(batch))
                http.append(await over_http(batch))
            inproc_s, http_s = statistics.median(inproc), statistics.median(http)
            n = len(batch) * args.new_tokens
            record[name] = {
                "in_process_s": round(inproc_s, 4),
                "http_s": round(http_s, 4),
                "in_process_tok_per_s": round(n / inproc_s, 1),
                "http_tok_per_s": round(n / http_s, 1),
                "http_vs_in_process": round(http_s / inproc_s, 3),
                "http_overhead_ms": round((http_s - inproc_s) * 1e3, 1),
            }
            print(name, record[name], flush=True)
            dump()
    b1, bn = record["b1"], record[f"b{args.clients}"]
    record["batching_throughput_x"] = round(bn["http_tok_per_s"] / b1["http_tok_per_s"], 2)
    record["tokens_per_batch"] = tokens
    if engine.device.type == "cuda":
        record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.rates != "none":
        await arrivals(engine, settings, args, record, dump)


async def arrivals(
    engine: Any, settings: Any, args: argparse.Namespace, record: dict[str, Any], dump: Any
) -> None:
    """Poisson arrivals through each scheduler, fast path off then on: TTFT p50/p95 and tok/s."""
    import math
    import random

    import aiohttp

    from bench.bench_scheduler import body, poisson, stream
    from bench.bench_worker import client_session, listening_worker, photo_jpeg

    image = photo_jpeg((1536, 384))
    rng = random.Random(0)
    lengths = [rng.randint(16, 512) for _ in range(args.arrival_requests)]
    rates = [float(r) for r in args.rates.split(",")] + [math.inf]
    record["arrivals"] = {"requests": args.arrival_requests, "lengths": [16, 512], "runs": {}}
    timeout = aiohttp.ClientTimeout(total=3600)
    for label, fast, scheduler in (
        ("plain_continuous", False, "continuous"),
        ("plain_static", False, "static"),
        ("fast_continuous", True, "continuous"),
    ):
        run_settings = settings.model_copy(
            update={"scheduler": scheduler, "fast_path": fast, "kv_cache_gib": args.kv_cache_gib}
        )
        started = time.perf_counter()
        async with (
            listening_worker(run_settings, engine) as url,
            client_session(run_settings, timeout=timeout) as session,
        ):
            while True:  # the fast path warms up (compiles every shape) before /v1/models answers 200
                async with session.get(f"{url}/v1/models") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(1)
            figures: dict[str, Any] = {"ready_s": round(time.perf_counter() - started, 1), "rates": []}
            for _ in range(2):
                await stream(session, url, body(0, image, 16))
            for rate in rates:
                result = await poisson(session, url, rate=rate, lengths=lengths, image=image, seed=0)
                figures["rates"].append(
                    {k: round(v, 4) if math.isfinite(v) else "inf" for k, v in result.items()}
                )
                print(label, figures["rates"][-1], flush=True)
                record["arrivals"]["runs"][label] = figures
                dump()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arch", default="smolvlm-256m", help="tiny for a CPU dry run")
    parser.add_argument("--device", default="cuda", help="cpu for a dry run (figures meaningless)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument(
        "--rates", default="2", help="Poisson arrivals per second, comma-separated; none: skip"
    )
    parser.add_argument("--arrival-requests", type=int, default=32)
    parser.add_argument(
        "--kv-cache-gib", type=float, default=8.0, help="the fast path's cache in the arrivals"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench.gpu_worker: needs a CUDA GPU and torch sees none; run it on the GPU machine beside "
            "gpu_anchor.py (or pass --device cpu --arch tiny for a dry run)",
            file=sys.stderr,
        )
        raise SystemExit(2)

    from bench.bench_worker import bench_token
    from model.engine import Engine
    from model.tiny import build_tiny_model
    from smolcord.settings import Settings

    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "gpu_worker.json"
    record: dict[str, Any] = {"bench": "gpu_worker", "arch": args.arch}

    def dump() -> None:
        out_file.write_text(json.dumps(record, indent=1))

    try:
        import transformers

        record["env"] = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        }
        with tempfile.TemporaryDirectory(prefix="gpu-worker-") as tmp:
            started = time.perf_counter()
            model_dir = build_tiny_model(Path(tmp) / "model", arch=args.arch)
            engine = Engine.load(str(model_dir), device=args.device)
            record["build_and_load_s"] = round(time.perf_counter() - started, 1)
            record["env"]["dtype"] = str(engine.dtype).removeprefix("torch.")
            settings = Settings(  # type: ignore[call-arg]
                _env_file=None,
                data_dir=Path(tmp) / "data",
                model=str(model_dir),
                max_batch=args.clients,
                max_queue=max(64, 2 * args.clients),
                max_tokens=max(512, args.new_tokens),
                request_timeout_s=600,
                worker_token=bench_token(),
            )
            dump()
            asyncio.run(measure(engine, settings, args, record, dump))
    except Exception:
        record["error"] = traceback.format_exc()[-3000:]
        print(record["error"], file=sys.stderr, flush=True)
    dump()
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
