"""Every command line of README.md, tested as written.

The README is read at test time (never a copy of it), so a command added, changed or mistyped
there is checked by the next run:

* **collect**: :func:`readme_commands` finds every ``python -m rtdetr_lit.<module>``,
  ``python scripts/<name>.py``, ``make <target>`` and ``rtdetr-<name>`` (console script) command
  in the fenced shell blocks and in the inline code of the prose and the tables;
* **fast** (``make test``): each one is parsed the way its program parses it, in this process.
  The Hydra entry points (train, eval, export, predict) compose their config with Hydra's compose
  API and every ``_target_`` node is checked against its signature, so an unknown key, a wrong
  group or a typo fails. ``rtdetr_lit.convert`` and the scripts parse their arguments with their
  own ``argparse`` parser, and the Hydra overrides that a script hands on are composed too.
  ``make`` targets are dry-run (``make -n``);
* **slow** (``make test-slow``): each command runs as a user would run it, in a subprocess started
  in a fresh directory, scaled down to what a CPU does in seconds (:func:`cpu_twin`), and must
  exit with 0.

How commands are collected (the README is prose, not a script, so these are decisions):

* In fenced blocks (```` ```bash ````, ```` ```sh ```` or unlabelled) a command is one line, with
  backslash-continued lines joined; a trailing ``# comment`` is dropped (quotes respected), and
  so is a leading ``time``. ``python`` blocks hold Python code and are skipped.
* Inline code is a command when it starts like one. An inline span with a program and no
  arguments ("the console script ``rtdetr-export``", "convert it with
  ``python -m rtdetr_lit.convert``") *mentions* the tool: the fast part checks that it exists and
  parses ``--help`` (a Hydra entry point composes its defaults), the slow part runs it with
  ``--help``.
* An inline span starting with ``... `` continues the program (not the arguments) of the command
  before it: in the "reproduce a paper model" table the discrete-stage cell
  ``... experiment=rtdetrv2_r18_coco_discrete model.init_from=<best.ckpt>`` is
  ``python -m rtdetr_lit.train experiment=rtdetrv2_r18_coco_discrete model.init_from=<best.ckpt>``.
* A program name holding a placeholder (``python -m rtdetr_lit.<command>``) is a pattern, not a
  command, and is left out.
* ``<...>`` placeholders (``<best.ckpt>``, ``<run>``, ``<stage 1>``) stay in the command's text and
  are replaced before the line is split into words, by a plain word (``best.ckpt``, ``stage_1``).
  Composing opens no file, so that is all the fast part needs, except for the Hydra search path
  ``/path/to/my_configs``, which composing reads: both parts write that folder.
* The same command twice (``make test``, ``python -m rtdetr_lit.train``) is tested once.

How the slow part scales a command down (its "CPU twin", :func:`cpu_twin`):

* ``trainer=gpu`` becomes ``trainer=cpu`` and ``trainer=ddp`` becomes ``trainer=ddp_sim`` (2 CPU
  processes; ``trainer.devices`` follows); the model size stays as written;
* data: 128 px, 2 images per batch, no loader workers, multi-scale sizes of 128 and 160 px; the
  synthetic set has 6 small training images; ``data=coco`` / ``data.root=/data/my_set`` /
  ``/data/my_yolo_set`` (with a ``data.yaml``) and ``/data/VOCdevkit`` are tiny generated sets of
  that layout (80, 3, 2 and the 20 VOC classes);
* training: one epoch of one batch, one validation and one test batch; sweeps: the first two
  values of each list, 2 optuna trials;
* released weights named in a command (``model.init_from=rtdetrv2_r18_coco``, the experiment
  recipes' ImageNet backbone, ``weights download NAME``) are put into the commands' weights cache
  first (``RTDETR_LIT_HOME``) as stand-ins of the right size and layout, and ``weights import``
  gets its file, so the name path runs without the network;
* every other file a command reads is made first: ``ckpt_path=``/``model.init_from=`` paths
  name weights of the command's model size and class count (the demo model's are a checkpoint
  trained once per module, the other sizes' a fresh model saved as a converted file, an ``.onnx``
  one an export of them), ``source=`` pictures, a folder, a glob and a video, and the
  converter's input a reference checkpoint built from ``tests/reference`` or a Hugging Face
  ``model.safetensors``;
* a value the command sets itself is kept, except the sizes above (``trainer.devices``,
  ``hydra.sweeper.n_trials``, ``--runs``, ``--num-train``, ``--num-val``).

Not run in the slow part (the fast part still checks them): SLURM submission (needs a cluster) and
the ``make`` targets that run this test suite, rewrite files, install from the network or
benchmark for minutes (``test``, ``test-slow``, ``format``, ``install``, ``bench``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, read_write
from PIL import Image, ImageDraw

from rtdetr_lit.config import CONFIG_DIR, register_schemas, validate_config
from rtdetr_lit.weights import REGISTRY, is_name

from .conftest import REFERENCE_DIR, SMALL_SYNTHETIC, compose_config, random_state, reference_layout
from .data.test_voc import _devkit

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# How a command starts; `rtdetr-` counts only when it names one of the package's console scripts.
_PROGRAM_STARTS = ("python -m rtdetr_lit.", "python scripts/", "make ", "rtdetr-")
_SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
_FENCE = re.compile(r"^\s*```(\S*)")
# An inline code span: no backtick inside, and it does not cross a blank line (a paragraph's end).
_INLINE = re.compile(r"`((?:[^`\n]|\n(?![ \t]*\n))+)`")
_PLACEHOLDER = re.compile(r"<([^<>\n]+)>")
# The Hydra search path of "Your own dataset": a folder that composing reads.
MY_CONFIGS = "/path/to/my_configs"


# ---------------------------------------------------------------------------------------------
# Collecting the commands
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    """One README command: ``text`` as written (placeholders kept, continued lines joined,
    comment dropped), the README ``line`` it starts on, and whether it is ``inline`` code."""

    text: str
    line: int
    inline: bool = False

    def words(self, replace: dict[str, str] | None = None) -> list[str]:
        """The words a shell would pass: each ``<placeholder>`` replaced by its words joined by
        ``_`` (``<stage 1>``: ``stage_1``), then each ``replace`` key by its value."""
        text = _PLACEHOLDER.sub(lambda m: "_".join(m.group(1).split()), self.text)
        for old, new in sorted((replace or {}).items(), key=lambda kv: -len(kv[0])):
            text = text.replace(old, new)
        return shlex.split(text)

    @property
    def program(self) -> str:
        """``python -m rtdetr_lit.train``, ``python scripts/x.py``, ``make`` or ``rtdetr-x``."""
        words = self.text.split()
        if words[0] != "python":
            return words[0]
        return " ".join(words[:3] if words[1] == "-m" else words[:2])

    @property
    def arguments(self) -> list[str]:
        return self.words()[len(self.program.split()) :]

    @property
    def mention(self) -> bool:
        """An inline program name without arguments: it names the tool (see the module doc)."""
        return self.inline and self.program != "make" and not self.arguments

    def __str__(self) -> str:
        return self.text


def _strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment: a ``#`` starting a word outside quotes."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


@cache
def _console_scripts() -> dict[str, str]:
    """The package's console scripts, ``{"rtdetr-train": "rtdetr_lit.train:main", ...}``."""
    return {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if ep.value.startswith("rtdetr_lit.")
    }


def _as_command(text: str) -> str | None:
    """``text`` without a leading ``time``, if it is a command; else ``None``."""
    text = text.removeprefix("time ").strip()
    if not text.startswith(_PROGRAM_STARTS):
        return None
    words = text.split()
    if words[0].startswith("rtdetr-"):
        return text if words[0] in _console_scripts() else None
    if words[:2] == ["python", "-m"]:
        # `python -m rtdetr_lit.<command>` is a pattern: only a real module name counts.
        return text if re.fullmatch(r"rtdetr_lit(\.\w+)+", words[2]) else None
    return text


def readme_commands(markdown: str) -> list[Command]:
    """Every command of ``markdown`` in README order (duplicates kept), by the rules above."""
    lines = markdown.splitlines()
    found: list[Command] = []
    prose: list[str] = []  # the lines outside code blocks; code lines blanked, numbers kept
    block: str | None = None  # the language of the fenced block we are in
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence or block is None:
            if fence:
                block = None if block is not None else fence.group(1).lower()
            prose.append("" if fence else lines[i])
            i += 1
            continue
        start, text = i, lines[i]
        while text.endswith("\\") and i + 1 < len(lines):  # a continued line
            i += 1
            text = text[:-1].rstrip() + " " + lines[i].strip()
        prose.extend([""] * (i - start + 1))
        command = _as_command(_strip_comment(text.strip()))
        if block in _SHELL_BLOCKS and command:
            found.append(Command(command, start + 1))
        i += 1

    text = "\n".join(prose)
    for match in _INLINE.finditer(text):
        span = " ".join(match.group(1).split())  # a span broken over lines is one line
        line = text.count("\n", 0, match.start()) + 1
        if span.startswith("... "):  # the program of the command before it, these arguments
            before = [c for c in found if c.line <= line]
            if not before:
                continue
            span = f"{max(before, key=lambda c: c.line).program} {span[4:]}"
        command = _as_command(span)
        if command:
            found.append(Command(command, line, inline=True))
    return sorted(found, key=lambda c: c.line)


def _unique(commands: Sequence[Command]) -> list[Command]:
    """Each command once, where it first appears; a mention and a command with the same text
    (inline ``python -m rtdetr_lit.train`` and the one in the Training block) are two."""
    seen: dict[tuple[str, bool], Command] = {}
    for command in commands:
        seen.setdefault((command.text, command.mention), command)
    return list(seen.values())


ALL_COMMANDS = readme_commands(README.read_text(encoding="utf-8"))
COMMANDS = _unique(ALL_COMMANDS)


def _command_id(command: Command) -> str:
    kind = " (mention)" if command.mention else ""
    return f"L{command.line} {command.text}{kind}"


# ---------------------------------------------------------------------------------------------
# Parsing a command the way its program does
# ---------------------------------------------------------------------------------------------
def _module_of(command: Command) -> str | None:
    """The module a ``python -m`` command or a console script runs; ``None`` for the others."""
    words = command.program.split()
    if words[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(words[2]) is not None, f"{command}: no such module"
        return words[2]
    if words[0] in _console_scripts():
        module, _, function = _console_scripts()[words[0]].partition(":")
        assert callable(getattr(importlib.import_module(module), function, None)), command
        return module
    return None


def _hydra_entry(module: str) -> str | None:
    """``train`` for ``rtdetr_lit.train``: the entry config of a Hydra app, else ``None``."""
    name = module.rpartition(".")[2]
    is_app = module.startswith("rtdetr_lit.") and (CONFIG_DIR / f"{name}.yaml").is_file()
    return name if is_app else None


_HYDRA_VALUE_FLAGS = {"--cfg": {"job", "hydra", "all"}, "-c": {"job", "hydra", "all"}}
_HYDRA_FLAGS = {"--help", "-h", "--hydra-help", "--multirun", "-m", "--resolve"}
_TARGET_GROUPS = ("data", "model", "callbacks", "logger", "trainer")


def split_hydra_arguments(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """The command-line options and the overrides of a Hydra app's arguments.

    An option this test does not know is an error: it is either a typo or a new README usage
    that the test should learn about.
    """
    flags: list[str] = []
    overrides: list[str] = []
    words = iter(args)
    for word in words:
        if word in _HYDRA_VALUE_FLAGS:
            value = next(words, None)
            assert value in _HYDRA_VALUE_FLAGS[word], f"{word} {value}: not a value of {word}"
            flags += [word, value]
        elif word in _HYDRA_FLAGS:
            flags.append(word)
        elif word.startswith("-"):
            raise AssertionError(f"{word}: not an option of a Hydra app (or unknown to this test)")
        else:
            overrides.append(word)
    return flags, overrides


def _is_multirun(flags: Sequence[str]) -> bool:
    return "-m" in flags or "--multirun" in flags


def sweep_values(overrides: Sequence[str], keep: int) -> list[str]:
    """``overrides`` with each sweep (``key=a,b,c``, ``range``, ...) cut to its first ``keep``
    values; other overrides unchanged."""
    out = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())[:keep]
            out.append(f"{override.get_key_element()}={','.join(values)}")
        else:
            out.append(override.input_line)
    return out


_COMPOSED: dict[tuple[str, tuple[str, ...]], DictConfig] = {}


def compose_command(entry: str, args: Sequence[str]) -> DictConfig:
    """Compose ``conf/<entry>.yaml`` for a command line as the app would, and check every
    ``_target_`` node of it. A multirun composes the first job of its sweep.

    Under the :func:`one_hydra` fixture all commands share one initialised Hydra, and a command
    line composed before (``--help`` and the bare command compose the same) is not composed again.
    """
    flags, overrides = split_hydra_arguments(args)
    if _is_multirun(flags):
        overrides = [*sweep_values(overrides, keep=1), "hydra.mode=MULTIRUN"]
    key = (entry, tuple(overrides))
    if key not in _COMPOSED:
        if GlobalHydra.instance().is_initialized():
            cfg = compose(entry, overrides=overrides, return_hydra_config=True)
        else:
            cfg = compose_config(entry, overrides)
        # What Hydra sets when a job starts: values like trainer.default_root_dir read it.
        with read_write(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = "outputs/job"
        HydraConfig().set_config(cfg)
        validate_config(cfg, keys=tuple(k for k in _TARGET_GROUPS if cfg.get(k) is not None))
        _COMPOSED[key] = cfg
    return _COMPOSED[key]


@cache
def load_script(path: Path) -> ModuleType:
    """``scripts/<name>.py`` as a module, its folder on ``sys.path`` as ``python <path>`` has it."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"readme_script_{path.stem}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class _Parsed(Exception):
    """Raised once a program's own parser has parsed its arguments: ``main`` stops there."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result


@contextlib.contextmanager
def _stop_after_parsing() -> Iterator[None]:
    """Make the outermost ``parse_args``/``parse_known_args`` call raise :class:`_Parsed` with its
    result, so that a program's ``main`` parses its command line and does nothing else."""
    originals = {
        name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_known_args")
    }
    depth = 0

    def stopping(real: Callable[..., Any]) -> Callable[..., Any]:
        def parse(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
            nonlocal depth
            depth += 1  # parse_args calls parse_known_args: only the outer call stops
            try:
                result = real(self, *args, **kwargs)
            finally:
                depth -= 1
            if depth == 0:
                raise _Parsed(result)
            return result

        return parse

    try:
        for name, real in originals.items():
            setattr(argparse.ArgumentParser, name, stopping(real))
        yield
    finally:
        for name, real in originals.items():
            setattr(argparse.ArgumentParser, name, real)


def parse_with_program(parse: Callable[[], Any], what: str, *, in_main: bool = True) -> Any:
    """Run ``parse`` and return what it parsed; ``None`` after ``--help``. An argparse error fails
    the test with argparse's message. ``in_main``: ``parse`` runs a program's ``main``, stopped
    (:func:`_stop_after_parsing`) once its parser returns; else it is the program's own parse
    function, whose result is returned as it is."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with _stop_after_parsing() if in_main else contextlib.nullcontext():
                return parse()
        except _Parsed as done:
            return done.result
        except SystemExit as exit_:
            if exit_.code in (0, None):
                return None
            raise AssertionError(f"{what}: exit {exit_.code}\n{err.getvalue()}") from None


def _with_argv(argv: list[str], main: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        saved = sys.argv
        sys.argv = argv
        try:
            main()
        finally:
            sys.argv = saved
        raise AssertionError(f"{argv[0]}: main() returned without parsing its arguments")

    return run


# Programs (scripts and ``python -m`` modules) that hand Hydra overrides on: the config they compose
# and the overrides, from what their parser returned (as their ``main`` does it).
_SCRIPT_OVERRIDES: dict[str, tuple[str, Callable[[Any], list[str]]]] = {
    "speed_accuracy": ("eval", lambda parsed: ["task_name=speed_accuracy", *parsed[1]]),
    "show_augmentations": ("train", lambda parsed: [f"data={parsed.data}", *parsed.overrides]),
}


def check_command(command: Command, my_configs: Path) -> None:
    """Parse ``command`` as its program would (see the module doc); fail on any error."""
    words = command.words(replace={MY_CONFIGS: str(my_configs)})
    args = words[len(command.program.split()) :]
    if command.program == "make":
        done = subprocess.run(
            ["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"make -n {shlex.join(args)}:\n{done.stderr}"
        return
    module = _module_of(command)
    entry = _hydra_entry(module) if module else None
    if entry:
        compose_command(entry, args)
        return
    if command.mention:
        args = ["--help"]
    what = f"{command.program} {shlex.join(args)}"
    if module:
        program, name, argv0 = importlib.import_module(module), module.rpartition(".")[2], module
    else:
        path = REPO / command.program.split()[1]
        assert path.is_file(), f"{command.program}: no such script"
        program, name, argv0 = load_script(path), path.stem, str(path)
    if hasattr(program, "parse_args"):  # the program's own parse function
        parsed = parse_with_program(lambda: program.parse_args(args), what, in_main=False)
    else:
        parsed = parse_with_program(_with_argv([argv0, *args], program.main), what)
    if parsed is not None and name in _SCRIPT_OVERRIDES:
        config, overrides = _SCRIPT_OVERRIDES[name]
        compose_command(config, overrides(parsed))


# ---------------------------------------------------------------------------------------------
# Fast part
# ---------------------------------------------------------------------------------------------
def write_my_configs(folder: Path, root: str = "/data/my_set", num_classes: int = 3) -> Path:
    """The user's own config folder of "Your own dataset": ``data/my_set.yaml`` on ``custom``."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "my_set.yaml").write_text(
        f"defaults: [custom, _self_]\nroot: {root}\nnum_classes: {num_classes}\n"
    )
    return folder


@pytest.fixture(scope="module")
def one_hydra() -> Iterator[None]:
    """One Hydra initialised on the package's configs for all the commands of the module:
    initialising it again for each one would cost a tenth of a second each."""
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def my_configs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_my_configs(tmp_path_factory.mktemp("my_configs"))


SAMPLE = """\
Intro `python -m rtdetr_lit.train model=r18` and `make lint`; `pip install x` is no command.

```bash
python -m rtdetr_lit.eval ckpt_path=last.ckpt \\
    model=r50   # a comment
time make train
python scripts/x.py --out 'a # b' # c
```

```python
python -m rtdetr_lit.train  # Python code, not shell
```

| `python -m rtdetr_lit.train experiment=e trainer=ddp` | `... model.init_from=<x.ckpt>` |

The console script `rtdetr-export` runs `python -m rtdetr_lit.<command>` with
`python -m rtdetr_lit.train
trainer=ddp_sim`.
"""


def test_commands_are_collected_by_the_documented_rules() -> None:
    commands = readme_commands(SAMPLE)
    assert [(c.line, c.text, c.inline) for c in commands] == [
        (1, "python -m rtdetr_lit.train model=r18", True),
        (1, "make lint", True),
        (4, "python -m rtdetr_lit.eval ckpt_path=last.ckpt model=r50", False),
        (6, "make train", False),
        (7, "python scripts/x.py --out 'a # b'", False),
        (14, "python -m rtdetr_lit.train experiment=e trainer=ddp", True),
        (14, "python -m rtdetr_lit.train model.init_from=<x.ckpt>", True),
        (16, "rtdetr-export", True),
        (17, "python -m rtdetr_lit.train trainer=ddp_sim", True),
    ]
    assert commands[4].words() == ["python", "scripts/x.py", "--out", "a # b"]
    assert commands[6].words()[-1] == "model.init_from=x.ckpt"
    assert commands[7].mention and not commands[0].mention
    assert sweep_values(["a=1,2,3", "b=[1,2]"], keep=2) == ["a=1,2", "b=[1,2]"]


def test_the_readme_commands_are_found() -> None:
    texts = {c.text for c in ALL_COMMANDS}
    # one of each kind, as written
    assert {
        "python -m rtdetr_lit.speed_accuracy --eval-idx 0 2 --methods discrete ckpt_path=last.ckpt",
        "python -m rtdetr_lit.train experiment=rtdetrv2_r50_coco_discrete "
        "model.init_from=<best.ckpt>",
        "python -m rtdetr_lit.convert --from hf --model r50 model.safetensors r50.pth "
        "--num-classes 80",
        "make train",
        "make test",
        "rtdetr-train",
    } <= texts
    assert len(ALL_COMMANDS) >= 60 and len(COMMANDS) >= 45


def test_a_command_its_parser_refuses_fails_the_check(one_hydra: None, my_configs: Path) -> None:
    """The check is not a formality: what a program refuses, the test refuses, naming why."""
    refused = {
        "python -m rtdetr_lit.train model=r05": "r05",  # no such option of a group
        "python -m rtdetr_lit.train trainer.max_epoch=3": "max_epoch",  # no such key
        "python -m rtdetr_lit.train -x": "-x",  # no such Hydra option
        "python -m rtdetr_lit.convert --from ref --model r18 a.pth b.pth": "invalid choice",
        "python -m rtdetr_lit.speed_accuracy --methods nearest ckpt_path=a.ckpt": "invalid choice",
        "python scripts/make_synthetic.py --num-train many": "invalid int value",
        # the Hydra overrides that a script hands on are composed too
        "python -m rtdetr_lit.speed_accuracy ckpt_path=a.ckpt experiment=r18_coco": "r18_coco",
        "python scripts/show_augmentations.py data.batch_sise=2": "batch_sise",
        "make nonsense": "No rule to make target",
    }
    for text, reason in refused.items():
        with pytest.raises(Exception, match=re.escape(reason)):
            check_command(Command(text, 0), my_configs)


@pytest.mark.parametrize("command", COMMANDS, ids=_command_id)
def test_readme_command_parses_as_written(
    command: Command, one_hydra: None, my_configs: Path
) -> None:
    check_command(command, my_configs)


def test_debug_default_is_a_quick_check_of_a_few_batches() -> None:
    """``debug=default`` (README: "quick checks") trains a few batches with anomaly detection in
    one process, not a whole epoch; the presets built on it keep their own meaning."""
    cfg = compose_config("train", ["debug=default"])
    trainer = cfg.trainer
    assert trainer.detect_anomaly and trainer.max_epochs == 1
    assert isinstance(trainer.limit_train_batches, int) and 0 < trainer.limit_train_batches <= 20
    for split in ("val", "test"):
        assert isinstance(trainer[f"limit_{split}_batches"], int)
        assert 0 < trainer[f"limit_{split}_batches"] <= 5
    assert cfg.data.num_workers == 0 and cfg.trainer.accelerator == "cpu"
    # fast_dev_run and overfit_batches take precedence over the limits in Lightning; the two
    # presets that set limits themselves must win over these.
    profiler = compose_config("train", ["debug=profiler"]).trainer
    assert profiler.profiler == "simple" and profiler.limit_train_batches == 1.0  # a whole epoch
    limit = compose_config("train", ["debug=limit"]).trainer
    assert (limit.max_epochs, limit.limit_train_batches) == (3, 0.05)


# ---------------------------------------------------------------------------------------------
# Slow part: every command run, scaled down to a CPU
# ---------------------------------------------------------------------------------------------
IMAGE = 128
# The synthetic set of every run: 6 small training images (3 batches of 2), 2 validation images.
SYNTHETIC = [*SMALL_SYNTHETIC, "data.synthetic.num_train=6", "data.synthetic.num_val=2"]
_DATA_SCALE = [
    f"data.image_size=[{IMAGE},{IMAGE}]",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "data.num_workers=0",
    # 128 px is the least that gives 300 queries (the sizes but demo) enough memory tokens
    f"data.multiscale.sizes=[{IMAGE},160]",
]
_TRAIN_SCALE = [
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=1",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "++trainer.num_sanity_val_steps=0",
]
_TWIN_TRAINER = {"gpu": "cpu", "ddp": "ddp_sim"}
# Keys of the predict config that the export of its ONNX graph does not have.
_PREDICT_ONLY = {"source", "threshold", "backend", "batch_size", "output", "ckpt_path"}
# Keys whose value is a weights file that the slow part makes; these values are not files.
_WEIGHT_KEYS = {"ckpt_path", "model.init_from"}
_NOT_FILES = {"last", "auto", "null", "None"}
COCO_CLASSES = 80
# make targets not run in the slow part, and why.
_MAKE_NOT_RUN = {
    "test": "runs this test suite",
    "test-slow": "runs this test suite",
    "test-all": "runs this test suite",
    "format": "rewrites the files of the shared checkout",
    "install": "installs packages (from the network)",
    "bench": "benchmarks for many minutes",
    "clean": "deletes caches of the shared checkout",
}


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _picture(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def _detection_pictures(folder: Path, count: int, num_classes: int, seed: int) -> list[dict]:
    """``count`` noise pictures with one or two filled boxes each, saved in ``folder``; per
    picture its file name, size and ``(class, [x, y, w, h])`` boxes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = []
    for i in range(count):
        width, height = int(rng.integers(120, 200)), int(rng.integers(100, 160))
        picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(picture)
        boxes = []
        for _ in range(int(rng.integers(1, 3))):
            w, h = (int(v) for v in rng.integers(16, 64, 2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            draw.rectangle(
                [x, y, x + w - 1, y + h - 1], fill=tuple(rng.integers(0, 256, 3).tolist())
            )
            boxes.append((int(rng.integers(num_classes)), [float(x), float(y), float(w), float(h)]))
        name = f"{seed * 1000 + i + 1:012d}.jpg"
        picture.save(folder / name, quality=95)
        pictures.append({"file_name": name, "width": width, "height": height, "boxes": boxes})
    return pictures


def write_coco_split(
    images: Path, annotations: Path, names: Sequence[str], count: int, seed: int
) -> None:
    """A COCO-format split: pictures in ``images``, the instances JSON at ``annotations``
    (category ids 1..N)."""
    data: dict[str, list] = {"images": [], "annotations": [], "categories": []}
    data["categories"] = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    for image_id, picture in enumerate(_detection_pictures(images, count, len(names), seed), 1):
        data["images"].append({"id": image_id, "file_name": picture["file_name"],
                               "width": picture["width"], "height": picture["height"]})  # fmt: skip
        for label, box in picture["boxes"]:
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": image_id,
                                        "category_id": label + 1, "bbox": box,
                                        "area": box[2] * box[3], "iscrowd": 0})  # fmt: skip
    annotations.parent.mkdir(parents=True, exist_ok=True)
    annotations.write_text(json.dumps(data))


def write_yolo_split(root: Path, split: str, num_classes: int, count: int, seed: int) -> None:
    """A YOLO-layout split: ``images/<split>/*.jpg`` and ``labels/<split>/*.txt``."""
    labels = root / "labels" / split
    labels.mkdir(parents=True, exist_ok=True)
    for picture in _detection_pictures(root / "images" / split, count, num_classes, seed):
        w, h = picture["width"], picture["height"]
        lines = [f"{c} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"
                 for c, (x, y, bw, bh) in picture["boxes"]]  # fmt: skip
        (labels / Path(picture["file_name"]).with_suffix(".txt")).write_text(
            "\n".join(lines) + "\n"
        )


def write_video(path: Path, frames: int = 4, size: tuple[int, int] = (96, 64)) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 8.0, size)
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    writer.release()


def run(argv: Sequence[str], cwd: Path, timeout: float = 1800) -> subprocess.CompletedProcess:
    """``argv`` started in ``cwd`` as a user would; its exit code must be 0."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"exit {done.returncode}: {shlex.join(argv)}\n--- stdout\n{done.stdout[-3000:]}\n"
        f"--- stderr\n{done.stderr[-6000:]}"
    )
    return done


class Workspace:
    """Datasets, weights and configs that the scaled-down commands read, made once per module:
    ``data/`` (the ``paths.data_dir`` of every run) holds ``coco/`` (80 classes), ``my_set/``
    (the custom layout, 3 classes), ``my_yolo_set/`` (2 classes, a ``data.yaml``), ``VOCdevkit/``
    (VOC2007 and VOC2012) and the synthetic set."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        coco = self.data / "coco"
        names = [f"class{i}" for i in range(COCO_CLASSES)]
        for split, seed in (("train2017", 1), ("val2017", 2)):
            write_coco_split(coco / split, coco / "annotations" / f"instances_{split}.json",
                             names, count=2, seed=seed)  # fmt: skip
        mine = self.data / "my_set"
        for split, seed in (("train", 3), ("val", 4)):
            write_coco_split(mine / "images" / split, mine / "annotations" / f"{split}.json",
                             ["cat", "dog", "owl"], count=2, seed=seed)  # fmt: skip
        for split, seed in (("train", 5), ("val", 6)):
            write_yolo_split(self.data / "my_yolo_set", split, num_classes=2, count=2, seed=seed)
        (self.data / "my_yolo_set" / "data.yaml").write_text(
            "train: images/train\nval: images/val\nnames: [person, car]\n"
        )
        _devkit(self.data / "VOCdevkit")
        self.configs = write_my_configs(root / "my_configs", f"{self.data}/my_set", 3)
        # the README's example paths, as they are spelt there
        self.replace = {
            "/data/my_set": str(self.data / "my_set"),
            "/data/my_yolo_set": str(self.data / "my_yolo_set"),
            "/data/VOCdevkit": str(self.data / "VOCdevkit"),
            MY_CONFIGS: str(self.configs),
        }
        self._weights: dict[tuple[str, int], Path] = {}
        self._graphs: dict[tuple[str, ...], Path] = {}
        # the weights cache of every command (RTDETR_LIT_HOME), filled by :meth:`cached`
        self.cache = root / "weights_cache"

    def weights(self, name: str, num_classes: int) -> Path:
        """Weights of model ``name`` with ``num_classes`` classes: for the demo model on the
        synthetic set the checkpoint of ``python -m rtdetr_lit.train`` (scaled down, trained
        once), for the rest a fresh model saved as ``rtdetr_lit.convert`` writes it."""
        if (name, num_classes) not in self._weights:
            if (name, num_classes) == ("demo", 6):
                cwd = self.root / "trained"
                cwd.mkdir()
                run(cpu_twin(Command("python -m rtdetr_lit.train", 0), self, cwd), cwd)
                (path,) = cwd.glob("logs/train/runs/*/checkpoints/last.ckpt")
            else:
                from rtdetr_lit import create_model

                torch.manual_seed(0)
                net = create_model(name, num_classes=num_classes)
                path = self.root / f"{name}_{num_classes}.pth"
                torch.save({"model": net.state_dict()}, path)
            self._weights[name, num_classes] = path
        return self._weights[name, num_classes]

    def release_file(self, name: str, path: Path) -> Path:
        """A stand-in for the released file of registry ``name``, in its layout, at ``path``."""
        from rtdetr_lit import create_model
        from rtdetr_lit.weights import entry, record_for

        item = entry(name)
        torch.manual_seed(0)
        if item.kind == "imagenet":
            net = create_model(item.models[0], channels_last=False)
            torch.save(net.backbone.state_dict(), path)
        elif item.layout == "hf":
            from safetensors.torch import save_file

            from rtdetr_lit.convert import to_hf_state_dict

            state = to_hf_state_dict(record_for(item).build_net(channels_last=False).state_dict())
            save_file({k: v.clone() for k, v in state.items()}, str(path))
        else:
            state = record_for(item).build_net(channels_last=False).state_dict()
            torch.save({"ema": {"module": state, "updates": 1}}, path)
        return path

    def cached(self, name: str) -> None:
        """Registry ``name`` in the weights cache, as ``weights import`` puts it there."""
        from rtdetr_lit.weights import entry, import_file

        if (self.cache / entry(name).file_name).is_file():
            return
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RTDETR_LIT_HOME", str(self.cache))
            import_file(name, self.release_file(name, self.root / f"release_{name}"))

    def graph(self, weights: Path, overrides: Sequence[str]) -> Path:
        """``weights`` exported by ``python -m rtdetr_lit.export`` with ``overrides``."""
        key = (str(weights), *overrides)
        if key not in self._graphs:
            path = self.root / f"graph{len(self._graphs)}.onnx"
            export = [sys.executable, "-m", "rtdetr_lit.export", f"ckpt_path={weights}",
                      f"output={path}", *overrides]  # fmt: skip
            run(export, self.root)
            self._graphs[key] = path
        return self._graphs[key]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    ws = Workspace(tmp_path_factory.mktemp("readme"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RTDETR_LIT_HOME", str(ws.cache))  # the commands' weights cache
        yield ws


def _program_argv(command: Command) -> list[str]:
    """How the subprocess starts the program: this interpreter, scripts by their full path."""
    words = command.program.split()
    if words[0] == "python":
        rest = words[1:]
        if rest[0] != "-m":
            rest = [str(REPO / rest[0])]  # `python scripts/x.py` from the repository root
        return [sys.executable, *rest]
    if words[0] == "make":
        return ["make", "-C", str(REPO)]
    return [str(Path(sys.executable).parent / words[0])]  # a console script of this venv


def twin_overrides(
    entry: str, overrides: Sequence[str], ws: Workspace, *, multirun: bool = False
) -> list[str]:
    """The Hydra overrides of a command, scaled down to the CPU (see the module doc)."""
    ddp = "trainer=ddp" in overrides
    twin = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "trainer" and value in _TWIN_TRAINER:
            override = f"trainer={_TWIN_TRAINER[value]}"
        elif key == "trainer.devices":
            override = f"trainer.devices={2 if ddp else 1}"
        elif key == "hydra.sweeper.n_trials":
            override = "hydra.sweeper.n_trials=2"
        twin.append(override)
    if multirun:
        twin = sweep_values(twin, keep=2)
    cfg = compose_config(entry, sweep_values(twin, keep=1))
    scale = [f"paths.data_dir={ws.data}", *_DATA_SCALE]
    if OmegaConf.select(cfg, "data.synthetic") is not None:
        scale += SYNTHETIC
    if entry == "train":
        scale += _TRAIN_SCALE
        if OmegaConf.select(cfg, "hydra.sweeper.n_trials") is not None:
            scale.append("hydra.sweeper.n_trials=2")
    if entry == "eval":
        scale.append("++trainer.limit_val_batches=1")
    given = {_key(o) for o in twin}
    twin += [o for o in scale if _key(o) not in given]

    backbone = OmegaConf.select(cfg, "model.net.backbone_weights")
    if backbone == "imagenet":  # the experiment recipes
        backbone = next(
            e.name for e in REGISTRY if e.kind == "imagenet" and cfg.model.net.name in e.models
        )
    if is_name(backbone):
        ws.cached(backbone)
    for i, override in enumerate(twin):
        key, _, value = override.partition("=")
        if is_name(value):  # released weights by name: the cache holds a stand-in
            ws.cached(value)
            continue
        if key not in _WEIGHT_KEYS or value in _NOT_FILES:
            continue
        weights = ws.weights(cfg.model.net.name, int(cfg.data.num_classes))
        if value.endswith(".onnx"):  # predict's backend=onnx runs a graph of those weights
            export = [o for o in twin if _key(o) not in _PREDICT_ONLY]
            twin[i] = f"{key}={ws.graph(weights, export)}"
        else:
            twin[i] = f"{key}={weights}"
    return twin


def _make_sources(entry: str, overrides: Sequence[str], cwd: Path) -> None:
    """The pictures, folder, glob matches or video that predict's ``source=`` names."""
    from rtdetr_lit.predict import VIDEO_SUFFIXES

    for override in overrides:
        key, _, source = override.partition("=")
        if entry != "predict" or key != "source":
            continue
        if any(c in source for c in "*?["):  # a glob: a match at the top and one a level down
            top = source.split("*")[0]
            suffix = Path(source).suffix or ".jpg"
            _picture(cwd / top / f"000000000011{suffix}", 150, 100, 1)
            _picture(cwd / top / "day" / f"000000000012{suffix}", 120, 160, 2)
        elif source.endswith("/"):
            for i in range(2):
                _picture(cwd / source / f"photo{i}.jpg", 140 + 20 * i, 110, i)
        elif Path(source).suffix.lower() in VIDEO_SUFFIXES:
            write_video(cwd / source)
        else:
            _picture(cwd / source, 160, 120, 3)


def _rewrite_options(args: Sequence[str], values: dict[str, str]) -> list[str]:
    """``args`` with the value of each option in ``values`` replaced."""
    out = list(args)
    for i, word in enumerate(out[:-1]):
        if word in values:
            out[i + 1] = values[word]
    return out


def _convert_input(args: Sequence[str], cwd: Path, ws: Workspace) -> None:
    """The checkpoint a ``rtdetr_lit.convert`` command reads, made where it names it."""
    from rtdetr_lit.convert import _parser

    parsed = _parser().parse_args(list(args))
    path = cwd / parsed.input
    path.parent.mkdir(parents=True, exist_ok=True)
    if parsed.source == "lightning":  # the training checkpoint of the scaled-down main job
        shutil.copy(ws.weights("demo", 6), path)
    elif parsed.source == "reference":
        from rtdetr_lit import create_model
        from rtdetr_lit.checkpoints import EVAL_SIZE_BUFFERS

        state = create_model(parsed.model).state_dict()  # 640 px: some anchors are +inf
        if (REFERENCE_DIR / f"official_state_dict_{parsed.model}.tsv").is_file():
            # the reference's own key layout, with random weights and its real anchors
            layout = random_state(reference_layout(parsed.model), seed=0)
            state = {**layout, **{k: state[k] for k in EVAL_SIZE_BUFFERS}}
        torch.save({"ema": {"module": state, "updates": 1}, "last_epoch": 0}, path)
    else:  # Hugging Face weights as save_pretrained writes them
        from .test_checkpoints import _hf_model

        folder = cwd / "hf_model"
        _hf_model(parsed.model).save_pretrained(folder)
        shutil.move(folder / "model.safetensors", path)


def cpu_twin(command: Command, ws: Workspace, cwd: Path) -> list[str]:
    """The command line of ``command`` scaled down to the CPU, every file it reads made (in
    ``cwd`` when the command names it relative); skips what cannot run here."""
    words = command.words(replace=ws.replace)
    args = words[len(command.program.split()) :]
    program = _program_argv(command)
    if command.mention:
        return [*program, "--help"]
    if command.program == "make":
        target = args[0]
        if target in _MAKE_NOT_RUN:
            pytest.skip(f"make {target} {_MAKE_NOT_RUN[target]}")
        if target == "train":
            up_to_date = subprocess.run(["make", "-q", "-C", str(REPO), "install"], check=False)
            if up_to_date.returncode != 0:
                pytest.skip("make train would install the package first (the venv is older)")
            # make runs it in the repository: the run directory goes to cwd
            train = cpu_twin(Command("python -m rtdetr_lit.train", 0), ws, cwd)[3:]
            train.append(f"paths.log_dir={cwd / 'logs'}")
            return [*program, *args, f"ARGS={shlex.join(train)}"]
        return [*program, *args]

    module = _module_of(command)
    entry = _hydra_entry(module) if module else None
    if entry:
        flags, overrides = split_hydra_arguments(args)
        if "hydra/launcher=slurm" in overrides:
            pytest.skip("submits to a SLURM cluster")
        if {"--help", "-h", "--hydra-help", "--cfg", "-c"} & set(flags):
            return [*program, *args]  # prints and exits: nothing to scale
        overrides = twin_overrides(entry, overrides, ws, multirun=_is_multirun(flags))
        _make_sources(entry, overrides, cwd)
        return [*program, *flags, *overrides]
    if module == "rtdetr_lit.convert":
        _convert_input(args, cwd, ws)
        return [*program, *args]
    if module == "rtdetr_lit.weights":  # what download reads is cached; import's file is made
        if args[0] == "download":
            for name in args[1:]:
                ws.cached(name)
        if args[0] == "import":
            ws.release_file(args[1], cwd / args[2])
        return [*program, *args]

    script = module.rpartition(".")[2] if module else Path(command.program.split()[1]).stem
    if script in _SCRIPT_OVERRIDES:
        # the script's options as written (sizes cut), then its Hydra overrides scaled
        config = _SCRIPT_OVERRIDES[script][0]
        options = [a for a in args if a.startswith("-") or "=" not in a]
        overrides = [a for a in args if a not in options]
        if script == "speed_accuracy":
            options = ["--warmup", "1", *_rewrite_options(options, {"--runs": "2"})]
            if "--runs" not in options:
                options = ["--runs", "2", *options]
        twin = twin_overrides(config, overrides, ws)
        if script == "show_augmentations":  # no training: the data-sized overrides only
            twin = [o for o in twin if not _key(o).startswith(("trainer.", "test"))]
        return [*program, *options, *twin]
    if script == "make_synthetic":
        return [*program, *_rewrite_options(args, {"--num-train": "4", "--num-val": "2"})]
    return [*program, *args]


# What a run leaves below its directory besides exit code 0, by program (a glob).
_LEAVES = {
    "train": "logs/**/checkpoints/last.ckpt",
    "eval": "logs/eval/**/val_per_class_ap.csv",
    "export": "**/*.onnx",
    "predict": "logs/predict/**/predictions.json",
    "speed_accuracy": "logs/speed_accuracy/**/speed_accuracy.csv",
    "make_synthetic": "**/VERSION.json",
    "show_augmentations": "**/*.png",
}


def expected_output(command: Command) -> str | None:
    """A glob of what ``command`` writes below its directory; ``None`` if it writes nothing
    there (a mention run with ``--help``, ``--cfg``, a make target other than ``train``)."""
    args = command.arguments
    if command.mention or {"--help", "-h", "--cfg", "-c"} & set(args):
        return None
    if command.program == "make":
        return _LEAVES["train"] if args[:1] == ["train"] else None
    module = _module_of(command)
    if module == "rtdetr_lit.convert":
        from rtdetr_lit.convert import _parser

        return str(_parser().parse_args(args).output)
    name = module.rpartition(".")[2] if module else Path(command.program.split()[1]).stem
    return _LEAVES.get(name)


@pytest.mark.slow  # 20-40 minutes for all of them on a 2-core CPU; a few seconds to a minute each
@pytest.mark.parametrize("command", COMMANDS, ids=_command_id)
def test_readme_command_runs_scaled_down_on_the_cpu(
    command: Command, workspace: Workspace, tmp_path: Path
) -> None:
    argv = cpu_twin(command, workspace, tmp_path)
    run(argv, tmp_path)
    output = expected_output(command)
    if output:
        assert list(tmp_path.glob(output)), f"{shlex.join(argv)} wrote no {output}"
