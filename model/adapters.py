"""Serves LoRA adapters merged into the base weights, swapped in place and always recomputed from W0.

An unmerged LoRA costs two extra small matmuls per targeted layer per decoded token (it halved decode
speed on an H200), so the worker merges: for every Linear an adapter targets it writes

    W = W0 + scale · (B @ A)        scale = alpha / r   (alpha / √r with rsLoRA; per module with patterns)

into the weight's own storage. Compiled graphs and CUDA graphs hold pointers to that storage, so
nothing here ever replaces a Parameter or its ``.data``: every write is ``copy_`` into it.

Every swap starts from a pristine copy W0 of each weight ever touched, never from the weight as it
is, so any number of swaps ends bit-identical to a single load and "no adapter" restores the base
bit for bit. Everything about an adapter (config, file, keys, modules, shapes, values) is checked
before the first weight is written; a refused adapter leaves the model and ``version`` as they were.

The caller must keep the model out of use (no forward pass in flight) during ``load``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

# PeftModel.base_model is the LoraModel and LoraModel.model the wrapped model, so every key peft saves
# starts with this; what follows is the module's name in the model peft wrapped.
PEFT_PREFIX = "base_model.model."

# The only tensors a mergeable LoRA file holds (peft drops the adapter name when it saves).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$")

# Weight dtypes a merge may write into; 8-bit floats and quantized storage would not hold W0 + ΔW.
_MERGEABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# LoraConfig fields (peft 0.21) that say how or where an adapter was trained but not what it computes.
# target_modules & co are not needed: the saved tensors name the modules they apply to.
_INERT_OPTIONS = frozenset(
    {
        "peft_type",  # checked on its own
        "base_model_name_or_path",  # checked on its own
        "r",
        "lora_alpha",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "fan_in_fan_out",
        "bias",
        "init_lora_weights",
        "task_type",
        "auto_mapping",
        "peft_version",
        "revision",
        "inference_mode",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "lora_dropout",  # training only
        "megatron_core",  # a module name, used only with megatron_config
        "qalora_group_size",  # used only with use_qalora
        "runtime_config",
        "ensure_weight_tying",  # acts on modules_to_save / trainable tokens, both refused
        # Init-method settings: the inits that rewrite the base weights are refused via init_lora_weights.
        "eva_config",
        "loftq_config",
        "corda_config",
        "lora_ga_config",
    }
)

# LoraConfig fields that, when set, make the adapter something other than W0 + scale·BA.
_UNMERGEABLE_OPTIONS = {
    "use_dora": "DoRA rescales every output column by a learned magnitude",
    "modules_to_save": "modules_to_save replaces whole modules with trained copies",
    "trainable_token_indices": "trainable tokens patch rows of the embedding",
    "layer_replication": "layer replication changes which layers the model has",
    "target_parameters": "LoRA on bare nn.Parameters (e.g. MoE experts) is not handled here",
    "lora_bias": "a trained LoRA bias adds to the layer's bias",
    "megatron_config": "Megatron tensor-parallel layers are not handled here",
    "use_qalora": "QA-LoRA pools the layer's input before its A",
    "use_bdlora": "BD-LoRA is not handled here",
    "velora_config": "VeLoRA is not handled here",
    "alora_invocation_tokens": "aLoRA only acts after its invocation tokens",
    "monteclora_config": "MonteCLoRA samples its update",
    "arrow_config": "Arrow routes between adapters per token",
    "kasa_config": "KaSA scales by a learned diagonal",
}

# init_lora_weights values that leave W0 alone. PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite the base
# weight at init, so their adapter only holds on top of that rewritten base; peft converts them to
# plain LoRA (writing init_lora_weights=True) when saved with path_initial_model_for_weight_conversion.
_BASE_PRESERVING_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica")


class AdapterError(Exception):
    """An adapter the worker cannot serve merged; raised before any weight is written."""


@dataclass(frozen=True)
class _Update:
    """One module's validated update: W = W0 + scale · (b @ a), factors already on the weight's device."""

    module: str  # name in the served model
    a: torch.Tensor  # (r, in_features), float32
    b: torch.Tensor  # (out_features, r), float32
    scale: float


@dataclass(frozen=True)
class _Adapter:
    """An adapter as read from disk: its config and its tensors by the keys peft saved them under."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    weights_file: Path


class MergedAdapters:
    """Serves at most one LoRA adapter merged into ``model``'s Linear weights; ``load`` swaps it in place.

    ``version`` names the adapter served (None: the base model). ``base_model_id``, when given, must
    match an adapter's ``base_model_name_or_path`` (when it names one).

    Memory: the first time an adapter touches a module, a copy of its base weight is kept for good
    (the sum of all targeted weights: ~0.2 GB in bf16 for SmolVLM-256M's text q/k/v/o/gate/up/down,
    ~3.2 GB for SmolVLM-2B's). By default it stays on the weight's device, so a swap is a
    device-local copy and never waits on PCIe; ``base_copy_device="cpu"`` keeps it in (pinned) host
    memory instead where GPU memory is tight, at the cost of a host-to-device transfer per swap.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        base_model_id: str | None = None,
        base_copy_device: str | torch.device | None = None,
    ) -> None:
        # torch.compile's wrapper prefixes every name with _orig_mod; the weights are the same objects.
        self.model: nn.Module = getattr(model, "_orig_mod", model)
        self.base_model_id = base_model_id
        self.version: str | None = None
        self._base_copy_device = torch.device(base_copy_device) if base_copy_device is not None else None
        self._modules: dict[str, nn.Module] = dict(self.model.named_modules())
        shared = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        self._tied: set[int] = {pid for pid, n in shared.items() if n > 1}
        self._base: dict[str, torch.Tensor] = {}  # module name -> pristine W0
        self._served: dict[str, _Update] = {}  # what the weights hold now, by module name
        self._lock = threading.Lock()

    @property
    def base_copy_bytes(self) -> int:
        """Memory held by the pristine copies of the base weights."""
        return sum(t.numel() * t.element_size() for t in self._base.values())

    @property
    def merged_modules(self) -> tuple[str, ...]:
        """The modules whose weights hold an adapter's update now."""
        return tuple(sorted(self._served))

    def base_weights(self, model: nn.Module) -> None:
        """Write W0 into every weight of model (a copy of this one) that an adapter has touched here.

        A copy of a model serving an adapter holds that adapter merged; this makes it the base again,
        bit for bit, without loading anything from disk (the candidate's copy starts from it).
        """
        target = getattr(model, "_orig_mod", model)
        modules = dict(target.named_modules())
        with self._lock, torch.no_grad():
            for name, base in self._base.items():
                weight = modules[name].weight
                assert isinstance(weight, torch.Tensor)
                weight.copy_(base.to(weight.device))

    # ---------------------------------------------------------------- loading

    def load(self, adapter_dir: str | os.PathLike[str] | None, *, version: str | None = None) -> None:
        """Serves the adapter in adapter_dir merged (None: the base model); raises AdapterError, weights untouched."""
        if adapter_dir is None and version is not None:
            raise ValueError("a version names an adapter: pass its directory too")
        with self._lock, torch.no_grad():
            started = time.perf_counter()
            if adapter_dir is None:
                updates: dict[str, _Update] = {}
            else:
                path = Path(adapter_dir)
                version = version if version is not None else path.resolve().name
                updates = self._plan(_read_adapter(path), version)
            self._swap(updates)
            self.version = version if adapter_dir is not None else None
            log.info(
                "serving adapter %s merged into %d modules (%.1f ms)",
                self.version or "none (base)",
                len(updates),
                (time.perf_counter() - started) * 1e3,
            )

    @staticmethod
    def inspect(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
        """What an adapter directory holds, read without a model: its type, ranks, targets and size."""
        adapter = _read_adapter(Path(adapter_dir))
        config = adapter.config
        names = [key.removeprefix(PEFT_PREFIX) for key in adapter.tensors]
        lora = [m["module"] for m in map(_LORA_KEY.match, names) if m]
        return {
            "path": str(adapter.path),
            "peft_type": config.get("peft_type"),
            "base_model": config.get("base_model_name_or_path"),
            "r": config.get("r"),
            "lora_alpha": config.get("lora_alpha"),
            "use_rslora": bool(config.get("use_rslora")),
            "rank_pattern": config.get("rank_pattern") or {},
            "alpha_pattern": config.get("alpha_pattern") or {},
            "target_modules": sorted(set(lora)),
            "other_tensors": sorted(
                key for key, name in zip(adapter.tensors, names, strict=True) if not _LORA_KEY.match(name)
            ),
            "weights_file": adapter.weights_file.name,
            "bytes": adapter.weights_file.stat().st_size,
        }

    # ---------------------------------------------------------------- validation (writes nothing)

    def _plan(self, adapter: _Adapter, version: str) -> dict[str, _Update]:
        """Checks everything about adapter against this model; returns the updates, ready to write."""
        where = f"adapter {version} ({adapter.path})"
        config = adapter.config
        _check_config(config, where)
        factors = _group_factors(adapter.tensors, adapter.weights_file)
        trained_on = config.get("base_model_name_or_path")
        if self.base_model_id and trained_on and not _same_model(trained_on, self.base_model_id):
            raise AdapterError(
                f"{where} was trained on {trained_on!r}, but this worker serves {self.base_model_id!r}"
            )

        r_default, alpha_default = config["r"], config["lora_alpha"]
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        targets = self._resolve(sorted(factors), where)

        plan: dict[str, _Update] = {}
        for name, pair in sorted(factors.items()):
            target = targets[name]
            if target in plan:
                raise AdapterError(f"{where}: two of its modules map onto {target}")
            weight = self._weight(target, where)
            out_features, in_features = weight.shape
            # peft matches the patterns against the module name it saw when training: the saved one.
            r = _pattern_value(rank_pattern, name, r_default, where)
            alpha = _pattern_value(alpha_pattern, name, alpha_default, where)
            _check_number(r, f"{where}: rank of {name}", integer=True)
            _check_number(alpha, f"{where}: alpha of {name}", integer=False)
            a, b = pair["lora_A"], pair["lora_B"]
            if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (out_features, r):
                raise AdapterError(
                    f"{where}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but its config "
                    f"says r={r} and {target} is {in_features} -> {out_features}, so they must be "
                    f"({r}, {in_features}) and ({out_features}, {r}) (an adapter for another model size?)"
                )
            for factor, tensor in (("lora_A", a), ("lora_B", b)):
                if not tensor.is_floating_point():
                    raise AdapterError(f"{where}: {name}.{factor} is {tensor.dtype}, not a float tensor")
                if not bool(torch.isfinite(tensor).all()):
                    raise AdapterError(f"{where}: {name}.{factor} holds NaN or infinite values")
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            # |W0 + scale·BA| <= max|W0| + |scale|·r·max|B|·max|A|: refuse what could overflow the weight's dtype.
            bound = abs(scale) * r * float(a.abs().max()) * float(b.abs().max())
            base = self._base.get(target, weight)
            if float(base.abs().max()) + bound > torch.finfo(weight.dtype).max:
                raise AdapterError(f"{where}: {name}'s update could overflow {weight.dtype} in {target}")
            plan[target] = _Update(target, a, b, scale)

        # Only now move factors to the device and take the base copies: allocation may still fail here,
        # and nothing has been written yet.
        try:
            plan = {
                target: _Update(
                    target,
                    u.a.to(self._weight(target, where).device, torch.float32).contiguous(),
                    u.b.to(self._weight(target, where).device, torch.float32).contiguous(),
                    u.scale,
                )
                for target, u in plan.items()
            }
            for target in plan:
                if target not in self._base:
                    # Never touched before, so the weight is still the base.
                    self._base[target] = self._copy_of(self._weight(target, where))
        except RuntimeError as e:  # out of memory, typically
            raise AdapterError(f"{where}: could not stage its update: {e}") from e
        return plan

    def _resolve(self, names: list[str], where: str) -> dict[str, str]:
        """Maps the adapter's module names onto this model's, by one prefix added or dropped for all of them.

        peft saves each module's name in the model it wrapped. That is this model's own name when the
        adapter was trained on the same class (Idefics3ForConditionalGeneration: ``model.text_model.…``),
        but one ``model.`` (or ``_orig_mod.``, ...) apart when it was trained on the inner Idefics3Model
        or on a wrapper. One rule must hold for every name, and only one rule may: ambiguity is refused.
        """
        missing = [n for n in names if n not in self._modules]
        if not missing:
            return {n: n for n in names}
        probe = missing[0]
        rules: set[tuple[str, str]] = set()  # (prefix to drop, prefix to add)
        for candidate in self._modules:
            if candidate.endswith("." + probe):
                rules.add(("", candidate[: -len(probe)]))
            elif candidate and probe.endswith("." + candidate):
                rules.add((probe[: -len(candidate)], ""))
        fits = []
        for drop, add in sorted(rules):
            mapped = {n: add + n.removeprefix(drop) for n in names if n.startswith(drop)}
            if len(mapped) == len(names) and all(m in self._modules for m in mapped.values()):
                fits.append(mapped)
        if len(fits) == 1:
            return fits[0]
        if len(fits) > 1:
            raise AdapterError(f"{where}: module {probe} matches several modules of this model")
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise AdapterError(f"{where} targets modules this model does not have: {shown}")

    def _weight(self, target: str, where: str) -> torch.Tensor:
        """The weight of target, which must be a plain float Linear's that no other module shares."""
        module = self._modules[target]
        if not isinstance(module, nn.Linear):
            raise AdapterError(
                f"{where} targets {target}, a {type(module).__name__}; only Linear layers merge"
            )
        weight = module.weight
        if weight.dtype not in _MERGEABLE_DTYPES or type(weight) not in (nn.Parameter, torch.Tensor):
            raise AdapterError(f"{where} targets {target}, whose weight ({weight.dtype}) cannot take a merge")
        if id(weight) in self._tied:
            raise AdapterError(f"{where} targets {target}, whose weight is tied to another module's")
        return weight

    def _copy_of(self, weight: torch.Tensor) -> torch.Tensor:
        """A pristine copy of weight, where base_copy_device says (pinned when on the host for a GPU weight)."""
        device = self._base_copy_device or weight.device
        pin = device.type == "cpu" and weight.device.type == "cuda"
        copy = torch.empty(weight.shape, dtype=weight.dtype, device=device, pin_memory=pin)
        return copy.copy_(weight.detach())

    # ---------------------------------------------------------------- writing

    def _swap(self, updates: dict[str, _Update]) -> None:
        """Writes updates over every module the served adapter or the new one touches; rolls back on failure."""
        touched = sorted(self._served.keys() | updates.keys())
        try:
            self._write(touched, updates)
        except Exception as e:
            # Validation passed, so this is the device failing (out of memory, typically). Put back what
            # was served; if even that fails, the base, which needs no allocation beyond a copy.
            try:
                self._write(touched, self._served)
            except Exception:
                self._write(touched, {})
                self._served, self.version = {}, None
                raise AdapterError(f"merging failed ({e}); serving the base model now") from e
            raise AdapterError(
                f"merging failed ({e}); still serving {self.version or 'the base model'}"
            ) from e
        self._served = updates

    def _write(self, modules: list[str], updates: dict[str, _Update]) -> None:
        """W = W0 (+ scale·BA in float32, rounded once into W's dtype) for each of modules, in place."""
        for name in modules:
            module = self._modules[name]
            assert isinstance(module, nn.Linear)  # checked by _weight before it was first touched
            weight = module.weight
            base = self._base[name].to(weight.device, non_blocking=True)
            update = updates.get(name)
            if update is None:
                weight.copy_(base)
                continue
            merged = (update.b @ update.a).mul_(update.scale)
            merged.add_(base)  # W0 + ΔW, as peft's merge adds it
            weight.copy_(merged)


# -------------------------------------------------------------------- reading and checking files


def _read_adapter(path: Path) -> _Adapter:
    """Reads adapter_config.json and the LoRA factors of one adapter directory; AdapterError if unreadable."""
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    config_path = path / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{config_path}: unreadable ({e})") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: not a JSON object")
    weights_file, tensors = _read_tensors(path)
    return _Adapter(path, config, tensors, weights_file)


def _read_tensors(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The tensors of adapter_model.safetensors (preferred, as peft does) or adapter_model.bin, on the CPU."""
    safetensors_path, bin_path = path / SAFETENSORS_NAME, path / BIN_NAME
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        try:
            return safetensors_path, load_file(safetensors_path, device="cpu")
        except Exception as e:  # SafetensorError, OSError, ...: a truncated or corrupt file
            raise AdapterError(f"{safetensors_path}: unreadable ({e})") from e
    if bin_path.is_file():
        try:
            # weights_only: a pickle may run code on load; this accepts tensors and containers only.
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterError(f"{bin_path}: unreadable ({e})") from e
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise AdapterError(f"{bin_path}: not a state dict of named tensors")
        return bin_path, tensors
    raise AdapterError(f"{path} holds neither {SAFETENSORS_NAME} nor {BIN_NAME}")


def _group_factors(
    tensors: dict[str, torch.Tensor], weights_file: Path
) -> dict[str, dict[str, torch.Tensor]]:
    """{module name as peft saw it: {"lora_A": A, "lora_B": B}}; anything but LoRA factors is refused."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise AdapterError(f"{weights_file}: {_unexpected_key(key)}")
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    if not factors:
        raise AdapterError(f"{weights_file} holds no LoRA weights")
    for name, pair in factors.items():
        if len(pair) != 2:
            lacking = "lora_B" if "lora_A" in pair else "lora_A"
            raise AdapterError(f"{weights_file}: {name} has no {lacking}")
    return factors


def _unexpected_key(key: str) -> str:
    """Why a tensor that is not a LoRA factor cannot be merged, in the words of what it most likely is."""
    if "lora_magnitude_vector" in key:
        return f"{key} is a DoRA magnitude; DoRA cannot be merged as W0 + scale·BA"
    if "modules_to_save" in key:
        return f"{key} belongs to modules_to_save, which replace whole modules"
    if "lora_embedding_" in key:
        return f"{key} is a LoRA on an embedding; only Linear layers merge here"
    if "trainable_tokens" in key:
        return f"{key} is a trainable-tokens delta; only Linear layers merge here"
    if re.search(r"\.lora_B\.bias$", key):
        return f"{key} is a trained LoRA bias; it cannot be merged as W0 + scale·BA"
    return f"unexpected tensor {key} (full module weights, or not a plain LoRA)"


def _check_config(config: dict[str, Any], where: str) -> None:
    """Refuses every adapter_config.json whose adapter is not exactly W0 + scale·BA on Linear weights."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{where} is a {peft_type} adapter; only LORA merges")
    for option, why in _UNMERGEABLE_OPTIONS.items():
        if config.get(option):
            raise AdapterError(f"{where} sets {option}: {why}, which is not W0 + scale·BA")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where} trains biases (bias={config['bias']!r}), which are not W0 + scale·BA")
    init = config.get("init_lora_weights", True)
    if not any(init is v or (isinstance(init, str) and init == v) for v in _BASE_PRESERVING_INITS):
        raise AdapterError(
            f"{where} was initialised with init_lora_weights={init!r}, which rewrites the base weights; "
            "save it converted to plain LoRA (path_initial_model_for_weight_conversion)"
        )
    # fan_in_fan_out is for GPT-2-style Conv1D weights stored (in, out); peft forces it off on nn.Linear
    # (the only layers merged here) and keeps the factors in the usual layout, so it changes nothing.
    unknown = sorted(
        k for k, v in config.items() if k not in _INERT_OPTIONS and k not in _UNMERGEABLE_OPTIONS and v
    )
    if unknown:
        raise AdapterError(
            f"{where} sets options this worker does not know ({', '.join(unknown)}); "
            "it cannot tell whether they change what the adapter computes"
        )
    _check_number(config.get("r"), f"{where}: r", integer=True)
    _check_number(config.get("lora_alpha"), f"{where}: lora_alpha", integer=False)
    for option in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(option) or {}
        if not isinstance(patterns, dict) or not all(isinstance(k, str) for k in patterns):
            raise AdapterError(f"{where}: {option} must map module-name patterns to numbers")


def _check_number(value: Any, what: str, *, integer: bool) -> None:
    """A rank must be a positive int; an alpha any finite number."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise AdapterError(f"{what} must be a positive integer, not {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterError(f"{what} must be a finite number, not {value!r}")


def _pattern_value(patterns: dict[str, Any], name: str, default: Any, where: str) -> Any:
    """patterns' value for module name, matched as peft does (peft.utils.other.get_pattern_key).

    Each key is a regex that must match the whole name or a dotted suffix of it; the first key that
    matches, in the dict's order, wins.
    """
    for key in patterns:
        try:
            if re.fullmatch(rf"(.*\.)?({key})", name):
                return patterns[key]
        except re.error as e:
            raise AdapterError(f"{where}: pattern {key!r} is not a valid regex ({e})") from e
    return patterns.get(name, default)


def _same_model(a: str, b: str) -> bool:
    """Whether two model ids or paths name the same model (paths compared once resolved)."""
    if a.rstrip("/") == b.rstrip("/"):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
