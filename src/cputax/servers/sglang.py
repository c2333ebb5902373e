"""SGLang (srt/): process titles set with setproctitle, the module layout, metric names.

Read from the SGLang source; not yet checked against a live server.
"""

from __future__ import annotations

from cputax.servers.base import MetricNames, Rule, ServerTable

# --- SGLang (srt/) ---------------------------------------------------------------------------
_S = "sglang/srt/"
_SCHED = _S + "managers/scheduler.py"
_TOKM = _S + "managers/tokenizer_manager.py"
TABLE = ServerTable(
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
        Rule(
            "gpu_wait",
            "threading.py",
            "*wait*",
            leaf=True,
            within=(_S + "managers/tp_worker_overlap_thread.py", "*resolve*"),
        ),
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
        Rule(
            "chat_template",
            _S + "entrypoints/openai/serving_chat.py",
            "*_apply_conversation_template*",
        ),
        Rule("chat_template", _S + "conversation.py"),
        Rule("chat_template", _S + "jinja_template_utils.py"),
        Rule("sse", _S + "entrypoints/openai/serving_chat.py", "*_generate_chat_stream*"),
        Rule(
            "sse", _S + "entrypoints/openai/serving_completions.py", "*_generate_completion_stream*"
        ),
        Rule("sse", _S + "function_call/*"),
        Rule("sse", _S + "reasoning_parser.py"),
        Rule("metrics", _S + "metrics/*"),
        Rule("preprocess", _TOKM),  # request objects, validation, bookkeeping per request
        Rule("http", _S + "entrypoints/*"),
        Rule("schedule", _SCHED),  # the scheduler loop's own glue
    ),
    markers=("sglang/*",),
    metrics=MetricNames(
        histograms={
            "queue": ("sglang:queue_time_seconds",),
            "ttft": ("sglang:time_to_first_token_seconds",),
            "e2e": ("sglang:e2e_request_latency_seconds",),
        },
        counters={
            "prompt_tokens": ("sglang:prompt_tokens_total",),
            "generation_tokens": ("sglang:generation_tokens_total",),
        },
        gauges={
            "running": ("sglang:num_running_reqs",),
            "waiting": ("sglang:num_queue_reqs",),
        },
    ),
)
