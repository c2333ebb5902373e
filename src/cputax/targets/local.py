"""The embedded target: `transformers serve` on this CPU with a tiny random-weight Llama.

Why it exists: a real OpenAI-compatible server (FastAPI + uvicorn front end, chat
template, tokenization, continuous batching) that anyone can start without a GPU,
a download or a hub account, so `cputax run` has something honest to measure.

The model is written once into the user's cache (see `ensure_model`); the server
runs as a child process in its own process group (see `LocalServer`). Facts about
`transformers serve` that callers rely on are the data at the top of this module.
"""

from __future__ import annotations

import ctypes
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from types import TracebackType

from cputax.errors import CputaxError

# --- the model ------------------------------------------------------------------------------
# Bump MODEL_VERSION whenever anything below changes what is written: it names the cache folder.
MODEL_VERSION = "v1"
MODEL_SEED = 20240611
# Tiny on purpose: on a CPU the cost is the 129k-row embedding and LM head (132 MB in fp32
# together), not the two layers. fp32 runs 2-4x faster than bf16 on CPUs without AVX512-BF16
# (measured on a 2-core EPYC): 8k-token prefill ~0.5 s, one 32-sequence decode step ~25 ms.
MODEL_DIMS = {
    "vocab_size": 129280,  # the DeepSeek tokenizer's, added tokens included: every id is valid
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head_dim 32
    "num_key_value_heads": 2,
    "max_position_embeddings": 131072,  # RoPE: costs nothing until used
    "tie_word_embeddings": False,  # the LM head is edited (below) without touching the embeddings
}
MODEL_DTYPE = "float32"
BOS_TOKEN = "<｜begin▁of▁sentence｜>"  # id 0 in the DeepSeek vocabulary
EOS_TOKEN = "<｜end▁of▁sentence｜>"  # id 1
PAD_TOKEN = "<｜▁pad▁｜>"  # id 2

# --- the server -------------------------------------------------------------------------------
SERVE_COMMAND = "transformers"  # console script of the transformers package
# `transformers serve MODEL_DIR` (FORCE_MODEL) loads that local folder at start-up, never
# looks at the hub, lists it in /v1/models under exactly that string, and rejects requests
# naming any other model (400); requests may also leave "model" out.
SERVE_FLAGS = (
    "--continuous-batching",
    "--device", "cpu",
    "--dtype", MODEL_DTYPE,
    "--log-level", "warning",
)
# Continuous batching sizes itself from RAM on a CPU (60% of the NUMA node) and then fails
# its own footprint check on the first request, so fix both sizes. A block holds 256 tokens
# of every layer (256 KiB here): 1,100 blocks = 281,600 tokens = 32 prompts of 8k + output.
# On the CPU attention is dense SDPA with a [batch tokens x cached tokens] mask, whose
# buffer (max batch tokens x cache tokens x 4 B, 1.2 GB here) is the biggest allocation.
CB_FLAGS = (
    "--cb-num-blocks", "1100",
    "--cb-max-batch-tokens", "1024",
)
SERVE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
# What transformers serve 5.24 offers a measuring client (checked against its source and live).
SERVE_CAPABILITIES = {
    "metrics_path": None,  # no Prometheus /metrics
    "tokenize_path": None,  # no /tokenize: count with the same tokenizer.json
    "usage_in_stream": "final",  # usage rides on the finish_reason chunk, always; stream_options ignored
    "role_chunk": "at_headers",  # role-only chunk sent with the headers, before any token
    "extra_body_fields": False,  # unknown fields (ignore_eos, min_tokens) -> 422
}
HEALTH_PATH = "/health"
MODELS_PATH = "/v1/models"
CHAT_PATH = "/v1/chat/completions"
READY_TIMEOUT_S = 180.0
# The first request starts the continuous-batching worker (~3 s on 2 cores): done at start-up.
WARMUP_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0  # it exits ~2 s after SIGTERM when idle
LOG_TAIL_LINES = 25
INSTALL_HINT = "pip install torch==2.13.0 && pip install 'cputax[local]'"
LOCAL_MODULES = ("torch", "transformers", "fastapi", "uvicorn")
STALE_TEMP_S = 3600.0  # a model write takes seconds; older temp folders are leftovers


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/cputax, else ~/.cache/cputax."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cputax"


def model_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / f"tiny-llama-{MODEL_VERSION}"


def check_local_extra() -> str:
    """The `transformers` executable; a CputaxError naming the fix when the [local] extra is missing."""
    missing = [m for m in LOCAL_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise CputaxError(f"the embedded target needs {', '.join(missing)}: {INSTALL_HINT}")
    # Beside this interpreter first: a virtual environment need not be on PATH.
    beside = Path(sys.executable).parent / SERVE_COMMAND
    exe = str(beside) if os.access(beside, os.X_OK) else shutil.which(SERVE_COMMAND)
    if exe is None:
        raise CputaxError(f"the `{SERVE_COMMAND}` command is not installed: {INSTALL_HINT}")
    return exe


def ensure_model(cache_dir: Path | None = None) -> Path:
    """The model folder, written on first use (atomically: a temp folder renamed into place).

    Random weights make the output arbitrary, so two edits keep the stream
    predictable for a load generator:
    - generation_config.json has no eos_token_id (continuous batching then
      disables EOS) and greedy decoding: every request runs to max_tokens;
    - the LM head rows of special tokens and of tokens that do not decode to
      whole UTF-8 text on their own are zero. Greedy decoding takes the largest
      logit, which over ~126k random rows is always positive, so a zero row
      (logit 0) never wins: every generated token is one non-empty text chunk.
    """
    check_local_extra()
    target = model_dir(cache_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}-*"):  # left by a killed writer
        if time.time() - stale.stat().st_mtime > STALE_TEMP_S:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_model(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # else a concurrent writer won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_model(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    from cputax.text.conversation import chat_template
    from cputax.text.tokenizer import default_tokenizer_path

    tok_path = default_tokenizer_path()
    raw = Tokenizer.from_file(str(tok_path))
    if raw.get_vocab_size() > MODEL_DIMS["vocab_size"]:
        raise CputaxError(f"{tok_path} has {raw.get_vocab_size()} tokens, more than the model's vocabulary")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_path),
        bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=MODEL_DIMS["max_position_embeddings"], clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template()
    tokenizer.save_pretrained(folder)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    # Older loaders (and other servers pointed at this folder) read the template from here.
    config_file = folder / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config["chat_template"] = chat_template()
    config_file.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")

    ids = {name: raw.token_to_id(tok) for name, tok in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", PAD_TOKEN))}
    config = LlamaConfig(
        **MODEL_DIMS, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"], dtype=MODEL_DTYPE,
    )
    torch.manual_seed(MODEL_SEED)
    model = LlamaForCausalLM(config).to(getattr(torch, MODEL_DTYPE)).eval()
    with torch.no_grad():
        model.lm_head.weight[_unemittable_ids(raw, config.vocab_size)] = 0.0
    model.generation_config = GenerationConfig(bos_token_id=ids["bos"], pad_token_id=ids["pad"], do_sample=False)
    model.save_pretrained(folder, safe_serialization=True)


def _unemittable_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids the LM head must never pick: added/special tokens, ids past the tokenizer, and
    tokens that decode to nothing or to part of a UTF-8 character (they would stream no text)."""
    size = tokenizer.get_vocab_size()
    added = set(tokenizer.get_added_tokens_decoder())
    bad = added | set(range(size, vocab_size))
    for i in range(size):
        if i not in added:
            text = tokenizer.decode([i], skip_special_tokens=False)
            if not text or "\ufffd" in text:
                bad.add(i)
    return sorted(bad)


class LocalServer:
    """`transformers serve` on the CPU as a context manager: started, warmed up, stopped.

    `__enter__` returns once the model is loaded and one completion has run (the
    first request starts the batching worker); `__exit__` stops the whole process
    group. The server also gets SIGTERM if this process dies first (Linux).
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 log_path: Path | None = None, cache_dir: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self.cache_dir = cache_dir
        self.model = ""
        self.model_dir: Path | None = None
        self.startup_s = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False

    @property
    def endpoint(self) -> str:
        """Base URL without /v1, as `cputax run --endpoint` takes it."""
        return f"http://{_url_host(_client_host(self.host))}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> LocalServer:
        exe = check_local_extra()
        # A busy port must fail here: the health check would otherwise find the other server.
        if self.port is None:
            self.port = _free_port(self.host)
        elif not _port_is_free(self.host, self.port):
            raise CputaxError(f"port {self.port} on {self.host} is in use: stop what holds it or pick another port")
        self.model_dir = ensure_model(self.cache_dir)
        if self.log_path is None:
            self.log_path = (self.cache_dir or default_cache_dir()) / "logs" / f"transformers-serve-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [exe, "serve", str(self.model_dir), *SERVE_FLAGS, *CB_FLAGS, "--host", self.host, "--port", str(self.port)]
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **SERVE_ENV}, start_new_session=True, preexec_fn=die_with_parent,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after STOP_GRACE_S; idempotent."""
        proc = self._proc
        if proc is None or self._stopped:
            return
        for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # start_new_session: the group id is the server's pid
            except ProcessLookupError:
                break  # the whole group is gone
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(proc.pid):
                break
        proc.wait()
        self._stopped = True  # the pid may be reused from now on: never signal it again

    def wait(self) -> int:
        """Block until the server exits; its exit status."""
        if self._proc is None:
            raise CputaxError("the local server was not started")
        return self._proc.wait()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        with open(self.log_path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))

    def _fail(self, what: str) -> CputaxError:
        return CputaxError(f"transformers serve {what} (log {self.log_path}); last lines:\n{self.log_tail()}")

    def _request(self, method: str, path: str, body: dict | None = None,
                 timeout: float = 5.0) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(_client_host(self.host), self.port, timeout=timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=payload, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(data or b"{}")
        except ValueError:
            return resp.status, {"raw": data.decode(errors="replace")}

    def _wait_ready(self) -> None:
        """Health first (the model loads before uvicorn listens), then one tiny completion."""
        assert self._proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                raise self._fail(f"exited with status {self._proc.returncode} while starting")
            try:
                if self._request("GET", HEALTH_PATH, timeout=2.0)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise self._fail(f"did not answer {HEALTH_PATH} within {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        status, models = self._request("GET", MODELS_PATH)
        names = [m.get("id") for m in models.get("data", [])] if status == 200 else []
        if not names:
            raise self._fail(f"listed no model at {MODELS_PATH} (HTTP {status})")
        self.model = names[0]
        probe = {"model": self.model, "messages": [{"role": "user", "content": "Ready?"}], "max_tokens": 2}
        try:
            status, answer = self._request("POST", CHAT_PATH, probe, timeout=WARMUP_TIMEOUT_S)
        except OSError as exc:
            raise self._fail(f"did not answer its first completion ({exc})") from exc
        if status != 200 or answer.get("usage", {}).get("completion_tokens") != 2:
            raise self._fail(f"failed its first completion (HTTP {status}: {json.dumps(answer)[:300]})")


def serve_local(host: str, port: int) -> int:
    """`cputax serve-local`: run the embedded target in the foreground until Ctrl-C."""
    server = LocalServer(host=host, port=port)
    if not (model_dir() / "config.json").is_file():
        print(f"cputax serve-local: writing the tiny model once to {model_dir()}", file=sys.stderr, flush=True)
    print(f"cputax serve-local: starting transformers serve on {host}:{port} (CPU, tiny random Llama)...",
          file=sys.stderr, flush=True)
    with server:
        print(f"endpoint {server.endpoint}\nmodel    {server.model}\nlog      {server.log_path}\n"
              f"ready in {server.startup_s:.1f} s; Ctrl-C stops it", flush=True)
        try:
            status = server.wait()
        except KeyboardInterrupt:
            print("cputax serve-local: stopping", file=sys.stderr, flush=True)
            return 0
        raise server._fail(f"exited by itself with status {status}")


def _client_host(host: str) -> str:
    """Where a client on this machine connects for a server bound to `host`."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bind_probe(host: str, port: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, port))
        return s.getsockname()[1]


def _free_port(host: str) -> int:
    return _bind_probe(host, 0)


def _port_is_free(host: str, port: int) -> bool:
    try:
        _bind_probe(host, port)
    except OSError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Loaded here, not in the forked child, where taking the loader's lock could deadlock.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In the child before exec: `sig` when the parent dies (Linux prctl PR_SET_PDEATHSIG).

    Covers a parent killed with SIGKILL, where __exit__ never runs. The "parent" is the
    thread that started the child, so start it from a thread that outlives it.
    """
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, sig)
