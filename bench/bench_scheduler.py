"""Scheduler benchmark: continuous batching against the static baseline, Poisson arrivals, through HTTP.

    python -m bench.bench_scheduler [--arch tiny|smolvlm-256m] [--requests 48] [--rates 2,4,8]
                                    [--min-tokens 16] [--max-tokens 512] [--device cpu] [--seed 0]

The same app on a loopback port, once with SMOLCORD_SCHEDULER=continuous and once with static, in
the same run and on the same engine. Every request streams, carries one small photo and a question,
is greedy and runs to exactly its drawn length (`ignore_eos`). Measured, for both schedulers:

1. **Poisson arrivals** at each rate (requests/s), answer lengths drawn uniformly from
   [--min-tokens, --max-tokens] (the same draws for both): time to first token p50/p95 and
   throughput (generated tokens / time from the first arrival to the last answer). The rate `inf`
   sends every request at once: throughput at saturation.
2. **A short question while a long answer runs**: a --max-tokens answer, then, a tenth into it, a
   --min-tokens one: the short one's time (arrival to last token) / the long one's.
3. **Prefill of a long image prompt** (continuous only): while an answer streams, a request with one
   large photo joins; the longest gap between the running stream's tokens during the join, with the
   prefill chunked (the default budget) and whole (an unlimited budget).

Goals (issue 14): short / long < 0.25; TTFT p95 at least 4x lower than static at equal load;
throughput at saturation at least 0.9x static. Prints a table, then one JSON line with every figure.
`--arch smolvlm-256m` builds the real model's dimensions (random weights); on a CPU give it fewer
tokens (e.g. --max-tokens 128 --requests 24 --rates 0.5,1).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import torch

from bench.bench_worker import bench_token, client_session, listening_worker, photo_jpeg
from model.engine import Engine
from model.tiny import build_tiny_model
from smolcord.settings import Settings

GOAL_SHORT_RATIO = 0.25
GOAL_TTFT_X = 4.0
GOAL_THROUGHPUT_X = 0.9


def body(index: int, image: bytes, tokens: int) -> dict[str, Any]:
    url = f"data:image/jpeg;base64,{base64.b64encode(image).decode('ascii')}"
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": f"Question {index}: what is in this picture?"},
    ]
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


async def stream(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> list[float]:
    """The arrival time (perf_counter) of every chunk of one streamed answer."""
    times: list[float] = []
    async with session.post(f"{url}/v1/chat/completions", json=payload) as response:
        if response.status != 200:
            raise RuntimeError(f"worker answered {response.status}: {await response.text()}")
        async for line in response.content:
            if line.startswith(b"data: {"):
                # Every chunk with a choice: the first (the role) goes out with the first text or the end,
                # so random weights whose tokens decode to nothing still give a time to first token.
                if json.loads(line[6:])["choices"]:
                    times.append(time.perf_counter())
    return times


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def poisson(
    session: aiohttp.ClientSession, url: str, *, rate: float, lengths: Sequence[int], image: bytes, seed: int
) -> dict[str, float]:
    """Requests at Poisson times (rate per second; inf: all at once); TTFT p50/p95 and throughput."""
    rng = random.Random(seed)
    delays, at = [], 0.0
    for _ in lengths:
        delays.append(at)
        at += rng.expovariate(rate) if math.isfinite(rate) else 0.0
    started = time.perf_counter()

    async def one(i: int, delay: float) -> tuple[float, float]:
        await asyncio.sleep(delay)
        sent = time.perf_counter()
        times = await stream(session, url, body(i, image, lengths[i]))
        return times[0] - sent, times[-1]

    results = await asyncio.gather(*(one(i, d) for i, d in enumerate(delays)))
    ttft = [r[0] for r in results]
    elapsed = max(r[1] for r in results) - started
    return {
        "rate": rate,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p95_s": percentile(ttft, 0.95),
        "tok_per_s": sum(lengths) / elapsed,
        "elapsed_s": elapsed,
    }


async def short_while_long(
    session: aiohttp.ClientSession, url: str, *, long: int, short: int, image: bytes
) -> dict[str, float]:
    started = time.perf_counter()
    task = asyncio.create_task(stream(session, url, body(0, image, long)))
    while True:  # a tenth into the long answer
        await asyncio.sleep(0.005)
        if task.done() or time.perf_counter() - started > 0.05:
            break
    first = time.perf_counter()
    await asyncio.sleep(0)
    times = await stream(session, url, body(1, image, short))
    short_s = times[-1] - first
    long_s = (await task)[-1] - started
    return {"short_s": short_s, "long_s": long_s, "short_over_long": short_s / long_s}


async def prefill_stall(
    session: aiohttp.ClientSession, url: str, engine: Engine, *, budget: float, image: bytes, big: bytes
) -> dict[str, float]:
    """The running stream's longest gap between tokens while a request with a large photo joins."""
    engine.continuous.prefill_budget = budget  # type: ignore[assignment]
    running = asyncio.create_task(stream(session, url, body(0, image, 512)))
    await asyncio.sleep(0.05)
    joined = time.perf_counter()
    big_times = await stream(session, url, body(1, big, 4))
    times = await running
    during = [b - a for a, b in itertools.pairwise(times) if b >= joined and a <= big_times[0]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {
        "max_gap_during_join_s": max(during) if during else 0.0,
        "median_gap_s": statistics.median(gaps),
        "joining_ttft_s": big_times[0] - joined,
    }


async def measure(engine: Engine, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Both workers listen at once (on one engine, one busy at a time); each figure is taken for the
    continuous scheduler, then at once for the static one, so a shared machine's noise hits both."""
    image = photo_jpeg((96, 64))
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_tokens, args.max_tokens) for _ in range(args.requests)]
    rates = [float(r) for r in args.rates.split(",")] + [math.inf]
    timeout = aiohttp.ClientTimeout(total=7200)
    schedulers = ("continuous", "static")
    result: dict[str, Any] = {name: {"poisson": []} for name in schedulers}
    async with contextlib.AsyncExitStack() as stack:
        urls = {}
        for name in schedulers:
            run_settings = settings.model_copy(update={"scheduler": name})
            urls[name] = await stack.enter_async_context(listening_worker(run_settings, engine))
        session = await stack.enter_async_context(client_session(settings, timeout=timeout))
        for name in schedulers:
            for _ in range(2):  # warm-up: the first calls at each length are slow on CPU kernels
                await stream(session, urls[name], body(0, image, 8))
        for rate in rates:
            for name in schedulers:
                figures = await poisson(
                    session, urls[name], rate=rate, lengths=lengths, image=image, seed=args.seed
                )
                result[name]["poisson"].append(figures)
                print(name, json.dumps(figures), flush=True)
        for name in schedulers:
            result[name]["short_while_long"] = await short_while_long(
                session, urls[name], long=args.max_tokens, short=args.min_tokens, image=image
            )
        big = photo_jpeg((1536, 1152), seed=3)
        default = engine.continuous.prefill_budget
        url = urls["continuous"]
        result["continuous"]["prefill"] = {
            "chunked": await prefill_stall(session, url, engine, budget=default, image=image, big=big),
            "whole": await prefill_stall(session, url, engine, budget=math.inf, image=image, big=big),
            "budget_tokens": default,
        }
        engine.continuous.prefill_budget = default
    return {"lengths": [args.min_tokens, args.max_tokens], "requests": args.requests, **result}


def print_table(result: dict[str, Any]) -> None:
    cont, stat = result["continuous"], result["static"]
    print(f"{'measure':<44}{'continuous':>12}{'static':>12}{'ratio':>9}  goal")
    for c, s in zip(cont["poisson"], stat["poisson"], strict=True):
        rate = "all at once" if math.isinf(c["rate"]) else f"{c['rate']:g} req/s"
        for key, label in (("ttft_p50_s", "TTFT p50, s"), ("ttft_p95_s", "TTFT p95, s")):
            ratio = s[key] / c[key]
            goal = f">= {GOAL_TTFT_X:g}x lower" if key == "ttft_p95_s" else ""
            print(f"{f'{rate}: {label}':<44}{c[key]:>12.3f}{s[key]:>12.3f}{ratio:>8.2f}x  {goal}")
        ratio = c["tok_per_s"] / s["tok_per_s"]
        goal = f">= {GOAL_THROUGHPUT_X:g}x" if math.isinf(c["rate"]) else ""
        print(
            f"{f'{rate}: tokens/s':<44}{c['tok_per_s']:>12.1f}{s['tok_per_s']:>12.1f}{ratio:>8.2f}x  {goal}"
        )
    cs, ss = cont["short_while_long"], stat["short_while_long"]
    print(
        f"{'short answer / long answer it arrived behind':<44}{cs['short_over_long']:>12.3f}"
        f"{ss['short_over_long']:>12.3f}{'':>9}  < {GOAL_SHORT_RATIO:g}"
    )
    prefill = cont["prefill"]
    print(
        f"prefill of a 1536x1152 photo joining a stream (budget {prefill['budget_tokens']} tokens): longest gap "
        f"{prefill['chunked']['max_gap_during_join_s'] * 1e3:.0f} ms chunked vs "
        f"{prefill['whole']['max_gap_during_join_s'] * 1e3:.0f} ms whole (median gap "
        f"{prefill['chunked']['median_gap_s'] * 1e3:.1f} ms); its TTFT "
        f"{prefill['chunked']['joining_ttft_s']:.2f} s vs {prefill['whole']['joining_ttft_s']:.2f} s"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_scheduler", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--arch", default="tiny", choices=["tiny", "smolvlm-256m"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rates", default="2,4,8", help="arrivals per second, comma-separated")
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else [])

    with tempfile.TemporaryDirectory(prefix="bench-scheduler-") as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", arch=args.arch)
        engine = Engine.load(str(model_dir), device=args.device)
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            data_dir=Path(tmp) / "data",
            model=str(model_dir),
            max_batch=args.max_batch,
            max_queue=max(64, args.requests),
            request_timeout_s=3600,
            worker_token=bench_token(),
        )
        result = asyncio.run(measure(engine, settings, args))
    result = {
        "bench": "scheduler",
        "arch": args.arch,
        "device": args.device,
        "threads": torch.get_num_threads(),
        **result,
    }
    print(
        f"schedulers ({args.arch} dimensions, {args.device}, {result['threads']} torch threads, "
        f"{args.requests} requests of {args.min_tokens}..{args.max_tokens} tokens)"
    )
    print_table(result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
