"""The generator: KernelSpec -> deterministic source -> hash-named module in the cache dir -> memoized import."""
from __future__ import annotations

import ast
import itertools
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jinja2
import pytest
import torch

import flashcore
from flashcore import cli, ops
from flashcore.generator import KernelSpec, add_template_dir, cache_dir, load, render, source_hash, spec_version

FEATURES = dict(arch=0, dtype="fp16", head_dim=64, causal=False, window=False, softcap=False, alibi=False, gqa_group=1,
                tma=False)


def spec_with(**changes) -> KernelSpec:
    return KernelSpec.make("attn_fwd", **{**FEATURES, **changes})


def constant_line(src: str, name: str) -> str:
    """The module-level line that defines `name` (without its comment), e.g. 'HEAD_DIM = tl.constexpr(80)'."""
    lines = [ln for ln in src.splitlines() if ln.startswith(name) and "=" in ln]
    assert len(lines) == 1, f"expected one definition of {name}, got {lines}"
    return lines[0].split("#")[0].strip()


def body(text: str) -> str:
    """The source without the header line (which spells out the spec)."""
    return text.split("\n", 1)[1]


# ---------------------------------------------------------------------------------------------------------------
# KernelSpec

def test_spec_is_canonical_and_hashable():
    a = KernelSpec.make("attn_fwd", causal=True, head_dim=64, dtype="fp16")
    b = KernelSpec.make("attn_fwd", dtype="fp16", head_dim=64, causal=True)
    assert a == b and hash(a) == hash(b) and a.key() == b.key() and str(a) == str(b)
    assert {a: 1}[b] == 1
    assert a["head_dim"] == 64
    with pytest.raises(KeyError):
        a["softcap"]
    assert KernelSpec.from_key(a.key()) == a
    assert a != KernelSpec.make("attn_fwd", dtype="fp16", head_dim=64, causal=False)


@pytest.mark.parametrize("value", [1.5, None, [1], (1,)])
def test_spec_rejects_non_scalar_features(value):
    with pytest.raises(TypeError, match="head_dim"):
        KernelSpec.make("attn_fwd", head_dim=value)


# ---------------------------------------------------------------------------------------------------------------
# rendering

def test_render_is_deterministic():
    spec = spec_with(causal=True, head_dim=80)
    render.cache_clear()             # render from the template twice, not from the memo
    first = render(spec)
    render.cache_clear()
    second = render(spec)
    assert first == second
    assert source_hash(spec) == source_hash(spec_with(head_dim=80, causal=True))
    # the same spec built with its features in another order
    reordered = KernelSpec.make("attn_fwd", **dict(reversed(list({**FEATURES, "causal": True, "head_dim": 80}.items()))))
    assert render(reordered) == first and source_hash(reordered) == source_hash(spec)


def test_render_is_deterministic_across_processes():
    """Another interpreter (other hash seed) renders byte-identical source: the hash keys files and the DB."""
    spec = spec_with(window=True, softcap=True, gqa_group=4)
    code = textwrap.dedent(f"""
        from flashcore import ops
        from flashcore.generator import KernelSpec, source_hash
        spec = KernelSpec.from_key({spec.key()!r})
        print(source_hash(spec), ops.get("attn_fwd").version_of(spec))
    """)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=str(Path(__file__).resolve().parent.parent)).stdout.split()
    assert out == [source_hash(spec), ops.get("attn_fwd").version_of(spec)]


def test_dtype_changes_hash():
    """fp16 and bf16 may share their code, never their module: the dtype is in the spec and the hash."""
    hashes = {source_hash(spec_with(dtype=d)) for d in ("fp16", "bf16", "fp32")}
    assert len(hashes) == 3


@pytest.mark.parametrize("feature,value", [
    ("dtype", "fp32"), ("head_dim", 80), ("head_dim", 128), ("causal", True), ("window", True),
    ("softcap", True), ("alibi", True), ("gqa_group", 4), ("tma", True),
])
def test_different_features_different_source(feature, value):
    base, other = spec_with(), spec_with(**{feature: value})
    assert source_hash(base) != source_hash(other)
    # the code itself differs, not only the header that names the spec
    assert body(render(base)) != body(render(other)), f"{feature}={value} renders the same kernel code"


def test_arch_changes_hash():
    """arch is in the spec: another GPU gets another module (and tuning key), even with the same code."""
    assert source_hash(spec_with(arch=90)) != source_hash(spec_with(arch=80))


def test_the_version_is_the_hash_of_the_code_the_spec_runs():
    """A spec's version hashes the source of every kernel its op renders for it: specs of different code differ."""
    fwd = ops.get("attn_fwd")
    spec = spec_with(causal=True)
    assert fwd.version_of(spec) == spec_version(spec, ("attn_fwd",))
    assert fwd.version_of(spec) != fwd.version_of(spec_with(causal=False))


def test_the_host_policy_is_part_of_the_version():
    """attn_decode's records with num_splits=0 mean its split heuristic, and the host picks the combine's slice and
    the paged table chunk around a record's tiles: a change of any of them stales the records."""
    import dataclasses
    from flashcore.ops.attn_decode import host
    decode = ops.get("attn_decode")
    spec = decode.spec_of(ops.parse_call(decode, []), 90)
    assert decode.host_policy and decode.version_of(spec) != spec_version(spec, decode.kernels)
    assert f"{host.COMBINE_D} {host.TABLE_ENTRIES}\n" in decode.host_policy
    for rule in ("split_heuristic", "merge_inline", "table_chunk", "paged_chunks"):
        assert f"def {rule}(" in decode.host_policy
    assert dataclasses.replace(decode, host_policy=decode.host_policy + " ").version_of(spec) != decode.version_of(spec)


def toy_op(name: str, kernels: tuple[str, ...]) -> ops.Op:
    """An op of toy templates, enough for its versions."""
    return ops.Op(name=name, kernels=kernels, call_type=object, axes=(), tunables=(), default_config=lambda spec: {},
                  spec_of=lambda call, cc: None)


def edit(path: Path, text: str) -> None:
    """Edit a template file as a developer would, and forget what this process rendered. (The mtime moves a second
    on: Jinja reloads a template whose mtime changed, and two writes may fall in one timestamp tick.)"""
    mtime = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    render.cache_clear()
    spec_version.cache_clear()


SHARED = """{% macro body() %}
{% if wide %}
    return x * 2
{% else %}
    return x + 1
{% endif %}
{% endmacro %}
"""


def toy_templates(folder: Path, prefix: str) -> Path:
    """<prefix>_a (uses the shared macro file's body(), whose code depends on the feature `wide`) and <prefix>_b
    (plain) under `folder`; returns the macro file."""
    (folder / "macros").mkdir()
    macro = folder / "macros" / f"{prefix}_shared.jinja"
    macro.write_text(SHARED)
    (folder / f"{prefix}_a.py.jinja").write_text(
        f'{{% from "macros/{prefix}_shared.jinja" import body with context %}}\ndef f(x):\n{{{{ body() }}}}')
    (folder / f"{prefix}_b.py.jinja").write_text("def g(x):\n    return x\n")
    add_template_dir(folder)
    return macro


def test_a_macro_edit_that_renders_the_same_code_keeps_the_records(tmp_path):
    """Adding a macro to a shared file (a new kernel's), or editing a comment, leaves the source every spec of the
    ops importing it renders as it was: their versions, which key their tuning records, stay."""
    macro = toy_templates(tmp_path, "kept")
    op = toy_op("kept", ("kept_a", "kept_b"))
    specs = [KernelSpec.make("kept", wide=w) for w in (False, True)]
    before = [op.version_of(s) for s in specs]
    assert before[0] != before[1]
    edit(macro, "{# shared by kept_a and a new kernel #}\n" + SHARED
         + "{% macro other() %}\n    return x - 1\n{% endmacro %}\n")
    assert [op.version_of(s) for s in specs] == before


def test_a_macro_edit_stales_exactly_the_specs_whose_code_it_changes(tmp_path):
    """Editing the macro's code for wide=True changes that spec's version, not wide=False's (which renders the same
    code), and not that of an op whose kernels do not import the macro; an op of two kernels hashes both."""
    macro = toy_templates(tmp_path, "split")
    both, plain = toy_op("split", ("split_a", "split_b")), toy_op("plain", ("split_b",))
    wide, narrow = KernelSpec.make("split", wide=True), KernelSpec.make("split", wide=False)
    before = {s: (both.version_of(s), plain.version_of(s)) for s in (wide, narrow)}
    assert toy_op("one", ("split_a",)).version_of(wide) != before[wide][0]
    edit(macro, SHARED.replace("x * 2", "x * 3"))
    assert "x * 3" in render(wide, "split_a")
    assert both.version_of(wide) != before[wide][0] and plain.version_of(wide) == before[wide][1]
    assert (both.version_of(narrow), plain.version_of(narrow)) == before[narrow]


def test_every_variant_renders_valid_python():
    """Every combination of structural features renders to source that parses, with the right constants."""
    count = 0
    for dtype, head_dim, causal, window, softcap, alibi, tma, group in itertools.product(
            ("fp16", "bf16", "fp32"), (16, 64, 80, 96, 192, 256), (False, True), (False, True), (False, True),
            (False, True), (False, True), (1, 8)):
        spec = spec_with(dtype=dtype, head_dim=head_dim, causal=causal, window=window, softcap=softcap, alibi=alibi,
                         tma=tma, gqa_group=group)
        src = render(spec)
        ast.parse(src, filename=str(spec))
        block_d = 1 << (head_dim - 1).bit_length()
        assert re.search(rf"\b{head_dim}\b", constant_line(src, "HEAD_DIM"))
        assert re.search(rf"\b{block_d}\b", constant_line(src, "BLOCK_D"))
        assert re.search(rf"\b{group}\b", constant_line(src, "GQA_GROUP"))
        assert ("ieee" in constant_line(src, "DOT_PRECISION")) == (dtype == "fp32"), "fp32 needs ieee products"
        assert "{{" not in src and "{%" not in src and "{#" not in src
        count += 1
    assert count == 3 * 6 * 2 ** 5 * 2


def test_strict_undefined_missing_feature():
    """A feature the template uses but the spec lacks is an error, never a silent empty string / False."""
    for missing in ("head_dim", "softcap", "causal", "gqa_group", "dtype", "tma", "window", "alibi"):
        features = {k: v for k, v in FEATURES.items() if k != missing}
        with pytest.raises(jinja2.UndefinedError, match=missing):
            render(KernelSpec.make("attn_fwd", **features))


def test_unknown_template():
    with pytest.raises(jinja2.TemplateNotFound):
        render(KernelSpec.make("no_such_template", **FEATURES))


# ---------------------------------------------------------------------------------------------------------------
# cache dir and load

def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHCORE_CACHE_DIR", str(tmp_path / "kc"))
    assert cache_dir() == tmp_path / "kc"
    monkeypatch.delenv("FLASHCORE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "flashcore" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "flashcore" / "kernels"


def test_session_cache_dir_is_used(cache_dir):
    """conftest points FLASHCORE_CACHE_DIR at a per-session temp dir; kernels land there, not in ~/.cache."""
    from flashcore.generator import cache_dir as current
    assert os.environ["FLASHCORE_CACHE_DIR"] == cache_dir
    assert current() == Path(cache_dir)


def test_load_writes_module_to_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHCORE_CACHE_DIR", str(tmp_path))
    spec = spec_with(gqa_group=101, head_dim=48)          # a spec no other test loads (load is memoized)
    module = load(spec)
    path = tmp_path / f"attn_fwd_{source_hash(spec)}.py"
    assert path.is_file()
    assert path.read_text() == render(spec)
    assert Path(module.__file__) == path
    assert hasattr(module, "attn_fwd") and module.GQA_GROUP == 101
    assert not list(tmp_path.glob(".tmp_*")), "no temp files left behind"


def test_load_repairs_a_stale_file(monkeypatch, tmp_path):
    """A file with the right name but other content (a torn write, an edit) is rewritten, not imported."""
    monkeypatch.setenv("FLASHCORE_CACHE_DIR", str(tmp_path))
    spec = spec_with(gqa_group=102, head_dim=48)
    path = tmp_path / f"attn_fwd_{source_hash(spec)}.py"
    path.write_text("raise RuntimeError('stale kernel module imported')\n")
    module = load(spec)
    assert path.read_text() == render(spec)
    assert module.GQA_GROUP == 102


def test_load_memoizes(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHCORE_CACHE_DIR", str(tmp_path))
    spec = spec_with(gqa_group=103, head_dim=48)
    first = load(spec)
    path = Path(first.__file__)
    path.unlink()                                         # a second load must not touch the file system
    assert load(spec) is first
    assert not path.exists()
    assert load(spec_with(gqa_group=103, head_dim=48)) is first   # equal spec, same module
    assert load(spec_with(gqa_group=104, head_dim=48)) is not first


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write to; skipped where chmod does not stop it (root)."""
    path = tmp_path / "read_only"
    path.mkdir()
    path.chmod(0o555)
    if os.access(path, os.W_OK):
        path.chmod(0o755)
        pytest.skip("chmod does not make a directory read-only for this user (root)")
    yield path
    path.chmod(0o755)                                     # let pytest remove it


@pytest.mark.parametrize("unwritable,groups", [("read-only dir", (105, 106)), ("path under a file", (107, 108))],
                         ids=["read-only dir", "path under a file"])
def test_load_falls_back_when_cache_dir_is_unwritable(monkeypatch, request, tmp_path, unwritable, groups):
    """The kernel is written to a private temp dir instead, with one warning naming the dir and the env var; the
    model never sees an OSError. The dir is a read-only one, or one that cannot be created because its parent is a
    regular file (holds even for root). Each case loads specs of its own (load is memoized)."""
    if unwritable == "read-only dir":
        unwritable_cache = request.getfixturevalue("read_only_dir")
    else:
        (tmp_path / "a_file").write_text("")
        unwritable_cache = tmp_path / "a_file" / "kernels"
    monkeypatch.setenv("FLASHCORE_CACHE_DIR", str(unwritable_cache))
    first_spec, second_spec = (spec_with(gqa_group=g, head_dim=48) for g in groups)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")                   # count every warning issued, not only the first
        first, second = load(first_spec), load(second_spec)
    assert first.GQA_GROUP == groups[0] and hasattr(first, "attn_fwd")
    assert second.GQA_GROUP == groups[1]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert str(unwritable_cache) in messages[0] and "FLASHCORE_CACHE_DIR" in messages[0]
    fallback = Path(first.__file__).parent
    assert Path(second.__file__).parent == fallback, "one fallback dir per unwritable cache dir"
    assert fallback != unwritable_cache and str(fallback) in messages[0]
    assert Path(first.__file__).read_text() == render(first_spec)
    assert fallback.stat().st_mode & 0o077 == 0, "modules are imported from it: private to this user"
    assert not unwritable_cache.exists() or not any(unwritable_cache.iterdir())


def test_load_reads_a_read_only_cache(monkeypatch, read_only_dir):
    """A read-only cache that already holds the kernel serves it, with no warning."""
    spec = spec_with(gqa_group=109, head_dim=48)
    read_only_dir.chmod(0o755)
    (read_only_dir / f"attn_fwd_{source_hash(spec)}.py").write_text(render(spec))
    read_only_dir.chmod(0o555)
    monkeypatch.setenv("FLASHCORE_CACHE_DIR", str(read_only_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = load(spec)
    assert Path(module.__file__) == read_only_dir / f"attn_fwd_{source_hash(spec)}.py"
    assert module.GQA_GROUP == 109


# ---------------------------------------------------------------------------------------------------------------
# CLI

def test_cli_gen_show(capsys):
    assert cli.main(["gen", "--gpu", "h100", "--show", "head_dim=80"]) == 0
    out = capsys.readouterr().out
    spec = KernelSpec.make("attn_fwd", arch=90, dtype="bf16", head_dim=80, causal=False, window=False,
                           softcap=False, alibi=False, gqa_group=1, tma=False)
    assert out == render(spec)
    assert re.search(r"\b80\b", constant_line(out, "HEAD_DIM"))
    assert re.search(r"\b128\b", constant_line(out, "BLOCK_D"))
    ast.parse(out)


def test_cli_gen_show_features(capsys):
    assert cli.main(["gen", "--gpu", "h100", "--show", "head_dim=64", "causal=true", "softcap=True",
                     "gqa_group=4", "dtype=fp16"]) == 0
    out = capsys.readouterr().out
    spec = KernelSpec.make("attn_fwd", arch=90, dtype="fp16", head_dim=64, causal=True, window=False,
                           softcap=True, alibi=False, gqa_group=4, tma=True)      # what an H100 runs: tensor descriptors
    assert out == render(spec)


def test_cli_gen_module_path(capsys, cache_dir):
    assert cli.main(["gen", "--gpu", "h100", "head_dim=96"]) == 0
    out = capsys.readouterr().out
    spec = KernelSpec.make("attn_fwd", arch=90, dtype="bf16", head_dim=96, causal=False, window=False,
                           softcap=False, alibi=False, gqa_group=1, tma=False)
    assert str(spec) in out
    assert str(Path(cache_dir) / f"attn_fwd_{source_hash(spec)}.py") in out


def test_cli_info(capsys, interpret):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flashcore ")
    assert ("interpreter" in out) == interpret
    assert "kernel cache:" in out


@pytest.mark.parametrize("argv, message", [
    (["gen", "casual=true"], "NAME one of"),
    (["gen", "causal=maybe"], "expected true or false"),
    (["gen", "head_dim=abc"], "expected an integer"),
    (["gen", "--op", "nope"], "no op 'nope'"),
    (["gen", "--gpu", "h999"], "known GPUs"),
    (["info", "heads_q=0"], "heads_q must be a positive integer"),
    (["info", "seqlen_q=x"], "expected an integer"),
])
def test_cli_bad_arguments_are_one_line_errors(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# Calls the public API refuses (FWD, DECODE: small valid calls, each case changes some fields): `info` and `gen`
# refuse them too, with the API's message
FWD = dict(batch=1, seqlen_q=1, seqlen_k=1, heads_q=4, heads_kv=4, head_dim=64)
DECODE = dict(batch=1, seqlen_q=1, heads_q=4, heads_kv=4, head_dim=64, cache_len=16)


def api_error(op: str, call: dict, device: str) -> str:
    """The ValueError message flash_attn_func (attn_fwd) or flash_attn_with_kvcache (attn_decode) gives for `call`."""
    q = torch.zeros(call["batch"], call["seqlen_q"], call["heads_q"], call["head_dim"], dtype=torch.float16,
                    device=device)
    seqlen_k = call["seqlen_k"] if op == "attn_fwd" else call["cache_len"]
    k = torch.zeros(call["batch"], seqlen_k, call["heads_kv"], call["head_dim"], dtype=torch.float16, device=device)
    with pytest.raises(ValueError) as e:
        if op == "attn_fwd":
            flashcore.flash_attn_func(q, k, k)
        else:
            flashcore.flash_attn_with_kvcache(q, k, k)
    return str(e.value)


@pytest.mark.parametrize("command", ["info", "gen"])
@pytest.mark.parametrize("op, call", [
    ("attn_fwd", {**FWD, "head_dim": 59}),
    ("attn_fwd", {**FWD, "head_dim": 8}),
    ("attn_fwd", {**FWD, "head_dim": 264}),
    ("attn_fwd", {**FWD, "heads_q": 6, "heads_kv": 4}),
    ("attn_decode", {**DECODE, "head_dim": 59}),
    ("attn_decode", {**DECODE, "heads_q": 6, "heads_kv": 4}),
    ("attn_decode", {**DECODE, "seqlen_q": 33, "heads_q": 32, "heads_kv": 8}),
], ids=["fwd-d59", "fwd-d8", "fwd-d264", "fwd-heads6:4", "decode-d59", "decode-heads6:4", "decode-rows132"])
def test_cli_refuses_calls_the_api_refuses_with_its_message(capsys, device, command, op, call):
    message = api_error(op, call, device)
    assert cli.main([command, "--op", op, *(f"{name}={value}" for name, value in call.items())]) == 2
    assert capsys.readouterr().err == f"flashcore {command}: {message}\n"


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
