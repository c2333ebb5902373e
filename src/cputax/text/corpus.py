"""Agent-shaped text sized to an exact token count.

Coding agents send source code, tool results (file listings, grep hits, test logs,
stack traces, JSON, diffs) and prose instructions, not "Analyze this code..."
repeated (the study's prompt, which also made its "100k" prompt 58k tokens). Every
piece here is generated from a seeded RNG with fresh identifiers and values, so no
phrase is repeated to pad length and the same seed gives the same text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from cputax.errors import CputaxError
from cputax.text.tokenizer import LoadedTokenizer

__all__ = ["TextGen", "make_corpus", "pieces"]

VERBS = (
    "load parse build fetch resolve update merge flush render encode decode apply "
    "validate compute schedule allocate release attach detach normalize collect "
    "register dispatch compact rotate verify emit index scan split drain retry "
    "serialize hydrate prune stage commit rollback reconcile throttle batch"
).split()
NOUNS = (
    "config request response token block cache prefix session buffer header payload "
    "manifest schema record metric span chunk frame worker queue scheduler tensor "
    "shard replica lease snapshot segment cursor offset router handler client server "
    "context prompt template adapter policy budget window ledger registry journal"
).split()
ADJECTIVES = (
    "stale pending active cached remote local partial dirty shared pinned sparse "
    "dense async blocking ordered lazy eager primary fallback transient durable"
).split()
TYPES_PY = ("int", "str", "bytes", "float", "bool", "list[int]", "dict[str, Any]", "Path")
TYPES_RS = ("u32", "u64", "usize", "i64", "String", "&str", "Vec<u8>", "Option<u64>", "bool")
TYPES_GO = ("int", "int64", "string", "[]byte", "bool", "error", "time.Duration", "uint32")
TYPES_TS = ("number", "string", "boolean", "Uint8Array", "Record<string, number>", "Date")
DIRS = ("src", "lib", "pkg", "internal", "cmd", "tests", "docs", "scripts", "api", "core")
EXTS = (".py", ".rs", ".go", ".ts", ".c", ".h", ".toml", ".json", ".md", ".yaml")
EXCEPTIONS = ("ValueError", "KeyError", "TimeoutError", "RuntimeError", "TypeError", "OSError")
PROSE_OPENERS = (
    "Before changing anything, read",
    "Make sure you understand",
    "Please look at",
    "The bug report says there is a problem with",
    "We need to refactor",
    "Add a regression test for",
    "Explain why",
    "Find every caller of",
    "Do not modify the public API of",
    "Keep the behaviour of",
    "Profile",
    "Write a short summary of",
    "Check whether",
    "Split",
    "Rename",
)
PROSE_TAILS = (
    "and report what you find before editing.",
    "without breaking the existing tests.",
    "so that the error message names the offending field.",
    "and keep the diff small.",
    "then run the test suite and paste the failures.",
    "and explain the trade-off.",
    "using the existing helper instead of a new one.",
    "before the next release.",
    "and note any behaviour that looks accidental.",
    "so it no longer blocks the event loop.",
)


class TextGen:
    """One seeded generator; every method returns a fresh, unique piece of text."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.counter = 0

    # --- names -------------------------------------------------------------
    def ident(self, style: str = "snake") -> str:
        r = self.r
        words = [r.choice(VERBS), r.choice(ADJECTIVES), r.choice(NOUNS)]
        if r.random() < 0.5:
            words.pop(1)
        if style == "camel":
            return words[0] + "".join(w.title() for w in words[1:])
        if style == "pascal":
            return "".join(w.title() for w in words[1:]) + r.choice(("", "Impl", "State", "Error"))
        return "_".join(words)

    def path(self) -> str:
        r = self.r
        parts = [r.choice(DIRS)] + [r.choice(NOUNS) for _ in range(r.randint(0, 2))]
        return "/".join(parts) + "/" + self.ident() + r.choice(EXTS)

    def num(self, hi: int = 10_000) -> int:
        return self.r.randint(0, hi)

    # --- source code -------------------------------------------------------
    def expr(self) -> str:
        r = self.r
        a, b = self.ident(), self.ident()
        return r.choice(
            (
                f"{a}({b}, {self.num(64)})",
                f"{a}.{r.choice(VERBS)}({b})",
                f"{a} + {self.num(4096)}",
                f"len({a}) - {self.num(16)}",
                f"{a}[{self.num(32)}:{self.num(512)}]",
                f'"{r.choice(NOUNS)}-{self.num(999)}"',
            )
        )

    def python(self) -> str:
        r = self.r
        name, arg1, arg2 = self.ident(), self.ident(), self.ident()
        lines = [
            f"def {name}({arg1}: {r.choice(TYPES_PY)}, {arg2}: {r.choice(TYPES_PY)} = None):",
            f'    """{r.choice(VERBS).title()} the {r.choice(ADJECTIVES)} '
            f'{r.choice(NOUNS)} for {arg1}."""',
        ]
        for _ in range(r.randint(3, 9)):
            kind = r.random()
            var = self.ident()
            if kind < 0.4:
                lines.append(f"    {var} = {self.expr()}")
            elif kind < 0.6:
                lines.append(f"    if {var} is None or {var} > {self.num(1000)}:")
                lines.append(
                    f'        raise {r.choice(EXCEPTIONS)}(f"{r.choice(NOUNS)} '
                    f'{{{var}!r}} is {r.choice(ADJECTIVES)}")'
                )
            elif kind < 0.8:
                lines.append(f"    for {var} in {self.expr()}:")
                lines.append(f"        {self.ident()}.append({var})")
            else:
                lines.append(
                    f'    logger.debug("{r.choice(VERBS)} %s took %.3f ms", {var}, '
                    f"{self.num(90)}.{self.num(999)})"
                )
        lines.append(f"    return {self.expr()}")
        return "\n".join(lines)

    def rust(self) -> str:
        r = self.r
        name, ty = self.ident(), self.ident("pascal")
        lines = [
            f"pub fn {name}(&mut self, {self.ident()}: {r.choice(TYPES_RS)}) "
            f"-> Result<{r.choice(TYPES_RS)}, {ty}> {{"
        ]
        for _ in range(r.randint(3, 8)):
            var = self.ident()
            lines.append(
                r.choice(
                    (
                        f"    let {var} = self.{self.ident()}.get({self.num(128)})"
                        f".ok_or({ty}::Missing)?;",
                        f"    if {var}.len() > {self.num(4096)} "
                        f"{{ return Err({ty}::TooLarge({var}.len())); }}",
                        f"    self.{self.ident()}.insert({var}.clone(), {self.num(65535)});",
                        f"    for {var} in self.{self.ident()}.iter().take({self.num(64)}) "
                        f"{{ {self.ident()}.push(*{var}); }}",
                        f"    tracing::debug!({self.ident()} = {self.num(999)}, "
                        f'"{r.choice(VERBS)} {r.choice(NOUNS)}");',
                    )
                )
            )
        lines.append(f"    Ok({self.ident()})")
        lines.append("}")
        return "\n".join(lines)

    def go(self) -> str:
        r = self.r
        recv, name = self.ident("pascal"), self.ident("pascal")
        lines = [
            f"func (s *{recv}) {name}(ctx context.Context, "
            f"{self.ident('camel')} {r.choice(TYPES_GO)}) "
            f"({r.choice(TYPES_GO)}, error) {{"
        ]
        for _ in range(r.randint(3, 8)):
            var = self.ident("camel")
            lines.append(
                r.choice(
                    (
                        f"\t{var}, err := "
                        f"s.{self.ident('camel')}.{self.ident('pascal')}(ctx, {self.num(512)})",
                        f"\tif err != nil {{\n\t\treturn nil, "
                        f'fmt.Errorf("{r.choice(VERBS)} {r.choice(NOUNS)} %d: %w", '
                        f"{self.num(99)}, err)\n\t}}",
                        f"\ts.{self.ident('camel')}[{var}] = "
                        f"append(s.{self.ident('camel')}[{var}], {self.num(4096)})",
                        f"\tdefer s.{self.ident('camel')}.Unlock()",
                    )
                )
            )
        lines.append(f"\treturn {self.ident('camel')}, nil")
        lines.append("}")
        return "\n".join(lines)

    def typescript(self) -> str:
        r = self.r
        name = self.ident("camel")
        lines = [
            f"export async function {name}({self.ident('camel')}: {r.choice(TYPES_TS)}): "
            f"Promise<{r.choice(TYPES_TS)}> {{"
        ]
        for _ in range(r.randint(3, 8)):
            var = self.ident("camel")
            lines.append(
                r.choice(
                    (
                        f"  const {var} = await "
                        f"this.{self.ident('camel')}.{r.choice(VERBS)}({self.num(256)});",
                        f"  if (!{var}) throw "
                        f"new Error(`{r.choice(NOUNS)} ${{{var}}} is {r.choice(ADJECTIVES)}`);",
                        f"  {self.ident('camel')}.set({var}, "
                        f"{{ {r.choice(NOUNS)}: {self.num(999)}, "
                        f'{r.choice(NOUNS)}: "{self.ident()}" }});',
                    )
                )
            )
        lines.append(f"  return {self.ident('camel')};")
        lines.append("}")
        return "\n".join(lines)

    def c(self) -> str:
        r = self.r
        name = self.ident()
        lines = [
            f"static int {name}(struct {self.ident()} *{self.ident()}, size_t {self.ident()})",
            "{",
        ]
        for _ in range(r.randint(3, 8)):
            var = self.ident()
            lines.append(
                r.choice(
                    (
                        f"\tuint32_t {var} = {self.ident()}[{self.num(255)}] "
                        f">> {r.randint(1, 24)};",
                        f"\tif ({var} < 0 || {var} >= {self.num(4096)})\n\t\t"
                        f"return -E{r.choice(('INVAL', 'NOMEM', 'AGAIN', 'IO'))};",
                        f"\tmemcpy({var}, {self.ident()} + {self.num(64)}, "
                        f"sizeof(*{var}) * {self.num(16)});",
                    )
                )
            )
        lines += ["\treturn 0;", "}"]
        return "\n".join(lines)

    # --- tool results ------------------------------------------------------
    def listing(self) -> str:
        r = self.r
        rows = [f"$ ls -la {r.choice(DIRS)}/{r.choice(NOUNS)}", f"total {self.num(900)}"]
        for _ in range(r.randint(5, 14)):
            rows.append(
                f"-rw-r--r-- 1 dev dev {self.num(90000):>6} "
                f"{r.choice(('Jan', 'Mar', 'Jun', 'Sep', 'Nov'))} "
                f"{r.randint(1, 28):>2} {r.randint(0, 23):02d}:{r.randint(0, 59):02d} "
                f"{self.ident()}{r.choice(EXTS)}"
            )
        return "\n".join(rows)

    def grep(self) -> str:
        r = self.r
        needle = self.ident()
        rows = [f"$ rg -n '{needle}'"]
        for _ in range(r.randint(4, 12)):
            rows.append(f"{self.path()}:{self.num(2000)}:    {needle} = {self.expr()}")
        return "\n".join(rows)

    def test_log(self) -> str:
        r = self.r
        rows = [f"$ pytest tests/test_{self.ident()}.py -q"]
        for _ in range(r.randint(5, 14)):
            status = r.choices(("PASSED", "FAILED", "SKIPPED"), (8, 2, 1))[0]
            rows.append(
                f"tests/test_{self.ident()}.py::test_{self.ident()}"
                f"[{r.choice(NOUNS)}-{self.num(64)}] "
                f"{status} [{self.num(100):>3}%]"
            )
        rows.append(
            f"===== {self.num(40)} failed, {self.num(400)} passed "
            f"in {self.num(90)}.{self.num(99):02d}s ====="
        )
        return "\n".join(rows)

    def traceback(self) -> str:
        r = self.r
        rows = ["Traceback (most recent call last):"]
        for _ in range(r.randint(3, 7)):
            rows.append(
                f'  File "/srv/app/{self.path()}", line {self.num(1500)}, in {self.ident()}'
            )
            rows.append(f"    {self.ident()} = {self.expr()}")
        rows.append(
            f"{r.choice(EXCEPTIONS)}: {r.choice(ADJECTIVES)} {r.choice(NOUNS)} "
            f"{self.num(99999)} not found in {self.ident()}"
        )
        return "\n".join(rows)

    def json_blob(self) -> str:
        r = self.r
        items = []
        for _ in range(r.randint(3, 8)):
            items.append(
                f'    {{"id": "{self.ident()}-{self.num(99999)}", '
                f'"{r.choice(NOUNS)}": {self.num(100000)}, '
                f'"status": "{r.choice(ADJECTIVES)}", "path": "{self.path()}"}}'
            )
        return (
            '{\n  "'
            + r.choice(NOUNS)
            + 's": [\n'
            + ",\n".join(items)
            + f'\n  ],\n  "next_cursor": "{self.num(10**9)}"\n}}'
        )

    def diff(self) -> str:
        r = self.r
        p = self.path()
        start = self.num(800)
        rows = [
            f"diff --git a/{p} b/{p}",
            f"--- a/{p}",
            f"+++ b/{p}",
            f"@@ -{start},{r.randint(4, 9)} +{start},{r.randint(4, 9)} @@ def {self.ident()}(",
        ]
        for _ in range(r.randint(4, 10)):
            rows.append(r.choice((" ", "-", "+")) + f"    {self.ident()} = {self.expr()}")
        return "\n".join(rows)

    def prose(self) -> str:
        r = self.r
        sentences = []
        for _ in range(r.randint(2, 5)):
            sentences.append(
                f"{r.choice(PROSE_OPENERS)} `{self.ident()}` in {self.path()} "
                f"(the {r.choice(ADJECTIVES)} {r.choice(NOUNS)} path, about {self.num(400)} lines) "
                f"{r.choice(PROSE_TAILS)}"
            )
        return " ".join(sentences)

    def piece(self) -> str:
        kinds: tuple[Callable[[], str], ...] = (
            self.python,
            self.rust,
            self.go,
            self.typescript,
            self.c,
            self.listing,
            self.grep,
            self.test_log,
            self.traceback,
            self.json_blob,
            self.diff,
            self.prose,
        )
        return self.r.choices(kinds, weights=(4, 2, 2, 2, 1, 1, 2, 1, 1, 2, 2, 3))[0]()


def pieces(seed: int) -> Iterator[str]:
    """An endless stream of agent-shaped pieces for `seed`."""
    gen = TextGen(seed)
    while True:
        yield gen.piece()


SEPARATOR = "\n\n"


def make_corpus(n_tokens: int, tokenizer: LoadedTokenizer, seed: int = 0) -> str:
    """Text of exactly `n_tokens` tokens (or within a token or two where BPE merges
    across the cut make exactness impossible), deterministic for `seed`."""
    if n_tokens <= 0:
        raise CputaxError(f"--tokens must be positive, got {n_tokens}")
    tok = tokenizer.tokenizer
    stream = pieces(seed)
    chunks: list[str] = []
    estimate = 0
    target = int(n_tokens * 1.03) + 32
    while True:
        while estimate < target:
            piece = next(stream)
            chunks.append(piece)
            estimate += len(tok.encode(piece, add_special_tokens=False).ids) + 1
        text = SEPARATOR.join(chunks)
        enc = tok.encode(text, add_special_tokens=False)
        if len(enc.ids) >= n_tokens:
            break
        target = estimate + (n_tokens - len(enc.ids)) + 64
    return _cut_to(text, enc.offsets, n_tokens, tokenizer)


def _cut_to(
    text: str, offsets: list[tuple[int, int]], n_tokens: int, tokenizer: LoadedTokenizer
) -> str:
    """Cut `text` at a token boundary so the prefix re-tokenizes to `n_tokens`.

    Re-tokenizing a prefix can merge differently at the cut, so step the cut until
    the count is exact; keep the closest if it oscillates.
    """
    want = n_tokens
    best, best_err = "", n_tokens
    for _ in range(12):
        idx = max(1, min(want, len(offsets)))
        cut = text[: offsets[idx - 1][1]]
        got = tokenizer.count(cut)
        err = got - n_tokens
        if abs(err) < abs(best_err):
            best, best_err = cut, err
        if err == 0:
            return cut
        want -= err
    return best
