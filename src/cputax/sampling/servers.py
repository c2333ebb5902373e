"""What cputax knows about each server type, as data: process titles, thread roles, and
the frame -> category rules (see `rules` for how a table is applied: innermost frame
first, then rules in order).

Sources: ../shared/notes/vllm.md (vLLM 0.10.2, 0.19.1, 0.33.0), the SGLang source
(process titles set with setproctitle, srt/ module layout), and `transformers serve`
5.24 with --continuous-batching, read from its source and checked on live stacks of
the embedded target. Check a path against the version you run before trusting a
category; extend a table rather than special-casing code.
"""

from __future__ import annotations

from dataclasses import dataclass

from cputax.sampling.rules import Rule


@dataclass(frozen=True)
class ServerTable:
    name: str
    # (role, regular expression searched in /proc/PID/cmdline with NULs as spaces). Match
    # the cmdline, not comm: setproctitle rewrites argv, and comm is cut to 15 characters.
    processes: tuple[tuple[str, str], ...]
    # (process role glob, thread name glob, what the thread does)
    threads: tuple[tuple[str, str, str], ...]
    rules: tuple[Rule, ...]
    # path globs only this server's code has: how `auto` recognises a stack file
    markers: tuple[str, ...]


# --- shared by every server: waits, GC, libraries every Python server uses ------------------
# Streaming responses: everything below Starlette's streaming body is SSE work, the socket
# writes through uvicorn included (they would otherwise count as http).
_STREAMING = ("starlette/*", "*StreamingResponse*")
COMMON_RULES = (
    # idle: the innermost Python frame is a known wait. A C call that blocks without a
    # Python wrapper (time.sleep) shows as its caller and is not idle.
    Rule("idle", "selectors.py", "*select", leaf=True),
    Rule("idle", "threading.py", "*wait*", leaf=True),  # Condition/Event.wait, join
    Rule("idle", "queue.py", "*get", leaf=True),
    Rule("idle", "concurrent/futures/thread.py", "_worker", leaf=True),  # pool thread, no work
    Rule("idle", "multiprocessing/connection.py", "*", leaf=True),
    Rule("idle", "zmq/sugar/poll.py", "*", leaf=True),
    Rule("idle", "zmq/sugar/socket.py", "Socket.recv*", leaf=True),  # blocked in the C recv
    Rule("idle", "zmq/asyncio.py", "*poll*", leaf=True),
    Rule("idle", "uvloop/*", "*", leaf=True),  # the uvloop loop is C: innermost = waiting
    Rule("idle", "asyncio/runners.py", "*", leaf=True),  # same for any C loop under asyncio.run
    # gc: only visible with --native (the collector runs inside whatever allocated)
    Rule("gc", "*", "gc_collect*"),
    Rule("gc", "*", "_PyGC_Collect*"),
    Rule("gc", "*gcmodule.c"),
    Rule("gc", "*gc.c", "*collect*"),
    Rule("gpu_wait", "torch/cuda/*", "*synchronize"),  # Stream/Event/device synchronize
    Rule("gpu_wait", "torch/cuda/*", "*.query"),
    # Hugging Face tokenizers and chat templates (every server here uses them)
    Rule("detokenize", "transformers/tokenization_utils*", "*decode*"),
    Rule("chat_template", "transformers/tokenization_utils*", "*apply_chat_template"),
    Rule("chat_template", "transformers/processing_utils.py", "*apply_chat_template"),
    Rule("chat_template", "transformers/utils/chat_template_utils.py"),
    Rule("chat_template", "jinja2/*"),
    Rule("tokenize", "transformers/tokenization_utils*"),
    Rule("tokenize", "tokenizers/*"),
    Rule("metrics", "prometheus_client/*"),
    Rule("metrics", "opentelemetry/*"),
    Rule("ipc", "zmq/*"),
    Rule("ipc", "msgspec/*"),
    Rule("sse", "uvicorn/*", within=_STREAMING),
    Rule("sse", "starlette/*", within=_STREAMING),
    Rule("sse", *_STREAMING),
    Rule("sse", "starlette/responses.py", "*stream_response*"),
    Rule("sse", "sse_starlette/*"),
    Rule("http", "uvicorn/*"),
    Rule("http", "starlette/*"),
    Rule("http", "fastapi/*"),
    Rule("http", "h11/*"),
    Rule("http", "httptools/*"),
)

# --- vLLM (V1 engine): ../shared/notes/vllm.md -----------------------------------------------
_V = "vllm/"
_GMR = _V + "v1/worker/gpu_model_runner.py"
_SHM = _V + "distributed/device_communicators/shm_broadcast.py"
_CORE = _V + "v1/engine/core.py"
VLLM = ServerTable(
    name="vllm",
    processes=(
        ("engine_core", r"^VLLM::EngineCore"),
        ("worker", r"^VLLM::Worker"),
        ("api_server", r"^VLLM::APIServer"),
        ("dp_coordinator", r"^VLLM::DPCoordinator"),
        ("api_server", r"(^|[\s/])vllm\s+serve(\s|$)|vllm\.entrypoints\.openai\.api_server"),
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
        # waits that mean the GPU is busy elsewhere, or that a worker has no work
        Rule("idle", _SHM, "*acquire_read*", within=(_V + "v1/executor/multiproc_executor.py", "*worker_busy_loop*")),
        Rule("gpu_wait", _SHM, "*acquire_read*"),
        Rule("gpu_wait", "threading.py", "*wait*", leaf=True, within=(_CORE, "EngineCore.step*")),
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
        Rule("model_execute", _V + "v1/executor/*"),
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
        Rule("ipc", _V + "v1/serial_utils.py"),
        Rule("ipc", _V + "v1/engine/core_client.py"),
        Rule("ipc", _CORE, "*process_input_sockets*"),
        Rule("ipc", _CORE, "*process_output_sockets*"),
        Rule("ipc", _SHM),
        Rule("detokenize", _V + "v1/engine/detokenizer.py"),
        Rule("detokenize", _V + "transformers_utils/detokenizer*"),
        Rule("output_process", _V + "v1/engine/output_processor.py"),
        Rule("output_process", _V + "v1/engine/async_llm.py", "*output_handler*"),
        Rule("preprocess", _V + "v1/engine/processor.py"),
        Rule("preprocess", _V + "v1/engine/input_processor.py"),
        Rule("preprocess", _V + "inputs/preprocess.py"),
        Rule("preprocess", _V + "v1/engine/async_llm.py", "*add_request*"),
        Rule("tokenize", _V + "utils/async_utils.py", "*AsyncMicrobatchTokenizer*"),
        Rule("tokenize", _V + "utils/async_utils.py", "*_batch_encode_loop*"),
        Rule("tokenize", _V + "utils/__init__.py", "*AsyncMicrobatchTokenizer*"),
        Rule("tokenize", _V + "utils/__init__.py", "*_batch_encode_loop*"),
        Rule("tokenize", _V + "renderers/base.py", "*tokenize*"),
        Rule("tokenize", _V + "entrypoints/*", "*._tokenize*"),
        Rule("tokenize", _V + "entrypoints/*", "*_normalize_prompt_text_to_input*"),
        Rule("chat_template", _V + "entrypoints/chat_utils.py", "*apply_hf_chat_template*"),
        Rule("chat_template", _V + "entrypoints/chat_utils.py", "*parse_chat_messages*"),
        Rule("chat_template", _V + "renderers/hf.py", "*render*"),
        Rule("sse", _V + "entrypoints/openai/serving_chat.py", "*stream_generator*"),
        Rule("sse", _V + "entrypoints/openai/serving_completion.py", "*stream_generator*"),
        Rule("sse", _V + "entrypoints/openai/chat_completion/serving.py", "*stream*"),
        Rule("sse", _V + "entrypoints/openai/tool_parsers/*"),
        Rule("sse", _V + "tool_parsers/*"),
        Rule("sse", _V + "reasoning/*"),
        Rule("metrics", _V + "v1/metrics/*"),
        Rule("metrics", _V + "engine/metrics*"),
        Rule("http", _V + "entrypoints/*"),  # route handlers, request validation
        Rule("schedule", _CORE),  # the busy loop's own glue between schedule, execute, update
    ),
    markers=(_V + "*",),
)

# --- SGLang (srt/) ---------------------------------------------------------------------------
_S = "sglang/srt/"
_SCHED = _S + "managers/scheduler.py"
_TOKM = _S + "managers/tokenizer_manager.py"
SGLANG = ServerTable(
    name="sglang",
    processes=(
        ("scheduler", r"^sglang::scheduler"),
        ("detokenizer", r"^sglang::detokenizer"),
        ("dp_controller", r"^sglang::data_parallel_controller"),
        ("tokenizer_worker", r"^sglang::tokenizer_worker"),
        ("server", r"^sglang::server|sglang\.launch_server|(^|[\s/])sglang\s+serve(\s|$)"),
    ),
    threads=(
        ("server", "MainThread", "event loop: HTTP, chat template, tokenize, SSE"),
        ("scheduler", "MainThread", "scheduler loop: schedule, run batch, process results"),
        ("scheduler", "*forward_thread*", "overlap forward thread"),
        ("detokenizer", "MainThread", "detokenizer loop"),
    ),
    rules=(
        Rule("gpu_wait", "threading.py", "*wait*", leaf=True,
             within=(_S + "managers/tp_worker_overlap_thread.py", "*resolve*")),
        Rule("gpu_wait", _S + "managers/overlap_utils.py", "*resolve*"),
        Rule("sample", _S + "layers/sampler.py"),
        Rule("sample", _S + "sampling/*"),
        Rule("sample", _S + "speculative/*"),
        Rule("kv_connector", _S + "disaggregation/*"),
        Rule("kv_connector", _S + "mem_cache/storage/*"),
        Rule("kv_connector", "lmcache/*"),
        Rule("model_execute", _S + "model_executor/*"),
        Rule("model_execute", _S + "models/*"),
        Rule("model_execute", _S + "layers/*"),
        Rule("model_execute", _S + "managers/tp_worker*.py"),
        Rule("model_execute", _SCHED, "*run_batch"),
        Rule("prefix_hash", _S + "mem_cache/*", "*hash*"),
        Rule("kv_cache", _S + "mem_cache/*"),
        Rule("schedule", _S + "managers/schedule_policy.py"),
        Rule("schedule", _S + "managers/schedule_batch.py"),
        Rule("schedule", _SCHED, "*get_next_batch_to_run*"),
        Rule("schedule", _SCHED, "*get_new_batch_prefill*"),
        Rule("schedule", _SCHED, "*update_running_batch*"),
        Rule("output_process", _S + "managers/scheduler_output_processor_mixin.py"),
        Rule("output_process", _SCHED, "*process_batch_result*"),
        Rule("output_process", _TOKM, "*handle_loop*"),
        Rule("output_process", _TOKM, "*_handle_batch_output*"),
        Rule("ipc", _SCHED, "*recv_requests*"),
        Rule("ipc", _S + "managers/io_struct.py"),
        Rule("preprocess", _SCHED, "*handle_generate_request*"),
        Rule("detokenize", _S + "managers/detokenizer_manager.py"),
        Rule("tokenize", _TOKM, "*._tokenize_one_request*"),
        Rule("tokenize", _TOKM, "*._tokenize_texts*"),
        Rule("tokenize", _TOKM, "*._batch_tokenize*"),
        Rule("tokenize", _S + "managers/async_dynamic_batch_tokenizer.py"),
        Rule("chat_template", _S + "entrypoints/openai/serving_chat.py", "*_apply_jinja_template*"),
        Rule("chat_template", _S + "entrypoints/openai/serving_chat.py", "*_process_messages*"),
        Rule("chat_template", _S + "entrypoints/openai/serving_chat.py", "*_apply_conversation_template*"),
        Rule("chat_template", _S + "conversation.py"),
        Rule("chat_template", _S + "jinja_template_utils.py"),
        Rule("sse", _S + "entrypoints/openai/serving_chat.py", "*_generate_chat_stream*"),
        Rule("sse", _S + "entrypoints/openai/serving_completions.py", "*_generate_completion_stream*"),
        Rule("sse", _S + "function_call/*"),
        Rule("sse", _S + "reasoning_parser.py"),
        Rule("metrics", _S + "metrics/*"),
        Rule("preprocess", _TOKM),  # request objects, validation, bookkeeping per request
        Rule("http", _S + "entrypoints/*"),
        Rule("schedule", _SCHED),  # the scheduler loop's own glue
    ),
    markers=("sglang/*",),
)

# --- transformers serve --continuous-batching (5.x) -----------------------------------------
_CB = "transformers/generation/continuous_batching/"
_SRV = "transformers/cli/serving/"
TRANSFORMERS = ServerTable(
    name="transformers",
    processes=(
        ("server", r"(^|[\s/])transformers(-cli)?\s+serve(\s|$)|transformers\.commands\.serving"),
    ),
    threads=(
        ("server", "MainThread", "event loop: HTTP, chat template, tokenize, SSE, detokenize"),
        ("server", "*_run_generation_loop*", "generation loop: schedule, forward, sample"),
        ("server", "AnyIO worker thread", "AnyIO worker"),
        ("server", "tqdm_monitor", "tqdm monitor"),
    ),
    rules=(
        # decoded on the event loop: the dispatcher calls the streamer for each output
        Rule("detokenize", _SRV + "utils.py", "*Streamer.put"),
        Rule("output_process", _SRV + "utils.py", "*_on_output"),
        Rule("output_process", _CB + "continuous_api.py", "OutputRouter*"),
        Rule("output_process", _CB + "continuous_api.py", "*register_result_handler*"),
        Rule("sample", _CB + "model_runner.py", "*_sample"),
        Rule("sample", _CB + "cb_logits_processors.py"),
        Rule("sample", "transformers/generation/logits_process.py"),
        Rule("prefix_hash", _CB + "cache_allocators/*", "*hash*"),
        Rule("kv_cache", _CB + "cache.py"),
        Rule("kv_cache", _CB + "cache_allocators/*"),
        Rule("kv_cache", _CB + "offloading_manager.py"),
        Rule("model_execute", _CB + "model_runner.py"),
        Rule("model_execute", _CB + "input_outputs.py"),  # batch tensors: vLLM's _prepare_inputs
        Rule("model_execute", _CB + "continuous_api.py", "*_generation_step"),
        Rule("model_execute", "transformers/models/*"),
        Rule("model_execute", "transformers/integrations/*"),
        Rule("model_execute", "transformers/modeling_*"),
        Rule("model_execute", "transformers/masking_utils.py"),
        Rule("schedule", _CB + "scheduler.py"),
        Rule("schedule", _CB + "continuous_api.py", "ContinuousBatchProcessor.*"),  # prepare_next_batch, update_batch
        Rule("schedule", _CB + "continuous_api.py", "*_generation_loop*"),
        Rule("preprocess", _CB + "continuous_api.py", "ContinuousBatchingManager.add_request*"),
        Rule("preprocess", _SRV + "utils.py", "*generate_streaming"),
        Rule("metrics", "transformers/utils/metrics.py"),
        Rule("sse", _SRV + "*", "*sse*"),  # sse_gen, _build_chunk_sse, chunk_to_sse
        Rule("http", _SRV + "*"),  # route handlers, validation, model manager
    ),
    markers=(_SRV + "*", _CB + "*"),
)

SERVERS = {t.name: t for t in (VLLM, SGLANG, TRANSFORMERS)}
SERVER_NAMES = tuple(SERVERS)


def rules_for(server: str) -> tuple[Rule, ...]:
    """The server's own rules first, then the shared ones."""
    return SERVERS[server].rules + COMMON_RULES
