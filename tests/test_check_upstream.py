"""tools/check_upstream.py passes on the pinned vLLM and fails loudly otherwise."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import pypi_file
from vllm_mux.patches import cpu_worker

TOOL = Path(__file__).parents[1] / "tools" / "check_upstream.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("check_upstream", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pinned_vllm_matches_every_patch():
    result = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "matches every patch" in result.stdout


def test_changed_upstream_source_fails(monkeypatch, capsys):
    target = "vllm.v1.worker.cpu_worker.CPUWorker.sleep"
    monkeypatch.setitem(cpu_worker.TARGETS, target, "0123456789abcdef")
    assert load_tool().main([]) == 1
    assert f"UPSTREAM MISMATCH: vllm_mux.patches.cpu_worker: {target} changed upstream" in (
        capsys.readouterr().err
    )


def test_vanished_upstream_symbol_fails(monkeypatch, capsys):
    monkeypatch.setitem(cpu_worker.TARGETS, "vllm.v1.worker.cpu_worker.CPUWorker.gone", "x")
    assert load_tool().main([]) == 1
    assert "CPUWorker.gone is gone" in capsys.readouterr().err


@pytest.mark.parametrize("installed", ["0.33.0", "0.31.1+cpu"])
def test_other_vllm_version_fails(monkeypatch, capsys, installed):
    tool = load_tool()
    monkeypatch.setattr(tool, "installed_vllm", lambda: installed)
    assert tool.main([]) == 1
    assert f"vLLM {installed} is installed; the patches are written for 0.32.0" in (
        capsys.readouterr().err
    )


# -- per platform: npu, from the sources of vllm-ascend 0.23.0.post1 and vLLM 0.23.0 --

SDISTS = {  # PyPI's sdists, unpacked, never built
    "vllm-ascend": "vllm_ascend-0.23.0.post1.tar.gz",
    "vllm": "vllm-0.23.0.tar.gz",
}


def _fetch_sdist(project: str, filename: str, into: Path) -> Path:
    """One sdist from PyPI (``conftest.pypi_file``), its Python package and
    PKG-INFO unpacked. (``pip download --no-binary :all:`` would try to build
    the sdists' build dependencies, numpy and torch among them, from source
    just to read their metadata.)"""
    import tarfile

    top = filename.removesuffix(".tar.gz")
    if (into / top / "PKG-INFO").is_file():
        return into / top
    package = project.replace("-", "_")
    with tarfile.open(pypi_file(project, filename)) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name == f"{top}/PKG-INFO" or m.name.startswith(f"{top}/{package}/")
        ]
        tar.extractall(into, members=members, filter="data")
    return into / top


@pytest.fixture(scope="module")
def npu_sources() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-mux-test"
    into = cache / "npu-src"
    into.mkdir(parents=True, exist_ok=True)
    for project, filename in SDISTS.items():
        _fetch_sdist(project, filename, into)  # skips, saying why, if PyPI is unreachable
    return into


def test_source_hash_equals_inspect_on_installed_vllm():
    """The npu check reads symbols from files; on the installed vLLM 0.32 the
    hash it computes must be inspect.getsource's for every target we have."""
    from vllm_mux.patches import PLATFORMS, modules, resolve, source_hash

    tool = load_tool()
    tree = tool.SourceTree([tool.package_root("vllm")])
    targets = {p for m in modules(PLATFORMS["cuda"]["patches"]) for p in m.TARGETS}
    assert len(targets) > 40
    for path in sorted(targets):
        assert tool.text_hash(tree.source(path)) == source_hash(resolve(path)), path


def test_npu_sources_match_every_npu_patch(npu_sources, capsys):
    assert load_tool().main(["--platform", "npu", "--source-dir", str(npu_sources)]) == 0
    out = capsys.readouterr().out
    assert "vllm 0.23.0, vllm-ascend 0.23.0.post1 match every npu patch" in out


def test_npu_altered_source_fails(npu_sources, tmp_path, capsys):
    top = "vllm_ascend-0.23.0.post1"
    shutil.copytree(npu_sources / top, tmp_path / top)
    worker = tmp_path / top / "vllm_ascend" / "worker" / "worker.py"
    text = worker.read_text()
    anchor = "    def sleep(self, level: int = 1) -> None:\n"
    assert text.count(anchor) == 1
    worker.write_text(text.replace(anchor, anchor + "        level = max(level, 1)\n"))
    argv = ["--platform", "npu", "--source-dir", str(tmp_path)]
    argv += ["--source-dir", str(npu_sources)]  # vLLM 0.23 from the cache
    assert load_tool().main(argv) == 1
    err = capsys.readouterr().err
    target = "vllm_ascend.worker.worker.NPUWorker.sleep"
    assert f"UPSTREAM MISMATCH: vllm_mux.patches.npu_worker: {target} changed upstream" in err
    assert err.count("UPSTREAM MISMATCH") == 1


def test_npu_vanished_symbol_fails(npu_sources, monkeypatch, capsys):
    from vllm_mux.patches import npu_worker

    monkeypatch.setitem(npu_worker.TARGETS, "vllm_ascend.worker.worker.NPUWorker.gone", "x")
    assert load_tool().main(["--platform", "npu", "--source-dir", str(npu_sources)]) == 1
    assert "NPUWorker.gone is gone (vllm_ascend.worker.worker.NPUWorker.gone: NPUWorker has no" in (
        capsys.readouterr().err
    )


def test_npu_check_against_the_installed_vllm_032_fails(capsys):
    """Without the 0.23 sources the npu check finds vLLM 0.32 and no vllm-ascend
    here: it says so instead of passing."""
    assert load_tool().main(["--platform", "npu"]) == 1
    err = capsys.readouterr().err
    assert "vllm 0.32.0 is at" in err and "the npu patches are written for 0.23.0" in err
    assert "vllm_ascend is neither installed nor in --source-dir" in err


def test_default_platform_without_vllm_ascend_is_the_imported_check():
    assert importlib.util.find_spec("vllm_ascend") is None  # not installable here
    assert load_tool().default_platform() == "cuda"
