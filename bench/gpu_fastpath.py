"""The worker's fast path on and off, through HTTP on a CUDA GPU at SmolVLM-256M's dimensions, beside ../shared/gpu's baselines.

    python -m bench.gpu_fastpath --anchors DIR [--clients 32] [--new-tokens 128] [--out DIR]

Goal (issue 7), end to end through the worker with SMOLCORD_FAST_PATH on: one client at least
320 tok/s, 32 concurrent clients at least 5,000 tok/s (the compiled baseline's H200 figures).

This process builds `build_tiny_model(arch="smolvlm-256m")` (random weights; the 1536x384 photo of
bench.bench_worker becomes 5 tiles, 374 prompt tokens), serves it with the real app on a loopback port
(bench.bench_worker's helpers) and measures, every answer exactly `--new-tokens` long (`ignore_eos`):

1. fast path on: seconds until /v1/models stops answering 503 (the warm-up compiles and records every
   shape), then one client, then `--clients` concurrent clients; graphs compiled after the warm-up
   (0 means no request paid a compile), batches per shape;
2. fast path off: the same requests to the plain worker (same engine, same process).

A child process runs the baselines with ../shared/gpu's gpu_anchor_lib (its model and inputs): plain
`generate` (gpu_anchor.py's generation section) and gpu_anchor_compiled.py's static-cache compiled
`generate`, at batch 1 and `--clients` only. The checkout cannot import ../shared: the caller copies
gpu_anchor.py, gpu_anchor_compiled.py and gpu_anchor_lib.py into a folder that travels with the run
and names it with --anchors. Both processes compile at the same time (CPU-bound, 35-56 s a graph) and
measure one after the other (the child waits for this process's figures), so no figure is taken
beside a compile and the run fits in about 4 minutes. A section that would outrun --budget-s is cut.

The KV cache budget is what `--max-length` positions need at `--clients` rows (1024: length buckets
512 and 1024, x batch buckets 1, 8, 32 = 6 shapes). The default SMOLCORD_KV_CACHE_GIB=8 gives lengths
512 to 8192 for the same model: 15 shapes, the same two compiles, 9 more CUDA graph recordings.

Writes $OUT/gpu_fastpath.json (or --out) after every section, and the child's log beside it.
Without CUDA it stops at once with exit status 2; `--device cpu --arch tiny` runs it all on a CPU as a
dry run (no compile; the baselines on a stand-in for gpu_anchor_lib with the tiny model; figures
meaningless). The GPU machine lacks pydantic: carry the wheels bench.gpu_worker names.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from bench.gpu_worker import _sync

GOALS = {"b1_tok_per_s": 320.0, "clients_tok_per_s": 5000.0}
_REPO = Path(__file__).resolve().parents[1]
_COMPILED, _GO, _RESULTS = "compiled", "go", "baselines.json"  # files the two processes signal with


# ------------------------------------------------------------------------------ the worker (this process)


async def measure_worker(
    engine: Any,
    args: argparse.Namespace,
    data_dir: Path,
    record: dict[str, Any],
    dump: Any,
    child: _Child | _NoChild,
) -> None:
    import aiohttp

    from bench.bench_worker import (
        all_at_once,
        bench_token,
        chat_body,
        client_session,
        conversation,
        listening_worker,
        photo_jpeg,
        post,
    )
    from model.fastpath import kv_bytes_per_token
    from smolcord.settings import Settings

    bodies = [chat_body(i, photo_jpeg((1536, 384)), args.new_tokens) for i in range(args.clients)]
    first = engine.encode(*conversation(bodies[0]))
    per_token = kv_bytes_per_token(engine.model.config.get_text_config(), engine.dtype)
    kv_cache_gib = args.clients * args.max_length * per_token / 2**30
    record["inputs"] = {
        "prompt_tokens": first.prompt_tokens,
        "image_tiles": int(first.pixel_values.shape[0]) if first.pixel_values is not None else 0,
        "new_tokens": args.new_tokens,
        "clients": args.clients,
        "kv_cache_gib": round(kv_cache_gib, 4),
    }
    print(record["inputs"], flush=True)
    timeout = aiohttp.ClientTimeout(total=600)

    for fast_path in (True, False):
        name = "fast_path_on" if fast_path else "fast_path_off"
        if not fast_path:
            engine.disable_fast_path()  # no worker runs now: nothing is generating
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            data_dir=data_dir,
            model=engine.name,
            fast_path=fast_path,
            kv_cache_gib=kv_cache_gib,
            max_batch=args.clients,
            max_queue=max(64, 2 * args.clients),
            max_tokens=max(512, args.new_tokens),
            request_timeout_s=600,
            worker_token=bench_token(),
        )
        section: dict[str, Any] = {}
        record[name] = section
        started = time.perf_counter()
        async with (
            listening_worker(settings, engine) as url,
            client_session(settings, timeout=timeout) as session,
        ):
            while True:  # readiness, as `smolcord run` and the bot wait for it
                async with session.get(f"{url}/v1/models") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.2)
            section["ready_s"] = round(time.perf_counter() - started, 1)
            fast = engine.fast_path
            if fast_path:
                if fast is None:
                    section["error"] = (
                        "the warm-up failed: the worker fell back to plain generate (see the log)"
                    )
                    dump()
                    return
                section.update(
                    warm_up_s=round(fast.warm_up_s or 0, 1),
                    graphs_at_warm_up=fast.graphs_at_warm_up,
                    compiled=fast.compiled,
                    shapes=len(fast.plan.shapes),
                    batch_buckets=list(fast.plan.batch_buckets),
                    length_buckets=list(fast.plan.length_buckets),
                )
                print(name, section, flush=True)
                section["baselines_compiled_first"] = await child.compiled(args.deadline)

            for label, batch in (("b1", bodies[:1]), (f"b{args.clients}", bodies)):
                if time.perf_counter() > args.deadline:
                    section[label] = "skipped: past --budget-s"
                    continue

                async def over_http(batch: Sequence[dict[str, Any]] = batch) -> float:
                    if len(batch) == 1:
                        began = time.perf_counter()
                        await post(session, url, batch[0])
                        return time.perf_counter() - began
                    return await all_at_once(session, url, batch)

                await over_http()  # warm-up: the plain path's first kernels, the allocator
                seconds = statistics.median([await over_http() for _ in range(args.repeats)])
                section[label] = {
                    "http_s": round(seconds, 4),
                    "tok_per_s": round(len(batch) * args.new_tokens / seconds, 1),
                }
                print(name, label, section[label], flush=True)
                dump()
            if fast_path and fast is not None:
                section["graphs_after_warm_up"] = fast.graphs_since_warm_up()
                section["batches_per_shape"] = {f"{b}x{n}": count for (b, n), count in fast.launches.items()}
                section["plain_fallbacks"] = fast.fallbacks
        if engine.device.type == "cuda":
            section["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        dump()


# ------------------------------------------------------------------------------ the baselines (child process)


class _Child:
    """The baselines' process, seen from the worker's: started first, compiles beside it, measures after it."""

    def __init__(self, args: argparse.Namespace, sync: Path, log_path: Path) -> None:
        self.sync = sync
        command = [
            sys.executable, "-m", "bench.gpu_fastpath", "--baseline-child", "--sync", str(sync),
            "--device", args.device, "--arch", args.arch,
            "--clients", str(args.clients), "--new-tokens", str(args.new_tokens),
        ]  # fmt: skip
        if args.anchors:
            command += ["--anchors", str(Path(args.anchors).resolve())]
        env = os.environ | {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))
        }
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            command, cwd=_REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    async def compiled(self, deadline: float) -> bool:
        """Wait (until deadline) for the child's compiles to end, so they never run beside a measurement."""
        while not (self.sync / _COMPILED).exists() and self.process.poll() is None:
            if time.perf_counter() > deadline:
                return False
            await asyncio.sleep(0.5)
        return True

    def finish(self, deadline: float) -> dict[str, Any]:
        """Let the child measure now, wait for it (until deadline) and return its figures."""
        (self.sync / _GO).touch()
        try:
            self.process.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        results = self.sync / _RESULTS
        if results.exists():
            return json.loads(results.read_text())
        return {"error": f"no figures (exit status {self.process.returncode}; see its log)"}


def run_baselines(args: argparse.Namespace) -> int:
    """The child: plain and static-compiled `generate` at batch 1 and --clients; compile now, time on "go"."""
    sync = Path(args.sync)
    record: dict[str, Any] = {}
    try:
        lib = _anchor_lib(args.anchors) if args.anchors else _stand_in(args)
        record["source"] = "gpu_anchor_lib" if args.anchors else "stand-in on the tiny model (dry run)"
        model, config = lib.build("smolvlm-256m")
        batches = sorted({1, args.clients})
        inputs = {b: lib.inputs(config, b)[0] for b in batches}
        plain = dict(max_new_tokens=lib.NEW, min_new_tokens=lib.NEW, do_sample=False)
        static = plain | {"cache_implementation": "static"}  # exactly gpu_anchor_compiled.py's call

        def seconds(**kwargs: Any) -> float:
            began = time.perf_counter()
            model.generate(**kwargs)
            lib.sync()
            return time.perf_counter() - began

        compiled: dict[str, Any] = {}
        for b in batches:  # as gpu_anchor_compiled.py: the first call compiles, the second records
            compiled[f"b{b}"] = {"first_call_s": round(seconds(**inputs[b], **static), 2)}
            seconds(**inputs[b], **static)
            print("compiled", b, compiled[f"b{b}"], flush=True)
        (sync / _COMPILED).touch()
        while not (sync / _GO).exists():
            time.sleep(0.2)
        record["plain_generate"] = {}
        for b in batches:
            seconds(**inputs[b], **plain)  # gpu_anchor.py's `timed`: one call to warm up, then the timed one
            total = seconds(**inputs[b], **plain)
            record["plain_generate"][f"b{b}"] = _figures(b, lib.NEW, total)
            print("plain", b, record["plain_generate"][f"b{b}"], flush=True)
        for b in batches:
            compiled[f"b{b}"] |= _figures(b, lib.NEW, seconds(**inputs[b], **static))
            print("compiled", b, compiled[f"b{b}"], flush=True)
        record["compiled_generate"] = compiled
        record["new_tokens"] = lib.NEW
    except Exception:
        record["error"] = traceback.format_exc()[-3000:]
        print(record["error"], flush=True)
    (sync / _COMPILED).touch()  # never leave the worker's process waiting
    (sync / _RESULTS).write_text(json.dumps(record))
    return 0


def _figures(batch: int, new_tokens: int, total: float) -> dict[str, float]:
    return {"total_s": round(total, 4), "tok_per_s": round(batch * new_tokens / total, 1)}


def _anchor_lib(anchors: str) -> Any:
    sys.path.insert(0, str(Path(anchors).resolve()))
    import gpu_anchor_lib  # type: ignore[import-not-found]  # ../shared/gpu's, copied by the caller

    return gpu_anchor_lib


def _stand_in(args: argparse.Namespace) -> Any:
    """gpu_anchor_lib's build / inputs / sync / NEW for the tiny model on --device (dry runs only)."""
    from transformers import Idefics3ForConditionalGeneration

    from model.tiny import arch_config

    device = torch.device(args.device)

    def build(name: str) -> tuple[Any, Any]:
        config = arch_config("tiny")
        model = Idefics3ForConditionalGeneration(config).to(device).eval()  # type: ignore[arg-type]
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
        return model, config

    def inputs(config: Any, batch: int) -> tuple[dict[str, torch.Tensor], int]:
        vision = config.vision_config
        image_tokens = 5 * (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
        ids = torch.randint(100, 1000, (batch, 40 + image_tokens), device=device)
        ids[:, 10 : 10 + image_tokens] = config.image_token_id
        pixels = torch.randn(batch, 5, 3, vision.image_size, vision.image_size, device=device)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": pixels,
        }, image_tokens

    return SimpleNamespace(build=build, inputs=inputs, sync=lambda: _sync(device), NEW=args.new_tokens)


# ------------------------------------------------------------------------------ main


def _summary(record: dict[str, Any], clients: int) -> dict[str, Any]:
    def rate(*path: str) -> float | None:
        node: Any = record
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, int | float) else None

    many = f"b{clients}"
    table = {
        label: {
            "fast_path": rate("fast_path_on", batch, "tok_per_s"),
            "plain_worker": rate("fast_path_off", batch, "tok_per_s"),
            "plain_generate": rate("baselines", "plain_generate", batch, "tok_per_s"),
            "compiled_generate": rate("baselines", "compiled_generate", batch, "tok_per_s"),
        }
        for label, batch in (("b1_tok_per_s", "b1"), (f"{many}_tok_per_s", many))
    }
    fast_1, fast_n = table["b1_tok_per_s"]["fast_path"], table[f"{many}_tok_per_s"]["fast_path"]
    return {
        **table,
        "goals": GOALS,
        "goal_b1_met": fast_1 is not None and fast_1 >= GOALS["b1_tok_per_s"],
        "goal_clients_met": fast_n is not None and fast_n >= GOALS["clients_tok_per_s"],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_fastpath", description=__doc__.splitlines()[0])
    parser.add_argument("--anchors", help="folder with copies of ../shared/gpu's gpu_anchor*.py (baselines)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure (the median is kept)")
    parser.add_argument("--max-length", type=int, default=1024, help="cache positions the budget holds a row")
    parser.add_argument("--budget-s", type=float, default=280, help="cut sections that would run past this")
    parser.add_argument("--arch", default="smolvlm-256m", help="tiny for a CPU dry run")
    parser.add_argument("--device", default="cuda", help="cpu for a dry run (figures meaningless)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--baseline-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sync", help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.baseline_child:
        raise SystemExit(run_baselines(args))

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench.gpu_fastpath: needs a CUDA GPU and torch sees none; run it on the GPU machine "
            "(or pass --device cpu --arch tiny for a dry run)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if args.device.startswith("cuda") and not args.anchors:
        print("bench.gpu_fastpath: no --anchors: the baselines are skipped", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("model.routes").setLevel(logging.WARNING)  # a line per request
    args.deadline = time.perf_counter() + args.budget_s

    from model.engine import Engine
    from model.tiny import build_tiny_model

    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "gpu_fastpath.json"
    record: dict[str, Any] = {"bench": "gpu_fastpath", "arch": args.arch}

    def dump() -> None:
        out_file.write_text(json.dumps(record, indent=1))

    with tempfile.TemporaryDirectory(prefix="gpu-fastpath-") as tmp:
        child = None
        try:
            import transformers

            record["env"] = {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
            }
            # The baselines' process first: its compiles run while this one builds and warms up.
            if args.anchors or not args.device.startswith("cuda"):
                child = _Child(args, Path(tmp), args.out / "gpu_fastpath_baselines.log")
            started = time.perf_counter()
            model_dir = build_tiny_model(Path(tmp) / "model", arch=args.arch)
            engine = Engine.load(str(model_dir), device=args.device)
            record["build_and_load_s"] = round(time.perf_counter() - started, 1)
            record["env"]["dtype"] = str(engine.dtype).removeprefix("torch.")
            dump()
            asyncio.run(measure_worker(engine, args, Path(tmp) / "data", record, dump, child or _NoChild()))
        except Exception:
            record["error"] = traceback.format_exc()[-3000:]
            print(record["error"], file=sys.stderr, flush=True)
        if child is not None:
            record["baselines"] = child.finish(args.deadline + 60)
        record["summary"] = _summary(record, args.clients)
        record["total_s"] = round(args.budget_s - (args.deadline - time.perf_counter()), 1)
    dump()
    print(json.dumps(record), flush=True)
    return record


class _NoChild:
    """No baselines (no --anchors on a GPU): nothing to wait for."""

    async def compiled(self, deadline: float) -> bool:
        return False


if __name__ == "__main__":
    main()
