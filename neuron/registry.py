"""The models on this host: their states, their placement on devices, loading and unloading.

A model is keyed by its id. Loads are single flight (concurrent loads of one id await the
same task), placement picks the device with the most room for the weights in the dtype they
will be loaded in, and unload waits for the model's in-flight requests, then frees its memory
for real on the device's own thread (on CUDA, emptying the caching allocator and checking
the driver's free memory).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from helexa.modelspec import ModelSpec
from neuron import metrics
from neuron.config import EngineConfig, NeuronConfig
from neuron.devices import Device, cpu_has_fast_bf16, cuda_free_bytes, discover
from neuron.engine import DeviceWorker, ModelEngine
from neuron.engine.blocks import pool_blocks
from neuron.errors import LoadFailed, ModelNotFound, NeuronError, NoRoom, ShuttingDown, SpecConflict
from neuron.loadpolicy import check_source
from neuron.loadprogress import LOADING_WEIGHTS, WARMING_UP, LoadProgress
from neuron.model.forward import (
    ARCHITECTURES,
    BLOCK,
    Forward,
    kv_elements_per_token,
    served_context,
)
from neuron.model.quant import load_int4, load_int8
from neuron.sources import parameter_bytes, resolve

log = logging.getLogger(__name__)

LOADING, READY, UNLOADING, FAILED = "LOADING", "READY", "UNLOADING", "FAILED"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(eq=False)
class HeldModel:
    """One model id on this host and where it stands."""

    spec: ModelSpec
    state: str = LOADING
    error: str = ""
    device: str = ""
    resident_bytes: int = 0
    # Reserved for the KV cache of a full batch at the model's context (see Registry._place).
    kv_bytes: int = 0
    loaded_at: float = 0.0
    engine: ModelEngine | None = None
    loading: asyncio.Future[None] | None = None
    unloading: asyncio.Future[int] | None = None
    failed_at: float = 0.0  # time.monotonic() when it became FAILED
    progress: LoadProgress = field(init=False)

    def __post_init__(self) -> None:
        self.progress = LoadProgress(self.spec.id)

    @property
    def last_used(self) -> float:
        return self.engine.last_used if self.engine is not None else 0.0


class Registry:
    """Every model this neuron holds, and the device workers that run them."""

    def __init__(self, config: NeuronConfig) -> None:
        self.config = config
        self.cache_dir = Path(config.cache_dir)
        self.devices = discover(config.devices)
        if not self.devices:
            raise NeuronError(f"no usable device among devices.use = {config.devices.use}")
        self.models: dict[str, HeldModel] = {}
        self.draining = False
        self._workers = {
            d.name: DeviceWorker(torch.device(d.name), config.devices.cpu_threads)
            for d in self.devices
        }
        for device in self.devices:
            metrics.DEVICE_TOTAL_BYTES.labels(device=device.name).set(device.total_bytes)

    # ---- queries ----

    def listed(self) -> list[HeldModel]:
        """Every model held, less FAILED ones older than ``loading.failed_ttl`` (forgotten)."""
        self._forget_failed()
        return list(self.models.values())

    def free_bytes(self, device: Device) -> int:
        """Memory still free for model weights on ``device``."""
        held = sum(
            m.resident_bytes + m.kv_bytes
            for m in self.models.values()
            if m.device == device.name and m.state != FAILED
        )
        if device.kind == "cpu":
            return max(0, device.total_bytes - held)
        budget = device.total_bytes - self.config.devices.cuda_memory_reserve - held
        driver = cuda_free_bytes(device.index) - self.config.devices.cuda_memory_reserve
        return max(0, min(budget, driver))

    async def engine_for(self, model_id: str) -> ModelEngine:
        """The engine of a READY model, waiting for it if it is loading."""
        held = self.models.get(model_id)
        if held is not None and held.state == LOADING and held.loading is not None:
            await asyncio.shield(held.loading)
        if held is None or held.state != READY or held.engine is None:
            state = "not loaded" if held is None else held.state.lower()
            raise ModelNotFound(f"model {model_id!r} is {state} on this neuron")
        return held.engine

    # ---- load ----

    async def load(self, spec: ModelSpec) -> tuple[HeldModel, bool]:
        """Load ``spec`` (single flight); returns the model and whether it was already READY.

        ``spec`` comes checked: by ``ModelSpec.from_proto`` or by the config loader; here its
        source is checked against what the config allows (``loadpolicy``).
        """
        hf_repos = self.config.loading.hf_repos
        await asyncio.to_thread(check_source, spec, self.config.local_dirs, hf_repos, "spec")
        self._forget_failed()
        while True:
            held = self.models.get(spec.id)
            if held is None or held.state == FAILED:
                break
            if not held.spec.same_source(spec):
                raise SpecConflict(
                    f"model {spec.id!r} is held from {held.spec.describe()} "
                    f"({held.spec.dtype}); unload it before loading {spec.describe()}"
                )
            if held.state == READY:
                return held, True
            if held.state == LOADING and held.loading is not None:
                await asyncio.shield(held.loading)
                return held, False
            if held.state == UNLOADING and held.unloading is not None:
                await asyncio.shield(held.unloading)
        if self.draining:
            raise ShuttingDown("the neuron is shutting down and loads nothing new")
        held = HeldModel(spec)
        self.models[spec.id] = held
        held.loading = asyncio.ensure_future(self._load(held))
        await asyncio.shield(held.loading)
        return held, False

    async def _load(self, held: HeldModel) -> None:
        spec = held.spec
        started = time.monotonic()
        metrics.MODELS_LOADING.inc()
        try:
            room = [self.free_bytes(d) for d in self.devices if _matches(spec.device, d)]
            model_dir = await asyncio.to_thread(
                resolve, spec, self.cache_dir, max(room) if room else None, held.progress
            )
            config = await asyncio.to_thread(_model_config, model_dir)
            max_context = served_context(config)
            if spec.max_context:
                max_context = min(max_context, spec.max_context)
            max_batch_size = min(
                spec.max_batch_size or self.config.engine.max_batch_size,
                self.config.engine.max_batch_size,
            )
            device, dtype, weights, kv = self._place(
                spec,
                model_dir,
                kv_elements_per_token(config)
                * BLOCK
                * pool_blocks(self.config.engine.kv_cache_tokens, max_batch_size, max_context),
            )
            held.device, held.resident_bytes = device.name, weights  # reserved while loading
            held.kv_bytes = kv
            held.progress.begin(LOADING_WEIGHTS)
            model, forward, tokenizer = await asyncio.to_thread(
                _load_weights, model_dir, dtype, device
            )
            held.resident_bytes = forward.resident_bytes()
            held.progress.begin(WARMING_UP)
            engine = await asyncio.to_thread(
                ModelEngine,
                spec.id,
                model,
                forward,
                tokenizer,
                torch.device(device.name),
                max_batch_size=max_batch_size,
                max_context=max_context,
                prefix_cache=self.config.engine.prefix_cache,
                kv_cache_tokens=self.config.engine.kv_cache_tokens,
                batch_window=self.config.engine.batch_window,
                speculative_tokens=_speculative_tokens(spec, self.config.engine),
                speculative_max_rows=self.config.engine.speculative_max_rows,
                max_waiting=min(
                    spec.max_waiting or self.config.engine.max_waiting,
                    self.config.engine.max_waiting,
                ),
            )
            self._workers[device.name].attach(engine)
            held.engine, held.state, held.loaded_at = engine, READY, time.time()
        except Exception as e:
            held.state, held.resident_bytes, held.failed_at = FAILED, 0, time.monotonic()
            held.kv_bytes = 0
            held.error = str(e) if isinstance(e, NeuronError) else f"{type(e).__name__}: {e}"
            metrics.LOADS.labels(model=spec.id, result="failed").inc()
            log.warning(
                "model load failed model=%s source=%s seconds=%.2f error=%s",
                spec.id, spec.describe(), time.monotonic() - started, held.error,
            )  # fmt: skip
            if isinstance(e, NeuronError):
                raise
            raise LoadFailed(held.error) from e
        finally:
            metrics.MODELS_LOADING.dec()
        seconds = time.monotonic() - started
        metrics.LOADS.labels(model=spec.id, result="loaded").inc()
        metrics.LOAD_SECONDS.labels(model=spec.id).observe(seconds)
        metrics.RESIDENT_BYTES.labels(model=spec.id, device=held.device).set(held.resident_bytes)
        self._update_device_gauges()
        log.info(
            "model loaded model=%s device=%s dtype=%s bytes=%d kv_cache_bytes=%d seconds=%.2f",
            spec.id, held.device, dtype, held.resident_bytes, held.kv_bytes, seconds,
        )  # fmt: skip

    def _place(
        self, spec: ModelSpec, model_dir: Path, kv_elements: int
    ) -> tuple[Device, torch.dtype, int, int]:
        """The device with the most room, the dtype, and the bytes the weights and the KV
        cache need there. ``kv_elements``: what the model's paged KV cache holds (it is
        allocated whole at load, as its blocks are handed out from it)."""
        candidates = [d for d in self.devices if _matches(spec.device, d)]
        if not candidates:
            names = ", ".join(d.name for d in self.devices)
            raise NoRoom(f"device {spec.device!r} is not among this neuron's devices ({names})")
        options = []
        needs = []
        for device in candidates:
            dtype = _choose_dtype(spec.dtype, device)
            element = torch.empty(0, dtype=dtype).element_size()
            weights = parameter_bytes(model_dir, element)
            kv = kv_elements * element
            free = self.free_bytes(device)
            needs.append(f"{device.name} needs {weights} for the weights and {kv} for the KV "
                         f"cache, has {free} free")  # fmt: skip
            if weights + kv <= free:
                # CUDA before CPU, then the most free memory, then the lowest index.
                options.append(
                    (device.kind != "cuda", -free, device.index, device, dtype, weights, kv)
                )
        if not options:
            raise NoRoom(
                f"model {spec.id!r} does not fit: {'; '.join(needs)} (the KV cache is "
                "engine.kv_cache_tokens, or max_batch_size x max_context tokens)"
            )
        best = min(options, key=lambda o: o[:3])
        return best[3], best[4], best[5], best[6]

    # ---- unload ----

    async def unload(self, model_id: str) -> tuple[bool, int]:
        """Unload ``model_id`` once its in-flight requests end; returns (was_loaded, freed)."""
        held = self.models.get(model_id)
        if held is None:
            return False, 0
        if held.state == LOADING and held.loading is not None:
            try:
                await asyncio.shield(held.loading)
            except NeuronError:
                pass
        if held.state == FAILED:
            self.models.pop(model_id, None)
            return False, 0
        if held.state == UNLOADING and held.unloading is not None:
            await asyncio.shield(held.unloading)
            return True, 0
        held.state = UNLOADING
        held.unloading = asyncio.ensure_future(self._unload(held))
        return True, await asyncio.shield(held.unloading)

    async def _unload(self, held: HeldModel) -> int:
        started = time.monotonic()
        engine = held.engine
        freed = 0
        try:
            if engine is not None:
                await asyncio.to_thread(engine.wait_idle)
                worker = self._workers[held.device]
                worker.detach(engine)
                held.engine = None
                freed = await asyncio.wrap_future(worker.call(lambda: _release(engine)))
        finally:
            self.models.pop(held.spec.id, None)
            _forget_resident_gauge(held)
            metrics.UNLOADS.labels(model=held.spec.id).inc()
            self._update_device_gauges()
        log.info(
            "model unloaded model=%s device=%s bytes=%d freed_bytes=%d seconds=%.2f",
            held.spec.id, held.device, held.resident_bytes, freed, time.monotonic() - started,
        )  # fmt: skip
        return freed or held.resident_bytes

    async def unload_all(self) -> None:
        """Unload every model; a failure is logged and the sweep goes on."""
        for model_id in list(self.models):
            try:
                await self.unload(model_id)
            except Exception:
                log.exception("unload failed model=%s", model_id)

    def abort_all(self) -> None:
        """End every unfinished request with finish reason ``cancelled``."""
        for held in self.models.values():
            if held.engine is not None:
                held.engine.abort_all()

    def _forget_failed(self) -> None:
        expired = time.monotonic() - self.config.loading.failed_ttl
        for model_id, held in list(self.models.items()):
            if held.state == FAILED and held.failed_at <= expired:
                del self.models[model_id]

    def close(self) -> None:
        for worker in self._workers.values():
            worker.stop()

    def _update_device_gauges(self) -> None:
        for device in self.devices:
            metrics.DEVICE_FREE_BYTES.labels(device=device.name).set(self.free_bytes(device))


def _speculative_tokens(spec: ModelSpec, engine: EngineConfig) -> int:
    """Draft tokens per row and step for ``spec``'s model: 0 where speculation is off."""
    if (spec.speculative or engine.speculative) != "prompt_lookup":
        return 0
    return spec.speculative_tokens or engine.speculative_tokens


def _matches(wanted: str, device: Device) -> bool:
    return wanted in ("auto", device.kind, device.name)


def _choose_dtype(wanted: str, device: Device) -> torch.dtype:
    if wanted != "auto":
        return _DTYPES[wanted]
    if device.kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def _model_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def _load_weights(model_dir: Path, dtype: torch.dtype, device: Device) -> tuple[Any, Forward, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(model_dir))
    architecture = (getattr(config, "architectures", None) or ["unknown"])[0]
    if architecture not in ARCHITECTURES:
        raise LoadFailed(
            f"{model_dir}: architecture {architecture} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, device_map=device.name
    )
    model.eval()
    # 4-bit codes serve a CPU's decode steps (the forward picks how: neuron.model.forward).
    on_cpu = torch.device(device.name).type == "cpu"
    head8 = load_int8(model_dir).get("lm_head") if on_cpu else None
    forward = Forward(model, load_int4(model_dir) if on_cpu else {}, on_cpu, head8=head8)
    log.info(
        "model weights arranged dir=%s architecture=%s int4_projections=%d decode=%s head=%s",
        model_dir, architecture, forward.int4_layers(), forward.decode_path(),
        "8-bit" if forward.kernel is not None and head8 is not None else "dense",
    )  # fmt: skip
    return model, forward, tokenizer


def _forget_resident_gauge(held: HeldModel) -> None:
    try:
        metrics.RESIDENT_BYTES.remove(held.spec.id, held.device)
    except KeyError:
        pass


def _release(engine: ModelEngine) -> int:
    """Drop the model's tensors on its device thread; returns the bytes the driver got back."""
    device = engine.device
    before = cuda_free_bytes(device.index or 0) if device.type == "cuda" else 0
    engine.release()
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return max(0, cuda_free_bytes(device.index or 0) - before)
