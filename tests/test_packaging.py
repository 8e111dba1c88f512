"""Acceptance: the wheel built from this working tree works on its own, outside the repository.

Build a wheel from a copy of the working tree (tracked and untracked, not ignored files: what would be committed),
install it with --no-deps into a fresh venv that sees the torch / triton of the interpreter running the tests, and
from a directory outside the repo check that the runtime, its templates and the console scripts all come from
site-packages. Takes a few seconds; it stays in the default run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path
from site import getsitepackages, getusersitepackages

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _working_tree_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [Path(p) for p in out.decode().split("\0") if p]


def _copy_working_tree(dest: Path) -> None:
    """What `git add -A` would commit; a plain copy minus build outputs when this is no git checkout."""
    files = _working_tree_files()
    if not files:
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".venv", ".pytest_cache", ".whl", "out"))
        return
    for rel in files:
        src = REPO / rel
        if src.is_file():                      # listed but deleted in the working tree: skip
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(extra)
    return env


def _run(cmd, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res


def _outer_site_dirs() -> list[str]:
    """The site-packages this interpreter imports from, in its sys.path order: its own environment's (global or
    venv), and the base interpreter's or the user's where it sees them."""
    known = {os.path.realpath(p) for p in (*getsitepackages(), getusersitepackages())}
    return list(dict.fromkeys(p for p in sys.path if p and os.path.realpath(p) in known))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pkg")
    src, dist = root / "src", root / "dist"
    src.mkdir()
    _copy_working_tree(src)
    # pip ships with every Python and builds through the project's own backend (setuptools); no network.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", dist, src], cwd=root, env=_clean_env())
    wheels = list(dist.glob("flashcore-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """(venv python, venv bin dir, site-packages, a work dir outside the repo)."""
    root = tmp_path_factory.mktemp("venv")
    env_dir = root / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False, symlinks=os.name != "nt").create(env_dir)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    work = root / "work"
    work.mkdir()
    env = _clean_env()
    site_dir = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work,
                         env=env).stdout.strip())
    # Not --system-site-packages: a venv made from inside a venv gets the *base* interpreter's site-packages, which
    # need not have torch. Plain path lines (no .pth processing there: the outer editable flashcore stays out) come
    # after the venv's own site-packages, so the wheel installed below wins over any other flashcore.
    (site_dir / "_outer_site_packages.pth").write_text("".join(f"{d}\n" for d in _outer_site_dirs()))
    # pip comes from the outer site-packages; --ignore-installed: the repo's own (editable) install there must not
    # be "uninstalled" or count as satisfying the requirement.
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel],
         cwd=work, env=env)
    return python, bin_dir, site_dir, work


def test_wheel_contents(wheel):
    """Everything under the flashcore namespace (no generic top-level names), templates and bundles inside."""
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = [n for n in names if ".dist-info/" in n]
    package = [n for n in names if n not in dist_info]
    assert package and all(n.startswith("flashcore/") for n in package), \
        [n for n in package if not n.startswith("flashcore/")]
    for required in ("flashcore/__init__.py", "flashcore/interface.py", "flashcore/generator/__init__.py",
                     "flashcore/generator/render.py", "flashcore/templates/attn_fwd.py.jinja",
                     "flashcore/tools/tune.py", "flashcore/tools/bench.py", "flashcore/tuning_db/__init__.py"):
        assert required in names, f"{required} missing from the wheel"
    for template in (REPO / "templates").glob("*.py.jinja"):
        assert f"flashcore/templates/{template.name}" in names, f"template {template.name} missing"
    for bundle in (REPO / "tuning_db" / "bundles").glob("*.json"):
        assert f"flashcore/tuning_db/bundles/{bundle.name}" in names, f"bundle {bundle.name} missing"
    entry_points = next(n for n in dist_info if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("flashcore =", "flashcore-tune =", "flashcore-bench ="):
        assert script in text, f"console script {script.rstrip(' =')} missing"


def test_import_from_site_packages(installed, tmp_path):
    """In the venv, outside the repo: flashcore, its generator and its template all come from site-packages,
    rendering works, and a small kernel runs (interpreter) and matches PyTorch."""
    python, _, site, work = installed
    script = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        import torch
        import flashcore
        import flashcore.generator, flashcore.templates, flashcore.tools, flashcore.tuning_db
        from flashcore.generator import KernelSpec, render, load
        render_mod = sys.modules["flashcore.generator.render"]
        site = Path(sys.argv[1]).resolve()

        def inside(path):
            return site in Path(path).resolve().parents

        spec = KernelSpec.make("attn_fwd", arch=0, dtype="fp16", head_dim=64, causal=True, window=False,
                               softcap=False, alibi=False, gqa_group=1, tma=False)
        src = render(spec)
        assert "def attn_fwd" in src
        template = Path(render_mod.TEMPLATE_DIR) / "attn_fwd.py.jinja"
        assert template.is_file() and inside(template), template

        q = torch.randn(1, 20, 2, 64, dtype=torch.float16)
        k = torch.randn(1, 24, 1, 64, dtype=torch.float16)
        v = torch.randn(1, 24, 1, 64, dtype=torch.float16)
        out = flashcore.flash_attn_func(q, k, v, causal=True)
        kk, vv = (t.repeat_interleave(2, dim=2).transpose(1, 2).float() for t in (k, v))
        mask = torch.ones(20, 24, dtype=torch.bool).tril(diagonal=4)
        ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2).float(), kk, vv, attn_mask=mask)
        err = (out.float() - ref.transpose(1, 2)).abs().max().item()
        assert err < 1e-2, err
        assert list(Path(os.environ["FLASHCORE_CACHE_DIR"]).glob("attn_fwd_*.py")), "kernel not cached"

        mods = {n: m for n, m in sys.modules.items() if n == "flashcore" or n.startswith("flashcore.")}
        stray = {n: getattr(m, "__file__", None) for n, m in mods.items()
                 if getattr(m, "__file__", None) and not inside(m.__file__)}
        assert not stray, f"modules loaded from outside site-packages: {stray}"
        print("OK", flashcore.__file__)
    """)
    env = _clean_env(TRITON_INTERPRET="1", FLASHCORE_CACHE_DIR=str(tmp_path / "kernels"))
    res = _run([python, "-c", script, site], cwd=work, env=env)
    assert res.stdout.startswith("OK ")
    assert Path(res.stdout.split()[1]).resolve().is_relative_to(site.resolve())
    assert not Path(res.stdout.split()[1]).resolve().is_relative_to(REPO)
    for generic in ("generator", "tools", "templates", "tuning_db", "tests"):
        assert not (site / generic).exists(), f"generic top-level package {generic!r} installed into site-packages"


def test_venv_uses_the_running_interpreters_packages(installed):
    """The venv imports torch from where this interpreter does (not from a base interpreter that may lack it or
    hold another version), and flashcore from the wheel."""
    import torch
    python, _, site_dir, work = installed
    res = _run([python, "-c", "import torch, flashcore; print(torch.__file__); print(flashcore.__file__)"],
               cwd=work, env=_clean_env())
    torch_file, flashcore_file = res.stdout.split()
    assert Path(torch_file).resolve() == Path(torch.__file__).resolve()
    assert Path(flashcore_file).resolve().is_relative_to(site_dir.resolve())


@pytest.mark.parametrize("cmd", [
    ["flashcore-tune", "--help"],
    ["flashcore-bench", "--help"],
    ["flashcore", "info"],
    ["flashcore", "--help"],
    ["flashcore", "gen", "--show", "head_dim=80"],
], ids=" ".join)
def test_console_scripts(installed, cmd, tmp_path):
    python, bin_dir, site, work = installed
    exe = bin_dir / cmd[0]
    assert exe.exists(), f"console script {cmd[0]} not installed"
    env = _clean_env(TRITON_INTERPRET="1", FLASHCORE_CACHE_DIR=str(tmp_path / "kernels"))
    res = _run([exe, *cmd[1:]], cwd=work, env=env)
    assert res.stdout.strip(), f"{cmd} printed nothing"
    if cmd[:2] == ["flashcore", "info"]:
        assert "flashcore " in res.stdout and str(tmp_path / "kernels") in res.stdout
    if cmd[:2] == ["flashcore", "gen"]:
        assert "def attn_fwd" in res.stdout
