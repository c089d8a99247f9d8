"""How each MultiPL-E language is run: file name, commands, and how to read its outcome.

The rules follow MultiPL-E's own evaluators (``evaluation/src/eval_*.py`` in nuprl/MultiPL-E): a program passes when
every command exits with status 0, plus a few per-language quirks (rackunit reports failures on stderr with exit
status 0; MultiPL-E's Perl rule also fails on ``ERROR`` in the output). Messages that mean "a part of the toolchain
is missing" (a test library such as luaunit or Test::Deep) make the run *unavailable*, not failed, so a missing
install never reads as 0% pass@1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

COMPILED_BINARY = "./{stem}"
"""A command word naming the program's own compiled binary in the work directory, not a tool to look up."""


@dataclass(frozen=True)
class LanguageSpec:
    """One language: MultiPL-E's key (``pl``, ``rkt``, ...) and how a program in it is run.

    ``commands`` run in order in the program's work directory; their words may use ``{file}`` (the program's file
    name), ``{stem}`` (the name without extension) and ``{dir}`` (the work directory). The first word of a command is
    a tool name looked up on the sandbox ``PATH`` (``tools`` maps it to alternative executable names), or
    :data:`COMPILED_BINARY`.
    """

    name: str
    extension: str
    commands: tuple[tuple[str, ...], ...]
    aliases: tuple[str, ...] = ()
    tools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    filename: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    failure_markers: tuple[str, ...] = ()
    fail_on_stderr: bool = False
    missing_markers: tuple[str, ...] = ()
    limit_address_space: bool = True
    """False for runtimes that reserve far more address space than they use (JVM, Julia, Go): RLIMIT_DATA, which
    counts only writable private memory, still bounds them."""

    def file_name(self) -> str:
        return self.filename or f"program{self.extension}"

    def required_tools(self) -> list[str]:
        """Tool names the commands need, in order, without duplicates."""
        names: list[str] = []
        for command in self.commands:
            if command[0] != COMPILED_BINARY and command[0] not in names:
                names.append(command[0])
        return names

    def candidates(self, tool: str) -> tuple[str, ...]:
        return self.tools.get(tool, (tool,))


def _interpreted(name: str, extension: str, tool: str, *aliases: str, **kwargs) -> LanguageSpec:
    return LanguageSpec(name=name, extension=extension, commands=((tool, "{file}"),), aliases=aliases, **kwargs)


def _compiled(name: str, extension: str, compile_command: tuple[str, ...], *aliases: str, **kwargs) -> LanguageSpec:
    commands = (compile_command, (COMPILED_BINARY,))
    return LanguageSpec(name=name, extension=extension, commands=commands, aliases=aliases, **kwargs)


_BUILTIN: tuple[LanguageSpec, ...] = (
    _interpreted("py", ".py", "python3", "python", "notypes.py", env={"PYTHONDONTWRITEBYTECODE": "1"}),
    _interpreted(
        "pl", ".pl", "perl", "perl", failure_markers=("ERROR",), missing_markers=("Can't locate Test/Deep.pm",)
    ),
    _interpreted("rb", ".rb", "ruby", "ruby", missing_markers=("cannot load such file -- test/unit",)),
    _interpreted(
        "lua",
        ".lua",
        "lua",
        tools={"lua": ("lua", "lua5.4", "lua5.3", "lua5.2", "lua5.1", "luajit")},
        missing_markers=("module 'luaunit' not found",),
    ),
    _interpreted("js", ".js", "node", "javascript", "nodejs", tools={"node": ("node", "nodejs")}),
    LanguageSpec(
        name="ts",
        extension=".ts",
        commands=(("tsc", "--target", "esnext", "--lib", "esnext", "{file}"), ("node", "{stem}.js")),
        aliases=("typescript",),
        tools={"node": ("node", "nodejs")},
    ),
    _interpreted("sh", ".sh", "bash", "bash", "shell"),
    _interpreted(
        "rkt",
        ".rkt",
        "racket",
        "racket",
        fail_on_stderr=True,
        missing_markers=("collection not found\n  for module path: rackunit",),
    ),
    _interpreted("r", ".r", "Rscript", "rscript"),
    _interpreted("jl", ".jl", "julia", "julia", limit_address_space=False),
    _interpreted("php", ".php", "php", "php"),
    _compiled(
        "cpp", ".cpp", ("g++", "-std=c++17", "-o", "{stem}", "{file}"), "c++", tools={"g++": ("g++", "clang++")}
    ),
    _compiled("rs", ".rs", ("rustc", "-o", "{stem}", "{file}"), "rust"),
    # MultiPL-E's D programs are `unittest` blocks and an empty main: built with unit tests on, a failed assertion
    # exits 1 (LDC, Debian's ldc package; MultiPL-E runs them with rdmd -unittest, the same compile-and-run)
    _compiled("d", ".d", ("ldc2", "-unittest", "-of={stem}", "{file}"), "dlang"),
    _compiled("swift", ".swift", ("swiftc", "-o", "{stem}", "{file}"), limit_address_space=False),
    LanguageSpec(
        name="go",
        extension=".go",
        commands=(("go", "test", "{file}"),),
        aliases=("golang", "go_test.go"),
        filename="problem_test.go",
        env={"GOCACHE": "{dir}/.gocache", "GOPATH": "{dir}/.gopath", "GO111MODULE": "off"},
        limit_address_space=False,
    ),
    LanguageSpec(
        name="java",
        extension=".java",
        commands=(("javac", "{file}"), ("java", "-ea", "Problem")),
        filename="Problem.java",
        missing_markers=("package org.javatuples does not exist",),
        limit_address_space=False,
    ),
)

_REGISTRY: dict[str, LanguageSpec] = {}
_ALIASES: dict[str, str] = {}


def register_language(spec: LanguageSpec) -> None:
    """Add or replace a language, e.g. one MultiPL-E supports but this table does not (Scala, D, C#, ...)."""
    _REGISTRY[spec.name] = spec
    for alias in (spec.name, *spec.aliases):
        _ALIASES[alias.lower()] = spec.name


for _spec in _BUILTIN:
    register_language(_spec)


def canonical_language(language: str) -> str:
    """MultiPL-E's key for a language name or alias: ``perl`` -> ``pl``, ``racket`` -> ``rkt``."""
    key = language.lower().strip()
    key = key.removeprefix("humaneval-").removeprefix("mbpp-")
    if key in _ALIASES:
        return _ALIASES[key]
    raise KeyError(f"unknown language {language!r}; known: {', '.join(sorted(_REGISTRY))} (see register_language)")


def language_spec(language: str | LanguageSpec) -> LanguageSpec:
    if isinstance(language, LanguageSpec):
        return language
    return _REGISTRY[canonical_language(language)]


def known_languages() -> list[str]:
    return sorted(_REGISTRY)
