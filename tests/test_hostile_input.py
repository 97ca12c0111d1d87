"""Hostile input at scale: generated settings, search-space files and ``.npy`` files thrown at the
platform's parsers, in this process.

Each is either a clean success or one of the user errors a command prints as one line
(``cli.USER_ERRORS``): never another exception, never a hang (hypothesis's ``deadline``), never
an allocation the input only claims to need, never an unpickled object. Every kind of bad input
below is its own parametrized case, so every kind is tried on every run; ``HOSTILE_KINDS``
counts them (README.md, "When things fail").

The examples are the same on every run (``derandomize``), so CI never fails by chance; set
``DEEPLENSE_HOSTILE_EXAMPLES=500`` to explore with that many fresh random examples of each kind.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import tempfile
import tracemalloc

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from platform import cli, config, data, predict, registry, space
from platform.data import folders, shards as shards_lib

EXPLORE = int(os.environ.get("DEEPLENSE_HOSTILE_EXAMPLES", "0"))
MARKER = os.path.join(tempfile.gettempdir(), f"deeplense-hostile-ran-code-{os.getpid()}")  # what input must never make


def hostile_settings(examples: int, deadline_ms: int):
    # The deadline is about ten times a slow example on two busy cores: what exceeds it is a blow-up
    # (aliases multiplying lists, a header's gigantic shape allocated), not a slow machine.
    return settings(max_examples=EXPLORE or examples, deadline=deadline_ms, derandomize=not EXPLORE, database=None,
                    # too_slow / data_too_large: a kind draws big byte strings and long values on purpose.
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def user_error(what: str, call) -> BaseException | None:
    """None when ``call()`` succeeds; the user error it raised, checked to be one line; anything else fails the test."""
    try:
        call()
    except cli.USER_ERRORS as error:
        message = str(error)
        assert message.strip() and len(message.splitlines()) == 1, f"not one line: {message!r}"
        event(f"{what}: {type(error).__name__}")  # pytest --hypothesis-show-statistics counts them
        return error
    event(f"{what}: success")
    return None


TASKS = registry.names()
DEFAULTS = {task: config.flatten(config.to_dict(config.build(task, []))) for task in TASKS}  # every key, its default
KEYS = sorted({key for keys in DEFAULTS.values() for key in keys})
SECTIONS = sorted({key.split(".")[0] for key in KEYS if "." in key})
NUMBER_KEYS = sorted({key for keys in DEFAULTS.values() for key, value in keys.items()
                      if isinstance(value, (int, float)) and not isinstance(value, bool)})
NAME_KEYS = ["tune.name", "train.name", "mlflow.experiment", "data.cache_dir", "data.path", "tune.space"]

# ---------------------------------------------------------------------------------------------
# Settings: key=value arguments through config.parse_cli and config.build
# ---------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
numbers = (st.integers(-10**40, 10**40).map(str) | st.floats().map(repr)
           | st.sampled_from([".inf", "-.inf", ".nan", ".NaN", "1e999", "-1e999", "1e-999", "0x10", "0o7", "1_000",
                              "+1", "-0", "1e3", "2**40", "nan", "inf", "Infinity", "1.", ".5", "0.0e0"]))
yaml_tags = st.sampled_from([
    f"!!python/object/apply:os.system ['touch {MARKER}']", "!!python/name:os.system", "!!binary aGVsbG8=",
    "!!set {a, b}", "!!timestamp 2001-12-14", "!!timestamp 2001-13-45", "!!float abc", "!!int 1.5", "!!str 3",
    "!!omap [a: 1]", "!!null x", "!unknown x", "!!map [1]", "!!seq {a: 1}", "!<tag:yaml.org,2002:int> 7"])


def aliases(levels: int) -> str:
    """Ten lists of ten aliases, each of the one before: 10^levels values from a line of text."""
    text, name = "&l0 [x,x,x,x,x,x,x,x,x,x]", "l0"
    for level in range(1, levels):
        text += f", &l{level} [{', '.join([f'*{name}'] * 10)}]"
        name = f"l{level}"
    return f"[{text}]"


alias_values = st.sampled_from(["&a [*a]", "&a {k: *a}", "*nothing", "&a 1", "[&a x, *a, *a]"]) | \
    st.integers(2, 9).map(aliases)
deep_values = st.tuples(st.integers(10, 6000), st.sampled_from(["[", "{a: ", "- ", "[{b: "])).map(
    lambda t: t[1] * t[0] + ("]" * t[0] if t[1] == "[" else ""))
interpolations = st.sampled_from(["${oc.env:HOME}", "${train.lr}", "${nope}", "${", "}", "${oc.decode:'[1,2]'}",
                                  "${oc.create:{a: 1}}", "\\${train.lr}", "${oc.env:NO_SUCH_VARIABLE_HERE}",
                                  "${oc.select:train.lr,1}", "$", "${${x}}", "${.}", "${..}"])
odd_text = st.text(st.characters(codec=None, blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["\udcff", "a\nb", "\r", "\x00", "\u2028", "'", '"', "it's \"mine\"", "\\", "%s%n", "${", "\t", " ", "#", "-", "?",
     "a: b", "- x", "*", "&", "!", "|\n  text", ">-\n x", "---", "...", "@", "`", "{", "[", "]", "}", "\ufeff"])


def token(keys, values) -> st.SearchStrategy[str]:
    return st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}")


known = st.sampled_from(KEYS)
SETTINGS_KINDS = {
    "known key, value of another type": token(known, json_values.map(json.dumps)),
    "known key, number out of range": token(st.sampled_from(NUMBER_KEYS), numbers),
    "known key, nan or inf": token(st.sampled_from(NUMBER_KEYS), st.sampled_from(
        [".nan", ".inf", "-.inf", "1e999", "-1e999", "!!float nan", "!!float inf", "nan", "NaN", "inf"])),
    "known key, empty value": token(known, st.sampled_from(["", " ", "''", '""', "~", "null", "Null", "[]", "{}"])),
    "unknown key": token(st.text(max_size=20) | st.text(st.characters(codec="utf-8"), max_size=20), st.just("1")),
    "nested and stray dots": token(known.map(lambda k: k + ".x") | known.map(lambda k: "." + k)
                                   | known.map(lambda k: k.replace(".", "..")) | st.sampled_from(SECTIONS)
                                   | st.sampled_from([s + "." for s in SECTIONS] + [".", "..", "task.x"]), st.just("1")),
    "malformed token": st.sampled_from(["", "=", "==", "=1", "epochs", " ", "train.epochs", "=train.epochs=1",
                                        "train.epochs==1", "train epochs=1", "\n=1", "--train.epochs=1", "-h=1"])
    | st.text(st.characters(blacklist_characters="="), max_size=10),
    "unicode and control characters in a value": token(known, odd_text),
    "names with quotes and odd characters": token(st.sampled_from(NAME_KEYS), odd_text),
    "YAML tags": token(known, yaml_tags),
    "YAML aliases, one holding itself or multiplying": token(known, alias_values),
    "deep nesting": token(known, deep_values),
    "huge integers": token(known, st.integers(20, 6000).map(lambda n: "9" * n)),
    "interpolations": token(known, interpolations),
    "task names": token(st.just("task"), st.sampled_from(TASKS).map(str.upper) | odd_text | json_values.map(json.dumps)
                        | st.sampled_from(["", "mae ", "mae\n", "Mae", "classification.x"])),
    "arbitrary text": st.text(max_size=30),
}


@pytest.mark.parametrize("kind", list(SETTINGS_KINDS))
@hostile_settings(examples=25, deadline_ms=5000)
@given(draws=st.data())
def test_generated_settings_are_built_or_refused_in_one_line(kind, draws):
    argv = draws.draw(st.lists(SETTINGS_KINDS[kind], min_size=1, max_size=3), label="hostile")
    argv += draws.draw(st.lists(token(st.just("train.epochs"), st.integers(1, 5).map(str)) | st.sampled_from(
        [f"task={t}" for t in TASKS] + ["data.classes=[no,sphere,vort]", "train.lr=1e-3"]), max_size=2), label="fine")
    argv = draws.draw(st.permutations(argv), label="argv")
    built = []
    error = user_error("build", lambda: built.append(config.build(*_parsed(argv))))
    assert not os.path.exists(MARKER), "a setting ran code"
    if error is None:  # what a Ray worker does with it: rebuilt from a plain dict, the same config
        assert config.from_dict(config.to_dict(built[0])) == built[0]


def _parsed(argv):
    task, overrides = config.parse_cli(argv)
    return task, [overrides]


# ---------------------------------------------------------------------------------------------
# Search-space files through space.load
# ---------------------------------------------------------------------------------------------

SPACE_TASKS = ["classification", "mae"]
SPACE_KEYS = sorted(set(DEFAULTS["classification"]) | set(DEFAULTS["mae"]))
bounds = st.integers(-10**30, 10**30) | st.floats() | st.sampled_from(["1e-4", "x", "", "nan", "-inf", "1e999"]) \
    | st.none() | st.booleans() | st.lists(st.integers(), max_size=2) | st.just({"a": 1})
distribution = st.sampled_from(space.DISTRIBUTIONS)
range_args = st.lists(bounds, min_size=2, max_size=2) | st.lists(bounds, max_size=4) | bounds
choice_args = st.lists(json_values, max_size=4) | json_values
spec = st.one_of(
    st.tuples(distribution, range_args).map(lambda t: {t[0]: t[1]}),
    st.tuples(st.just("choice"), choice_args).map(lambda t: {t[0]: t[1]}),
)
search_key = st.sampled_from(SPACE_KEYS)
odd_keys = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)


def dumped(value) -> str:
    return yaml.safe_dump(value, allow_unicode=True, sort_keys=False)


SPACE_KINDS = {
    "valid YAML of any structure": json_values.map(dumped),
    "invalid YAML": st.text(max_size=60) | st.sampled_from([
        "search:\n\ttrain.lr: 1\n", "search: {train.lr: {uniform: [0.1, 0.2]}\n", "fixed:\n  a: 1\n b: 2\n",
        "search:\n  train.lr: {uniform: [0.1, 0.2]}\n  train.lr: {uniform: [0.1, 0.3]}\n", "- a\nb: 1\n",
        "search: &a\n  x: *b\n", "%YAML 9.9\n---\na: 1\n", "? [a, b]\n: 1\n", "search: !!python/object:os.system {}\n"]),
    "bytes that are not UTF-8": st.binary(max_size=60).map(lambda b: b"search:\n  train.lr: " + b + b"\xff\xfe"),
    "unknown sections": st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=3).map(dumped),
    "sections of the wrong type": st.tuples(st.sampled_from(["fixed", "search"]), json_values).map(
        lambda t: dumped({t[0]: t[1]})),
    "keys that are not names": st.tuples(st.sampled_from(["fixed", "search"]), odd_keys, spec).map(
        lambda t: dumped({t[0]: {t[1]: t[2] if t[0] == "search" else 1}})),
    "unknown distributions": st.tuples(search_key, st.text(max_size=10), range_args).map(
        lambda t: dumped({"search": {t[0]: {t[1]: t[2]}}})),
    "arguments of the wrong type or length": st.tuples(search_key, distribution, range_args).map(
        lambda t: dumped({"search": {t[0]: {t[1]: t[2]}}})),
    "huge, negative, reversed, equal and non-finite ranges": st.tuples(
        st.sampled_from([k for k in SPACE_KEYS if k in NUMBER_KEYS]), st.sampled_from(["uniform", "loguniform", "int"]),
        st.integers(-10**30, 10**30) | st.floats(), st.integers(-10**30, 10**30) | st.floats()).map(
        lambda t: dumped({"search": {t[0]: {t[1]: [t[2], t[3]]}}})),
    "choices of odd values": st.tuples(search_key, choice_args).map(
        lambda t: dumped({"search": {t[0]: {"choice": t[1]}}})),
    "when: conditions that refer to nothing": st.one_of(
        st.tuples(search_key, spec, st.text(max_size=10) | search_key, json_values).map(
            lambda t: dumped({"search": {t[0]: {**t[1], "when": {t[2]: t[3]}}}})),
        st.tuples(search_key, spec, st.text(max_size=20)).map(
            lambda t: dumped({"search": {t[0]: {**t[1], "when": t[2]}}})),
        st.tuples(search_key, spec, json_values).map(lambda t: dumped({"search": {t[0]: t[1]}, "when": t[2]}))),
    "fixed values of the wrong type or out of range": st.dictionaries(search_key, json_values | bounds, max_size=3).map(
        lambda fixed: dumped({"fixed": fixed})),
    "unknown keys": st.tuples(st.text(max_size=15) | search_key.map(lambda k: k + ".x"), spec).map(
        lambda t: dumped({"search": {t[0]: t[1]}})),
    "aliases and deep nesting": st.one_of(
        alias_values.map(lambda v: f"fixed:\n  data.classes: {v}\n"),
        st.just("search: &s {train.lr: *s}\n"),
        deep_values.map(lambda v: f"fixed:\n  train.lr: {v}\n")),
    "empty, comments only, a scalar or a list": st.sampled_from(
        ["", "\n", "# nothing\n", "3", "~", "[]", "- a\n", "fixed:\n", "search:\n", "---\n...\n", "---\na: 1\n---\nb: 2\n"]),
}


@pytest.fixture(scope="module")
def workdir():
    folder = tempfile.mkdtemp(prefix="hostile-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("kind", list(SPACE_KINDS))
@hostile_settings(examples=15, deadline_ms=10000)
@given(draws=st.data())
def test_generated_search_spaces_load_or_are_refused_in_one_line(kind, draws, workdir):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    content = draws.draw(SPACE_KINDS[kind], label="content")
    task = draws.draw(st.sampled_from(SPACE_TASKS), label="task")
    path = os.path.join(workdir, "space.yaml")
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    loaded = []
    error = user_error("load", lambda: loaded.append(space.load(path, task)))
    if error is not None:
        assert path in str(error)
        return
    # What loaded is what Optuna can search and what every trial can build.
    trial = optuna.create_study().ask()
    space.sample(trial, loaded[0].params)
    user_error("a trial's config", lambda: config.build(task, [loaded[0].fixed, trial.params]))
    assert not os.path.exists(MARKER), "a search-space file ran code"


# ---------------------------------------------------------------------------------------------
# .npy files through the DeepLense folder reader and platform.predict's
# ---------------------------------------------------------------------------------------------

SHAPE = (1, 8, 8)  # the shape of the good files around the hostile one


def _unpickled(marker: str) -> None:
    """What a pickle in a data file would run if it were ever unpickled."""
    with open(marker, "w") as f:
        f.write("a data file ran code")


class Payload:
    def __reduce__(self):
        return _unpickled, (MARKER,)


def npy(array, **kw) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kw)
    return buffer.getvalue()


def npy_header(fields: str, version: tuple = (1, 0)) -> bytes:
    """A .npy header holding ``fields`` as its dict text, padded as np.save pads it."""
    text = fields.encode("utf-8", "surrogatepass")
    length_bytes = 2 if version[0] == 1 else 4
    text += b" " * ((-(8 + length_bytes + len(text) + 1)) % 64) + b"\n"
    return b"\x93NUMPY" + bytes(version) + len(text).to_bytes(length_bytes, "little") + text


class Hostile:
    """One hostile file: its bytes (a sparse tail up to ``size``), or something that is not a file."""

    def __init__(self, content: bytes = b"", size: int = 0, special: str = ""):
        self.content, self.size, self.special = content, size, special

    def __repr__(self):
        what = self.special or f"{len(self.content)} bytes {self.content[:120]!r}"
        return f"Hostile({what}{f', sparse to {self.size}' if self.size else ''})"

    def write(self, path: str) -> None:
        if self.special == "directory":
            os.mkdir(path)
        elif self.special == "dangling link":
            os.symlink(path + ".gone", path)
        else:
            with open(path, "wb") as f:
                f.write(self.content)
                if self.size:
                    f.truncate(self.size)  # a hole: no disk used, but np.load would read (allocate) it all


@st.composite
def pixels(draw, shape=SHAPE, dtype=np.float64) -> np.ndarray:
    """Pixels a good file could hold: in [0, 1], not constant."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.random(shape).astype(dtype)


def as_bytes(strategy, **kw):
    return strategy.map(lambda array: Hostile(npy(array, **kw)))


@st.composite
def with_bad_pixels(draw) -> Hostile:
    array = draw(pixels())
    for _ in range(draw(st.integers(1, 5))):
        array.flat[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return Hostile(npy(array.astype(draw(st.sampled_from([np.float64, np.float32, np.float16])))))


@st.composite
def gigantic_header(draw, sparse: bool) -> Hostile:
    dtype = draw(st.sampled_from(["<f8", "<f4", ">f8", "<c16", "|u1"]))
    if sparse:  # just over the limit of one image: a hole of 1-4 GiB
        itemsize = np.dtype(dtype).itemsize
        side = math.isqrt(draw(st.integers(folders.MAX_IMAGE_BYTES, 4 * 2**30)) // itemsize) + 1
        shape = (1, side, side)
    else:
        shape = tuple(draw(st.lists(st.integers(2**20, 2**62), min_size=1, max_size=4)))
    header = npy_header(repr({"descr": dtype, "fortran_order": False, "shape": shape}), draw(
        st.sampled_from([(1, 0), (2, 0), (3, 0)])))
    size = len(header) + math.prod(shape) * np.dtype(dtype).itemsize if sparse else 0
    return Hostile(header + draw(st.binary(max_size=64)), size=size)


header_fields = st.one_of(
    st.text(max_size=80),
    st.fixed_dictionaries({"descr": st.text(max_size=10) | st.sampled_from(["<f8", "O", "|O", "<U4", "V8", "<f8,<i4"]),
                           "fortran_order": st.booleans() | st.integers() | st.none(),
                           "shape": st.lists(st.integers(-5, 10), max_size=4).map(tuple) | st.integers()
                           | st.none()}).map(repr),
    st.sampled_from(["{}", "{'descr': '<f8'}", f"{{'descr': \"__import__('os').system('touch {MARKER}')\", "
                     "'fortran_order': False, 'shape': (1,)}", "{'descr': '<f8', 'fortran_order': False, 'shape': (-1, 8)}",
                     "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 8, 8), 'extra': 1}", "[1, 2]", "(" * 500]))

NPY_KINDS = {
    "a truncated file": st.tuples(pixels(), st.integers(0, 10**6)).map(
        lambda t: Hostile(npy(t[0])[:t[1] % len(npy(t[0]))])),
    "integer pixels": st.tuples(pixels(), st.sampled_from(["i1", "i2", "<i4", ">i8", "u1", "u2", "u4", "u8"])).map(
        lambda t: Hostile(npy((t[0] * 255).astype(t[1])))),
    "complex pixels": as_bytes(pixels(dtype=np.complex64) | pixels(dtype=np.complex128)),
    "boolean pixels": pixels().map(lambda a: Hostile(npy(a > 0.5))),
    "half, big-endian and long-double floats (good pixels)": st.tuples(pixels(), st.sampled_from(
        ["<f2", ">f2", ">f4", ">f8", np.longdouble])).map(lambda t: Hostile(npy(t[0].astype(t[1])))),
    "a pickled object array": st.sampled_from([np.array([Payload()], dtype=object),
                                               np.array([[Payload(), 1.0]], dtype=object)]).map(
        lambda a: Hostile(npy(a, allow_pickle=True))),
    "a pickle, not a .npy file": st.sampled_from([Payload(), [Payload()], {"image": Payload()}]).map(
        lambda obj: Hostile(pickle.dumps(obj))),
    "a structured array": st.just(Hostile(npy(np.zeros(SHAPE, dtype=[("a", "<f8"), ("b", "<i4")])))),
    "strings, bytes and dates": st.sampled_from([np.full(SHAPE, "x"), np.full(SHAPE, b"x"),
                                                 np.zeros(SHAPE, "datetime64[s]"), np.zeros(SHAPE, "timedelta64[s]"),
                                                 np.zeros(SHAPE, "V8")]).map(lambda a: Hostile(npy(a))),
    "too few or too many dimensions": st.lists(st.integers(1, 5), max_size=5).filter(lambda s: len(s) not in (2, 3)).map(
        lambda shape: Hostile(npy(np.random.default_rng(0).random(shape)))),
    "a dimension of size zero": st.sampled_from([(0, 8), (8, 0), (1, 0, 8), (0, 8, 8), (1, 8, 0)]).map(
        lambda shape: Hostile(npy(np.zeros(shape)))),
    "another shape than its neighbours": st.sampled_from(
        [(1, 8, 9), (1, 16, 16), (3, 8, 8), (2, 8, 8), (9, 8), (1, 1, 1)]).map(
        lambda shape: Hostile(npy(np.random.default_rng(1).random(shape)))),
    "NaN and infinite pixels": with_bad_pixels(),
    "a blank image": st.tuples(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([(1, 8, 8), (8, 8)])).map(
        lambda t: Hostile(npy(np.full(t[1], t[0])))),
    "pixels far outside [0, 1] or beyond float32": st.tuples(pixels(), st.floats(2.0, 1e308), st.floats(-1e308, 1e308)).map(
        lambda t: Hostile(npy(_scaled(*t)))),
    "a header length longer than the file": st.tuples(
        st.sampled_from([(1, 0), (2, 0), (3, 0)]), st.integers(100, 2**32 - 1)).map(
        lambda t: Hostile(b"\x93NUMPY" + bytes(t[0]) + (t[1] % (2**16 if t[0][0] == 1 else 2**32)).to_bytes(
            2 if t[0][0] == 1 else 4, "little") + b"{'descr'")),
    "a header claiming a gigantic shape": gigantic_header(sparse=False),
    "a gigantic shape in a sparse file": gigantic_header(sparse=True),
    "a garbled header": st.tuples(header_fields, st.sampled_from([(1, 0), (2, 0), (3, 0)]), st.binary(max_size=600)).map(
        lambda t: Hostile(npy_header(t[0], t[1]) + t[2])),
    "an unknown format version": st.tuples(st.integers(0, 255), st.integers(0, 255), pixels()).filter(
        lambda t: t[0] not in (1, 2, 3)).map(lambda t: Hostile(npy(t[2])[:6] + bytes([t[0], t[1]]) + npy(t[2])[8:])),
    "an .npz archive under a .npy name": pixels().map(lambda a: Hostile(_npz(a))),
    "a corrupt zip": st.binary(max_size=200).map(lambda b: Hostile(b"PK\x03\x04" + b)),
    "random bytes": st.binary(max_size=400).map(Hostile),
    "an empty file": st.just(Hostile(b"")),
    "not a file: a directory or a dangling link": st.sampled_from(["directory", "dangling link"]).map(
        lambda s: Hostile(special=s)),
}


def _scaled(array, scale: float, shift: float) -> np.ndarray:
    with np.errstate(over="ignore"):  # past float64's range is inf: another kind of bad pixel
        return array * scale + shift


def _npz(array) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, image=array)
    return buffer.getvalue()


GOOD = [(split, name, i) for split in ("train", "val") for name in ("no", "sphere", "vort") for i in range(2)]


@pytest.mark.parametrize("kind", list(NPY_KINDS))
@hostile_settings(examples=8, deadline_ms=20000)
@given(draws=st.data())
def test_generated_npy_files_are_read_or_named_in_one_line(kind, draws, workdir):
    hostile, where = draws.draw(NPY_KINDS[kind], label="hostile"), draws.draw(st.sampled_from(GOOD), label="where")
    root = tempfile.mkdtemp(dir=workdir)
    try:
        tracemalloc.start()
        try:
            _read_everywhere(root, hostile, where)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MB allocated for an 8x8 image"  # never what a header claims
        assert not os.path.exists(MARKER), "a data file ran code"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _read_everywhere(root: str, hostile: Hostile, where: tuple) -> None:
    """A class-folder layout of good files and one hostile one, read as a file alone, as a DeepLense
    folder (``data.from_folder``) and as ``platform.predict``'s unlabelled folder."""
    rng = np.random.default_rng(0)
    layout = os.path.join(root, "real")
    for split, name, i in GOOD:
        os.makedirs(os.path.join(layout, split, name), exist_ok=True)
        np.save(os.path.join(layout, split, name, f"{i}.npy"), rng.random(SHAPE))
    relative = os.path.join(where[0], where[1], f"{where[2]}.npy")
    path = os.path.join(layout, relative)
    os.remove(path)
    hostile.write(path)

    alone = []
    error = user_error("the file alone", lambda: alone.append(folders.checked_image(folders.load_npy(path), path, None)))
    assert error is None or path in str(error), error
    if error is None:  # a clean success: float32 (C, H, W), finite, not blank
        image = alone[0]
        assert image.dtype == np.float32 and image.ndim == 3 and np.isfinite(image).all() and image.min() < image.max()

    splits = []
    error = user_error("from_folder", lambda: splits.append(data.from_folder(layout, ["no", "sphere", "vort"],
                                                              os.path.join(root, "cache"), shard_size=4)))
    assert error is None or relative in str(error), error
    if error is None:  # the file's pixels are what was converted
        rows = {split: shards_lib.read(s) for split, s in splits[0].items()}
        (images, row), = [(images, list(columns["file"]).index(relative)) for images, columns in rows.values()
                          if relative in list(columns["file"])]
        np.testing.assert_array_equal(images[row], alone[0])

    error = user_error("predict", lambda: predict.checked_shape(predict.image_files(layout)))
    assert error is None or relative in str(error), error


HOSTILE_KINDS = 56  # README.md, "When things fail": the kinds of bad input these tests try, each on every run


def test_the_kinds_of_bad_input_are_counted():
    counts = {"settings": len(SETTINGS_KINDS), "search spaces": len(SPACE_KINDS), ".npy files": len(NPY_KINDS)}
    print(f"{sum(counts.values())} kinds of bad input: {counts}")
    assert sum(counts.values()) == HOSTILE_KINDS, f"update HOSTILE_KINDS and README.md: {counts}"
