"""The training job end to end on the tiny model: store -> DPO/KTO -> gate -> registry -> worker.

The votes are synthetic but real (feedback.store.synthetic records them through the store's
service functions): each prompt shows a colour, the 👍 answer names it and the 👎 answer names
another, so only a model that looks at the image can learn the preference. One adapter is
trained per module (`trained`) and shared; the gate, corrupt-adapter and --force tests reuse its
files instead of training again.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from feedback.store.db import upgrade_to_head
from feedback.store.synthetic import record_colour_votes
from feedback.training.config import GateArguments, RunArguments, TrainArguments
from feedback.training.data import load_training_data
from feedback.training.gate import (
    GateScores,
    HeldoutScore,
    ProbeScore,
    decide,
    is_degenerate,
    preference_score,
    sign_test,
    sign_test_level,
)
from feedback.training.job import (
    EXIT_ALREADY_RUNNING,
    EXIT_PROMOTED,
    EXIT_REJECTED,
    EXIT_TOO_FEW,
    run,
)
from feedback.training.publish import earlier_tests, publish_candidate
from feedback.training.store import JobStore
from feedback.training.trainer import (
    NotEnoughGpuMemory,
    build_trainer,
    check_gpu_memory,
    completion_only_logprobs,
    load_for_training,
    plan_model,
)
from smolcord.registry import AdapterRegistry
from smolcord.settings import Settings
from smolcord.trainlock import AlreadyRunning, training_lock, training_running

PROMPTS = 40  # 0.25 held out by prompt key: 10 held-out pairs, 30 to train on
# Loud enough for the tiny model to learn the colours in 8 steps (the defaults suit real models); the
# NLL term on the chosen answers (RPO) makes it answer "It is red." and stop instead of looping "red red".
FAST = TrainArguments(learning_rate=1e-2, num_train_epochs=1, per_device_train_batch_size=4, sft_weight=1.0)
CLOSED_PORT_URL = "http://127.0.0.1:9"  # nothing listens: the worker is down


def read_store(settings: Settings, read: Any) -> Any:
    """One read through the job's own store client, closed after it."""
    with JobStore(settings) as store:
        return read(store)


def make_settings(data_dir: Path, model_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        data_dir=data_dir,
        model=str(model_dir),
        heldout_fraction=0.25,
        gate_min_heldout=8,
        gate_margin=0.05,
        worker_url=CLOSED_PORT_URL,
        keep_versions=5,
        canary=False,  # promotion straight away; the canary's path has its own tests below
    )
    return Settings(_env_file=None, **(values | overrides))  # type: ignore[call-arg]


def lines_of(buffer: io.StringIO) -> list[dict[str, Any]]:
    """Every stdout line must be a JSON object (the bot parses them)."""
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def copy_store(template: Path, target: Path) -> Path:
    shutil.copytree(template, target)
    return target


class FakeWorker:
    """Records POST /v1/adapters/load on a free port, served from a thread of its own."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> FakeWorker:
        from aiohttp import web

        async def load(request: web.Request) -> web.Response:
            body = await request.json()
            self.loaded.append(body["version"])
            return web.json_response({"version": body["version"]})

        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_post("/v1/adapters/load", load)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"
            return runner

        self._thread.start()
        self._runner = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread for this module: on a small shared machine two OpenMP threads spin-wait on each
    other whenever another process holds a core, and training steps take 10-20x longer at random."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def colour_store(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A data dir with a migrated store holding PROMPTS voted colour prompts; tests that write copy it."""
    data_dir = tmp_path_factory.mktemp("colour-store") / "data"
    settings = make_settings(data_dir, tiny_model_dir)
    upgrade_to_head(settings.db_url)
    record_colour_votes(settings, prompts=PROMPTS)
    return data_dir


@dataclass
class Trained:
    settings: Settings
    code: int
    lines: list[dict[str, Any]]
    worker_loaded: list[str]
    adapter: Path


@pytest.fixture(scope="module")
def trained(colour_store: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One DPO run on the colour votes, with a worker listening: the adapter the module shares."""
    data_dir = copy_store(colour_store, tmp_path_factory.mktemp("trained") / "data")
    out = io.StringIO()
    with FakeWorker() as worker:
        settings = make_settings(data_dir, tiny_model_dir, worker_url=worker.url)
        code = run(settings, RunArguments(progress="json"), FAST, stdout=out)
    return Trained(settings, code, lines_of(out), worker.loaded, data_dir / "adapters" / "v1")


@pytest.fixture(scope="module")
def colour_data(colour_store: Path, tiny_model_dir: Path) -> tuple[Any, Any]:
    """(processor, TrainingData) of the colour store, as the job loads them."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    settings = make_settings(colour_store, tiny_model_dir)
    with JobStore(settings) as store:
        data = load_training_data(store, settings, method="dpo", processor=processor, limit=2048)
    return processor, data


def registry_of(settings: Settings) -> AdapterRegistry:
    return AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)


def install(settings: Settings, adapter: Path, *, promote: bool) -> str:
    """Put a copy of an adapter folder into a registry as a new version."""
    registry = registry_of(settings)
    with registry.new_version({"status": "accepted"}) as staged:
        shutil.copytree(
            adapter, staged.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("metrics.json")
        )
    if promote:
        registry.promote(str(staged.version), expected_current=registry.current())
    return str(staged.version)


# ------------------------------------------------------------------------------ a full run


@pytest.mark.slow
def test_dpo_run_learns_the_colours_and_is_promoted_and_served(
    trained: Trained, tiny_model_dir: Path
) -> None:
    assert trained.code == EXIT_PROMOTED
    *progress, final = trained.lines
    assert progress and all(set(p) == {"step", "total", "loss"} for p in progress)
    assert [p["step"] for p in progress] == list(range(1, progress[-1]["total"] + 1))
    assert final["verdict"] == "promoted" and final["exit_code"] == 0
    assert final["version"] == final["current"] == "v1"

    registry = registry_of(trained.settings)
    assert registry.current() == "v1"
    metrics = registry.metrics("v1")
    assert metrics["status"] == "promoted"
    assert metrics["heldout_pairs"] == final["heldout_pairs"] >= trained.settings.gate_min_heldout
    # Beats the base (0.5: all ties) on pairs it never trained on, by more than the gate's margin.
    assert metrics["current"] == {"version": None, "heldout_accuracy": 0.5, "heldout_margin": 0.0}
    assert metrics["heldout_accuracy"] >= 0.5 + trained.settings.gate_margin
    assert metrics["heldout_margin"] > 0
    assert metrics["data"]["train_pairs"] + metrics["data"]["heldout_pairs"] == PROMPTS
    # The probes: greedy answers to held-out questions, short and not looping (the base rambles).
    assert metrics["probes"]["candidate"]["degenerate"] <= metrics["probes"]["current"]["degenerate"]
    assert metrics["probes"]["candidate"]["mean_tokens"] < metrics["probes"]["current"]["mean_tokens"]
    assert (trained.adapter / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert trained.worker_loaded == ["v1"]
    assert "serves v1" in final["worker"]

    # The run and every pair it used are in the store, held-out ones marked.
    run_view = read_store(trained.settings, lambda store: store.get_run(run_id=final["run_id"]))
    assert (run_view.status, run_view.adapter_version) == ("succeeded", "v1")
    assert (run_view.pairs, run_view.heldout) == (PROMPTS, metrics["heldout_pairs"])
    [record] = read_store(trained.settings, JobStore.list_adapters)
    assert (record.version, record.status, record.run_id) == ("v1", "promoted", final["run_id"])


@pytest.mark.slow
def test_the_adapter_is_plain_peft_on_the_text_model_and_changed_the_weights(
    trained: Trained, tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    tensors = load_file(trained.adapter / "adapter_model.safetensors")
    assert tensors and all(".text_model.layers." in key for key in tensors)
    assert not any("vision_model" in key or "connector" in key for key in tensors)
    # peft initialises every lora_B to zero: training moved them.
    assert all(t.abs().max() > 0 for key, t in tensors.items() if "lora_B" in key)

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, trained.adapter)
    assert not torch.allclose(model(input_ids=ids).logits, before)
    with model.disable_adapter():
        assert torch.allclose(model(input_ids=ids).logits, before)


@pytest.mark.slow
def test_a_candidate_trained_on_reversed_labels_is_rejected(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = make_settings(tmp_path / "data", tiny_model_dir)
    upgrade_to_head(settings.db_url)
    # Votes backwards on every training prompt; the held-out prompts, voted right, show the truth.
    record_colour_votes(settings, prompts=PROMPTS, seed=1, reverse="train")
    out = io.StringIO()
    code = run(settings, RunArguments(progress="json"), FAST, stdout=out)
    final = lines_of(out)[-1]
    assert code == EXIT_REJECTED and final["verdict"] == "rejected"
    registry = registry_of(settings)
    assert registry.current() is None  # still the base
    assert registry.versions() == ["v1"]  # kept, as rejected, with its metrics
    metrics = registry.metrics("v1")
    assert metrics["status"] == "rejected"
    assert metrics["heldout_accuracy"] < 0.5
    assert "not above" in " ".join(metrics["gate"]["reasons"])
    assert final["worker"].startswith("not told")
    assert read_store(settings, JobStore.list_adapters)[0].status == "rejected"
    assert (metrics["gate"]["test_number"], metrics["gate"]["level"]) == (1, pytest.approx(0.025))
    # The next night's candidate is the second tested against the base: its test is stricter.
    assert run(settings, RunArguments(progress="none"), FAST, stdout=io.StringIO()) == EXIT_REJECTED
    second = registry.metrics("v2")["gate"]
    assert (second["test_number"], second["level"]) == (2, pytest.approx(0.05 / 6))


@pytest.mark.slow
def test_kto_trains_on_rated_answers(colour_store: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    settings = make_settings(copy_store(colour_store, tmp_path / "data"), tiny_model_dir)
    out = io.StringIO()
    hp = replace(FAST, max_steps=4)
    code = run(settings, RunArguments(method="kto", progress="json"), hp, stdout=out)
    *progress, final = lines_of(out)
    assert code in (EXIT_PROMOTED, EXIT_REJECTED), final
    assert [p["step"] for p in progress] == [1, 2, 3, 4]
    metrics = registry_of(settings).metrics("v1")
    assert metrics["method"] == "kto"
    assert metrics["data"]["train_answers"] > metrics["data"]["heldout_pairs"] > 0
    tensors = load_file(settings.adapters_dir / "v1" / "adapter_model.safetensors")
    assert all(t.abs().max() > 0 for key, t in tensors.items() if "lora_B" in key)
    run_view = read_store(settings, lambda store: store.get_run(run_id=final["run_id"]))
    assert run_view.method == "kto" and run_view.status == "succeeded"


@pytest.mark.slow
def test_sft_then_dpo_trains_one_lora_that_the_worker_merges(
    colour_store: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from model.adapters import MergedAdapters

    settings = make_settings(copy_store(colour_store, tmp_path / "data"), tiny_model_dir)
    out = io.StringIO()
    code = run(
        settings, RunArguments(method="sft+dpo", progress="json"), replace(FAST, max_steps=3), stdout=out
    )
    *progress, final = lines_of(out)
    assert code in (EXIT_PROMOTED, EXIT_REJECTED), final
    assert [p["step"] for p in progress] == [1, 2, 3, 1, 2, 3]  # the supervised pass, then DPO
    metrics = registry_of(settings).metrics("v1")
    assert metrics["method"] == "sft+dpo"
    counts = metrics["data"]
    # One 👍 answer per training prompt: as many liked answers as training pairs, none held out.
    assert counts["train_liked_answers"] == counts["train_pairs"] > counts["heldout_pairs"] > 0
    assert counts["train_pairs"] + counts["heldout_pairs"] == PROMPTS
    assert metrics["train"]["sft"]["steps"] == 3 and metrics["train"]["sft"]["final_loss"] > 0
    run_view = read_store(settings, lambda store: store.get_run(run_id=final["run_id"]))
    assert run_view.method == "sft+dpo" and run_view.status == "succeeded"

    # One plain adapter (not trl's "ref" copy), trained, that the worker merges into the base.
    adapter = settings.adapters_dir / "v1"
    assert not (adapter / "ref").exists()
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors and all(t.abs().max() > 0 for key, t in tensors.items() if "lora_B" in key)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    before = base(input_ids=ids).logits
    merged = MergedAdapters(base, base_model_id=str(tiny_model_dir))
    merged.load(adapter, version="v1")
    assert merged.version == "v1" and not torch.allclose(base(input_ids=ids).logits, before)


@pytest.mark.slow
def test_sft_then_dpo_uses_the_supervised_model_as_dpos_reference(
    colour_data: tuple[Any, Any], colour_store: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from feedback.training.trainer import supervised_pass

    processor, _ = colour_data
    settings = make_settings(colour_store, tiny_model_dir)
    with JobStore(settings) as store:
        data = load_training_data(store, settings, method="sft+dpo", processor=processor, limit=2048)
    assert data.liked and all(e.row["label"] and not e.heldout for e in data.liked)
    plan = plan_model(
        str(tiny_model_dir), device="cpu", dtype="auto", load_in_4bit="auto", gradient_checkpointing="auto",
        headroom_gib=0,
    )  # fmt: skip
    hp = replace(FAST, max_steps=2)
    model, done = supervised_pass(load_for_training(plan), processor, data, plan, hp, tmp_path)
    assert done["steps"] == 2
    supervised = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    assert any(p.abs().max() > 0 for n, p in supervised.items() if "lora_B" in n)  # the pass trained
    trainer = build_trainer("sft+dpo", model, processor, data, plan, hp, tmp_path)
    assert trainer.model is model and set(model.peft_config) == {"default", "ref"}
    with completion_only_logprobs(torch.device("cpu")):
        trainer.train()
    for name, before in supervised.items():
        # The reference is the SFT'd adapter, frozen; DPO moved the trained one on from there.
        assert torch.equal(model.get_parameter(name.replace(".default.", ".ref.")), before)
    assert any(not torch.equal(model.get_parameter(n), p) for n, p in supervised.items())


def test_lora_targets_add_the_connector_and_the_vision_tower(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    from feedback.training.trainer import lora_config

    plan = plan_model(
        str(tiny_model_dir), device="cpu", dtype="auto", load_in_4bit="auto", gradient_checkpointing="auto",
        headroom_gib=0,
    )  # fmt: skip
    assert plan.connector_linears == ("model.connector.modality_projection.proj",)
    assert len(plan.vision_linears) == 12  # 2 layers x (q, k, v, out_proj, fc1, fc2)

    def adapted(targets: str) -> set[str]:
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
        peft = get_peft_model(model, lora_config(plan, r=2, alpha=4, targets=targets))
        return {n.removeprefix("base_model.model.") for n, m in peft.named_modules() if hasattr(m, "lora_A")}

    text = adapted("text")
    assert len(text) == 14 and all(n.startswith(plan.text_model + ".layers.") for n in text)
    assert adapted("text+connector") == text | set(plan.connector_linears)
    assert adapted("all") == text | set(plan.connector_linears) | set(plan.vision_linears)

    # The worker merges such an adapter (any Linear), connector and vision tower included.
    from model.adapters import MergedAdapters

    peft = get_peft_model(
        AutoModelForImageTextToText.from_pretrained(tiny_model_dir),
        lora_config(plan, r=2, alpha=4, targets="all"),
    )
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    peft.save_pretrained(tmp_path / "all")
    served = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    connector = served.get_submodule(plan.connector_linears[0]).weight.detach().clone()
    MergedAdapters(served, base_model_id=str(tiny_model_dir)).load(tmp_path / "all", version="v1")
    assert not torch.equal(served.get_submodule(plan.connector_linears[0]).weight, connector)
    with pytest.raises(ValueError, match="lora_targets"):
        lora_config(plan, r=2, alpha=4, targets="vision")


# ------------------------------------------------------------------------------ data: lengths, collation


@pytest.mark.slow
def test_completion_tokens_survive_collation(
    colour_data: tuple[Any, Any], tiny_model_dir: Path, tmp_path: Path
):
    processor, data = colour_data
    plan = plan_model(
        str(tiny_model_dir), device="cpu", dtype="auto", load_in_4bit="auto", gradient_checkpointing="auto",
        headroom_gib=0,
    )  # fmt: skip
    trainer = build_trainer("dpo", load_for_training(plan), processor, data, plan, FAST, tmp_path)
    assert trainer.args.max_length == data.max_length == max(e.tokens for e in data.train + data.heldout)
    batch = next(iter(trainer.get_train_dataloader()))
    per_row = batch["completion_mask"].sum(-1)
    assert batch["input_ids"].shape[0] == 2 * FAST.per_device_train_batch_size
    # Every chosen and rejected answer keeps all its tokens: " It is red.<end_of_utterance>\n".
    answer = processor.tokenizer(" It is red.<end_of_utterance>\n", add_special_tokens=False)["input_ids"]
    assert (per_row == len(answer)).all(), per_row
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    assert ((labels != -100).sum(-1) > 0).all()
    # On the CPU the job lets trl's fused head score only those tokens: the same log-probabilities.
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        everywhere = trainer.model(**inputs, labels=labels, fused_lm_head=True).log_probs
        with completion_only_logprobs(torch.device("cpu")):
            compact = trainer.model(**inputs, labels=labels, fused_lm_head=True).log_probs
    assert torch.allclose(everywhere, compact, atol=1e-6) and compact.abs().sum() > 0


def test_too_long_examples_are_dropped_and_counted_never_cut(colour_data: tuple[Any, Any]) -> None:
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from feedback.training.data import split_by_length, with_images

    processor, data = colour_data
    examples = data.train + data.heldout
    lengths = sorted(e.tokens for e in examples)
    limit = lengths[len(lengths) // 2]
    kept, dropped = split_by_length(examples, limit)
    assert len(kept) + len(dropped) == len(examples) and dropped and kept
    assert all(e.tokens <= limit for e in kept) and all(e.tokens > limit for e in dropped)
    # The trap this avoids: trl's collator cuts at max_length, and a cut completion trains on nothing.
    shortest_prompt = min(e.tokens - e.completion_tokens for e in examples)
    cut = DataCollatorForVisionPreference(processor=processor, max_length=shortest_prompt)
    assert cut([with_images(examples[0].row)])["completion_mask"].sum() == 0


def test_dry_run_prints_the_counts_and_trains_nothing(
    colour_store: Path, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from smolcord.cli import main

    data_dir = copy_store(colour_store, tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # no .env from the repository
    for name, value in {"DATA_DIR": data_dir, "MODEL": tiny_model_dir, "HELDOUT_FRACTION": 0.25}.items():
        monkeypatch.setenv(f"SMOLCORD_{name}", str(value))
    assert main(["train", "--dry-run", "--progress", "json"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    final = json.loads(line)
    assert final["verdict"] == "dry-run" and final["exit_code"] == 0
    counts = final["data"]
    assert counts["train_pairs"] + counts["heldout_pairs"] == PROMPTS and counts["heldout_pairs"] > 0
    assert counts["images"] == PROMPTS and counts["dropped_too_long"] == 0
    assert 0 < counts["tokens"]["min"] <= counts["tokens"]["max"] <= counts["token_limit"]
    settings = make_settings(data_dir, tiny_model_dir)
    assert registry_of(settings).versions() == []
    assert (
        read_store(
            settings, lambda store: store.last_run(statuses=("running", "succeeded", "failed", "skipped"))
        )
        is None
    )


def test_too_few_pairs_exit_cleanly(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = make_settings(tmp_path / "data", tiny_model_dir)
    upgrade_to_head(settings.db_url)
    record_colour_votes(settings, prompts=2)
    out = io.StringIO()
    assert run(settings, RunArguments(progress="json"), stdout=out) == EXIT_TOO_FEW
    [final] = lines_of(out)
    assert final["verdict"] == "skipped" and "too few" in final["message"]
    assert registry_of(settings).versions() == []
    last = read_store(settings, lambda store: store.last_run(statuses=("skipped",)))
    assert last is not None and last.pairs == 0


# ------------------------------------------------------------------------------ the canary


@pytest.mark.slow
def test_a_candidate_that_passes_the_gate_goes_into_canary_and_no_run_trains_while_it_runs(
    trained: Trained, colour_store: Path, colour_data: tuple[Any, Any], tmp_path: Path, tiny_model_dir: Path
) -> None:
    from feedback.store import canary as canary_service

    processor, data = colour_data
    data_dir = copy_store(colour_store, tmp_path / "data")
    with FakeWorker() as worker:
        settings = make_settings(
            data_dir, tiny_model_dir, worker_url=worker.url, canary=True, canary_share=0.3
        )
        registry = registry_of(settings)
        with JobStore(settings) as store:
            outcome = publish_candidate(
                settings, registry, store, save=lambda path: shutil.copytree(trained.adapter, path, dirs_exist_ok=True),
                processor=processor, data=data, method="dpo", hp=FAST, gate=GateArguments(), force=False,
                history=[],
            )  # fmt: skip
            assert outcome.canary and not outcome.promoted, outcome.message
            assert "in canary for 30% of users" in outcome.message
            v1 = outcome.version
            # current unchanged (the base model); the candidate beside it, on disk and in the store
            assert (registry.current(), registry.candidate()) == (None, v1)
            assert registry.canary()["current_at_start"] is None  # type: ignore[index]
            assert registry.metrics(v1)["status"] == "canary"
            record = store._call(canary_service.active_canary)
            assert record is not None and (record.candidate_version, record.current_version) == (v1, None)
            assert record.share == 0.3

        # one candidate at a time: a run while the canary is undecided trains nothing
        out = io.StringIO()
        assert run(settings, RunArguments(progress="json"), FAST, stdout=out) == EXIT_TOO_FEW
        [*_, final] = lines_of(out)
        assert final["verdict"] == "skipped" and f"{v1} is in canary" in final["message"]
        assert registry.versions() == [v1]


# ------------------------------------------------------------------------------ the gate


@pytest.mark.slow
def test_too_few_heldout_pairs_need_force(
    trained: Trained, colour_data: tuple[Any, Any], tmp_path: Path, tiny_model_dir: Path
) -> None:
    processor, data = colour_data
    settings = make_settings(tmp_path / "data", tiny_model_dir, gate_min_heldout=len(data.heldout) + 1)
    upgrade_to_head(settings.db_url)
    registry = registry_of(settings)

    def publish(force: bool) -> Any:
        with JobStore(settings) as store:
            return publish_candidate(
                settings, registry, store, save=lambda path: shutil.copytree(trained.adapter, path, dirs_exist_ok=True),
                processor=processor, data=data, method="dpo", hp=FAST, gate=GateArguments(), force=force,
            )  # fmt: skip

    refused = publish(force=False)
    assert not refused.promoted and "held-out pairs" in refused.message
    assert registry.current() is None and refused.metrics["status"] == "rejected"
    forced = publish(force=True)
    assert forced.promoted and "--force" in forced.message
    assert registry.current() == forced.version == "v2"
    assert registry.metrics("v2")["gate"]["forced"] is True


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage file", "nan weights"])
def test_a_corrupt_adapter_is_refused_even_with_force(
    damage: str, trained: Trained, colour_data: tuple[Any, Any], tmp_path: Path, tiny_model_dir: Path
) -> None:
    from safetensors.torch import load_file, save_file

    processor, data = colour_data
    settings = make_settings(tmp_path / "data", tiny_model_dir)
    upgrade_to_head(settings.db_url)
    registry = registry_of(settings)
    install(settings, trained.adapter, promote=True)

    def save_corrupt(path: Path) -> None:
        shutil.copytree(trained.adapter, path, dirs_exist_ok=True)
        weights = path / "adapter_model.safetensors"
        if damage == "garbage file":
            weights.write_bytes(weights.read_bytes()[:100])
        else:
            tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}
            save_file(tensors, weights)

    with JobStore(settings) as store:
        outcome = publish_candidate(
            settings, registry, store, save=save_corrupt, processor=processor, data=data, method="dpo", hp=FAST,
            gate=GateArguments(), force=True,
        )  # fmt: skip
    assert not outcome.promoted and "refused" in outcome.message
    assert registry.current() == "v1"
    assert outcome.metrics["gate"]["error"]


def test_killed_while_publishing_leaves_no_version_and_current_unmoved(
    trained: Trained, colour_data: tuple[Any, Any], tmp_path: Path, tiny_model_dir: Path
) -> None:
    processor, data = colour_data
    settings = make_settings(tmp_path / "data", tiny_model_dir)
    registry = registry_of(settings)
    install(settings, trained.adapter, promote=True)

    def save_then_die(path: Path) -> None:
        shutil.copytree(trained.adapter, path, dirs_exist_ok=True)
        raise SystemExit(143)  # what SIGTERM becomes inside a run

    with pytest.raises(SystemExit), JobStore(settings) as store:
        publish_candidate(
            settings, registry, store, save=save_then_die, processor=processor, data=data, method="dpo", hp=FAST,
            gate=GateArguments(),
        )  # fmt: skip
    assert registry.versions() == ["v1"] and registry.current() == "v1"
    assert [p.name for p in settings.adapters_dir.iterdir() if p.name.startswith(".tmp-")] == []


def gate_scores(
    candidate: list[float], current: list[float], *, bad_probes: int = 0, version: str | None = "v3"
) -> GateScores:
    """GateScores from per-pair outcomes (1 right, 0.5 tie, 0 wrong) of the candidate and current."""

    def held(outcomes: list[float]) -> HeldoutScore:
        accuracy = sum(outcomes) / len(outcomes) if outcomes else None
        return HeldoutScore(len(outcomes), accuracy, 0.1, outcomes=outcomes)

    return GateScores(
        held(candidate), held(current), ProbeScore(4, 0, bad_probes, 10.0), ProbeScore(4, 0, 0, 10.0), version
    )


def test_the_sign_test_is_exact() -> None:
    assert sign_test([1.0] * 12 + [0.0] * 4, [0.5] * 16) == (12, 4, 2517 / 65536)
    assert sign_test([1.0, 0.5, 0.0], [1.0, 0.5, 0.0]) == (0, 0, 1.0)  # no informative pair
    assert sign_test([1.0, 1.0, 0.0], [0.0, 1.0, 1.0]) == (1, 1, 0.75)


def test_gate_decisions() -> None:
    base = [0.5] * 20  # the base scores every pair as a tie
    clear = gate_scores([1.0] * 18 + [0.0] * 2, base, version=None)
    verdict = decide(clear, min_heldout=16, margin=0.05)
    assert verdict.promote and (verdict.better, verdict.worse) == (18, 2) and verdict.p_value < 0.001
    # Four pairs better and none worse: a 0.2 accuracy gain, but 4 coin flips land so 1 time in 16.
    current = [1.0] * 12 + [0.0] * 8
    small = decide(gate_scores([1.0] * 16 + [0.0] * 4, current), min_heldout=16, margin=0.05)
    assert not small.promote and "could be chance" in small.reasons[0] and small.p_value == 1 / 16
    assert decide(  # the first test against a version may spend half of alpha: 0.1 at 0.8
        gate_scores([1.0] * 16 + [0.0] * 4, current), min_heldout=16, margin=0.05, confidence=0.8
    ).promote
    # Significant, but the gain is below the margin.
    slim = decide(gate_scores([1.0] * 18 + [0.0] * 2, [0.5] * 20), min_heldout=16, margin=0.5)
    assert not slim.promote and "SMOLCORD_GATE_MARGIN" in slim.reasons[0]
    too_few = gate_scores([1.0] * 10, [0.0] * 10)
    assert not decide(too_few, min_heldout=16, margin=0.05).promote
    assert decide(too_few, min_heldout=16, margin=0.05, force=True).forced
    degenerate = decide(gate_scores([1.0] * 20, base, bad_probes=1), min_heldout=16, margin=0.05)
    assert not degenerate.promote and "degenerate" in degenerate.reasons[0]
    corrupt = replace(clear, error="unreadable")
    assert not decide(corrupt, min_heldout=0, margin=0, force=True).promote


@pytest.mark.parametrize("pairs", [16, 20, 32, 64])
def test_a_coin_flip_candidate_is_promoted_at_most_five_percent_of_the_time(pairs: int) -> None:
    """Exactly, over every outcome of a candidate no better than the base: P(promote) <= 1 - 0.95."""
    promoted = 0.0
    for right in range(pairs + 1):
        outcomes = [1.0] * right + [0.0] * (pairs - right)
        if decide(gate_scores(outcomes, [0.5] * pairs, version=None), min_heldout=16, margin=0.05).promote:
            promoted += math.comb(pairs, right) / 2**pairs
    assert 0 < promoted <= 0.05
    # The point estimate alone (accuracy above the base's by the margin) would promote far more often.
    by_margin = sum(math.comb(pairs, r) for r in range(pairs + 1) if r / pairs >= 0.55) / 2**pairs
    assert by_margin > 0.15


def test_the_gate_spends_its_level_over_the_candidates_tested_against_one_version() -> None:
    levels = [sign_test_level(0.95, k) for k in range(1, 2001)]
    assert levels[:3] == pytest.approx([0.025, 0.05 / 6, 0.05 / 12])
    assert all(a > b for a, b in itertools.pairwise(levels)) and 0.0499 < sum(levels) <= 0.05
    with pytest.raises(ValueError):
        sign_test_level(0.95, 0)
    assert sign_test_level(0.0, 1) == sign_test_level(0.0, 7) == 1.0  # confidence 0: the test is off
    worst = gate_scores([0.0] * 16, [0.5] * 16, version=None)  # worse on every pair: p = 1
    assert decide(worst, min_heldout=16, margin=-1.0, confidence=0.0, earlier_tests=3).promote
    # 9 better, 1 worse: p = 11/1024 = 0.0107 passes as the first test (0.025), not as the second.
    evidence = gate_scores([1.0] * 9 + [0.0] * 1 + [0.5] * 6, [0.5] * 16, version=None)
    first = decide(evidence, min_heldout=16, margin=0.05)
    second = decide(evidence, min_heldout=16, margin=0.05, earlier_tests=1)
    assert first.promote and (first.test_number, first.level) == (1, pytest.approx(0.025))
    assert not second.promote and second.test_number == 2 and "candidate 2 tested" in second.reasons[0]
    assert second.p_value == pytest.approx(11 / 1024)


def test_coin_flip_candidates_night_after_night_replace_a_version_at_most_five_percent_of_the_time() -> None:
    """Exactly, for candidates no better than current tested on 16..40 held-out pairs, one more a night:
    the nights' chances of promoting add up to at most 1 - 0.95, which bounds the chance that any
    night does; at the old fixed 0.05 a night they add up to more than ten times that."""

    def p_promote(pairs: int, earlier: int, **fixed: float) -> float:
        total = 0.0
        for right in range(pairs + 1):
            scores = gate_scores([1.0] * right + [0.0] * (pairs - right), [0.5] * pairs, version=None)
            if decide(scores, min_heldout=16, margin=0.05, earlier_tests=earlier, **fixed).promote:
                total += math.comb(pairs, right) / 2**pairs
        return total

    spent = sum(p_promote(16 + night, night) for night in range(25))
    assert 0 < spent <= 0.05
    # Without spending (every night a first test at 0.9 confidence: level 0.05): far above 5%.
    assert sum(p_promote(16 + night, 0, confidence=0.9) for night in range(25)) > 0.5


def test_earlier_tests_count_the_sign_tests_against_the_same_current_version() -> None:
    def record(current: str | None, p_value: float | None) -> Any:
        metrics = {"current": {"version": current}, "gate": {"p_value": p_value}}
        return SimpleNamespace(metrics=metrics)

    history = [
        record(None, 0.3),
        record(None, None),
        record("v1", 0.2),
        record(None, 0.01),
        record("v1", 0.5),
    ]
    history.append(SimpleNamespace(metrics=None))  # a version recorded before metrics existed
    store = SimpleNamespace(list_adapters=lambda: history)
    assert earlier_tests(store, None) == 2  # the one without a sign test (too few pairs) spent nothing
    assert earlier_tests(store, "v1") == 2 and earlier_tests(store, "v2") == 0


def test_preference_accuracy_counts_ties_as_half() -> None:
    base = torch.zeros(4)
    chosen = torch.tensor([1.0, 0.0, -1.0, 0.0])
    rejected = torch.tensor([0.0, 0.0, 0.0, -2.0])
    score = preference_score(chosen, rejected, base, base, beta=0.1)
    assert score.accuracy == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert score.mean_margin == pytest.approx(0.1 * (1 + 0 - 1 + 2) / 4)
    same = preference_score(base, base, base, base, beta=0.1)
    assert (same.accuracy, same.mean_margin) == (0.5, 0.0)
    assert (
        is_degenerate([], "   ")
        and is_degenerate([5, 6] * 10, "la la")
        and not is_degenerate(list(range(20)), "ok")
    )


# ------------------------------------------------------------------------------ one run at a time


def test_a_second_run_exits_already_running(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = make_settings(tmp_path / "data", tiny_model_dir)
    out = io.StringIO()
    with training_lock(settings.locks_dir):
        assert training_running(settings.locks_dir)
        with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"), training_lock(settings.locks_dir):
            pass
        assert run(settings, RunArguments(progress="json"), stdout=out) == EXIT_ALREADY_RUNNING
    [final] = lines_of(out)
    assert final["verdict"] == "already-running" and "already running" in final["message"]
    assert not training_running(settings.locks_dir)


@pytest.mark.slow
def test_a_killed_run_leaves_nothing_behind_and_the_next_run_works(
    colour_store: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    data_dir = copy_store(colour_store, tmp_path / "data")
    settings = make_settings(data_dir, tiny_model_dir)
    env = os.environ | {
        "SMOLCORD_DATA_DIR": str(data_dir), "SMOLCORD_MODEL": str(tiny_model_dir), "SMOLCORD_HELDOUT_FRACTION": "0.25",
        "SMOLCORD_WORKER_URL": CLOSED_PORT_URL, "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-m", "smolcord", "train", "--progress", "json"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        first = json.loads(_readline(child, timeout=120))
        assert set(first) == {"step", "total", "loss"} and first["step"] < first["total"]
        assert training_running(settings.locks_dir)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()  # type: ignore[union-attr]

    registry = registry_of(settings)
    assert registry.versions() == [] and registry.current() is None
    assert not training_running(settings.locks_dir)  # the OS dropped the flock with the process
    killed = read_store(settings, lambda store: store.last_run(statuses=("running",)))
    assert killed is not None

    out = io.StringIO()
    code = run(settings, RunArguments(progress="json"), replace(FAST, max_steps=2), stdout=out)
    assert code in (EXIT_PROMOTED, EXIT_REJECTED), lines_of(out)[-1]
    assert registry.versions() == ["v1"]
    assert read_store(settings, lambda store: store.get_run(run_id=killed.id)).status == "failed"
    assert list(settings.runs_dir.glob(".tmp-*")) == []


def _readline(child: subprocess.Popen[str], timeout: float) -> str:
    """The child's next stdout line, or fail after `timeout` seconds."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(child.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not result or not result[0]:
        pytest.fail(f"no progress line from the child within {timeout} s (exit code {child.poll()})")
    return result[0]


# ------------------------------------------------------------------------------ loading


def test_big_bases_load_in_4bit_with_vision_tower_connector_and_head_kept_out(tmp_path: Path) -> None:
    from transformers.quantizers.quantizers_utils import should_convert_module

    from model.tiny import arch_config

    arch_config("smolvlm-2b").save_pretrained(tmp_path)
    kwargs = dict(device="cpu", dtype="auto", gradient_checkpointing="auto", headroom_gib=1.0)
    plan = plan_model(str(tmp_path), load_in_4bit="auto", **kwargs)
    assert plan.params > 2e9 and not plan.quantize  # on the CPU: full precision, so the loop runs here
    assert plan.skip_modules == ("model.vision_model", "model.connector", "lm_head")
    assert not should_convert_module("model.vision_model.encoder.layers.0.mlp.fc1", list(plan.skip_modules))
    assert not should_convert_module("model.connector.modality_projection.proj", list(plan.skip_modules))
    assert should_convert_module("model.text_model.layers.0.mlp.up_proj", list(plan.skip_modules))
    with pytest.raises(ValueError, match="CUDA"):
        plan_model(str(tmp_path), load_in_4bit="true", **kwargs)


def test_not_enough_gpu_memory_is_refused_before_loading(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = plan_model(
        str(tiny_model_dir), device="cpu", dtype="auto", load_in_4bit="auto", gradient_checkpointing="auto",
        headroom_gib=4.0,
    )  # fmt: skip
    check_gpu_memory(plan)  # the CPU: nothing to check
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 80 * 2**30))
    with pytest.raises(NotEnoughGpuMemory, match=r"needs about 4\.0 GiB.*only 1\.0 of 80\.0 GiB"):
        check_gpu_memory(replace(plan, device=torch.device("cuda", 0)))
