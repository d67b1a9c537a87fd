"""The single-file build: what goes into dist/etcd-gateway.pyz, and that it behaves like
`python3 -m gateway` at the command line (help, bad flags, bad configuration, exit codes)."""
import os
import re
import socket
import stat
import subprocess
import sys
import zipfile

import pytest

from support import ROOT, build_pyz, gateway_cli

RUNTIME_MODULES = ("gateway.py", "endpoints.py", "dnssrv.py")


# ---------------------------------------------------------------------------------------------
# The archive

def test_archive_holds_the_modules_unchanged_and_our_main(pyz):
    with zipfile.ZipFile(str(pyz)) as archive:
        names = archive.namelist()
        expected = ["__main__.py"] + [m for m in RUNTIME_MODULES if (ROOT / m).is_file()]
        assert names == expected
        for name in expected[1:]:
            assert archive.read(name) == (ROOT / name).read_bytes(), name
        main_py = archive.read("__main__.py").decode()
    # Our own entry point keeps main()'s exit code (the zipapp template would drop it).
    assert "from gateway import main" in main_py
    assert "sys.exit(main())" in main_py
    compile(main_py, "__main__.py", "exec")


def test_archive_is_executable_with_a_python3_shebang(pyz):
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.stat(str(pyz)).st_mode & stat.S_IXUSR


def test_build_is_deterministic(tmp_path):
    first = build_pyz.build(tmp_path / "a.pyz")
    second = build_pyz.build(tmp_path / "b.pyz")
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(str(first)) as archive:
        assert {info.date_time for info in archive.infolist()} == {build_pyz.FIXED_DATE_TIME}


def test_build_fails_loudly_without_a_required_module(tmp_path):
    (tmp_path / "gateway.py").write_text("def main(argv=None):\n    return 0\n")
    with pytest.raises(FileNotFoundError, match="endpoints.py"):
        build_pyz.build(tmp_path / "out.pyz", source_dir=tmp_path)
    assert not (tmp_path / "out.pyz").exists()
    assert not list(tmp_path.glob(".etcd-gateway-*"))  # no temporary file left behind


def test_build_without_optional_dnssrv(tmp_path):
    for name in ("gateway.py", "endpoints.py"):
        (tmp_path / name).write_bytes(b"# " + name.encode() + b"\n")
    with zipfile.ZipFile(str(build_pyz.build(tmp_path / "out.pyz", source_dir=tmp_path))) as archive:
        assert archive.namelist() == ["__main__.py", "gateway.py", "endpoints.py"]


def test_build_script_writes_dist(pyz):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "build_pyz.py")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(pyz)


# ---------------------------------------------------------------------------------------------
# The command line: the .pyz behaves exactly like `python3 -m gateway`

TIMESTAMP_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def _normalised(text):
    """stderr without timestamps and with the program name made launcher-neutral."""
    text = TIMESTAMP_RE.sub("TS", text)
    return re.sub(r"(usage: )\S+", r"\1PROG", text)


def _both(args):
    """Run `args` with `python3 -m gateway` and with the .pyz; return both results."""
    return gateway_cli(args, launcher="module"), gateway_cli(args, launcher="pyz")


@pytest.mark.parametrize("args", [["--help"], ["start", "--help"]])
def test_help_exits_0(pyz, args):
    module, archive = _both(args)
    assert archive.returncode == 0, archive.stderr
    assert module.returncode == 0, module.stderr
    assert _normalised(archive.stdout) == _normalised(module.stdout)


def test_pyz_runs_directly_through_its_shebang(pyz):
    result = subprocess.run([str(pyz), "start", "--help"], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    for flag in ("--listen-addr", "--endpoints", "--metrics-addr"):
        assert flag in result.stdout


@pytest.mark.parametrize("args", [
    ["start", "--no-such-flag"],
    ["start", "--retry-delay=soon"],
    ["start", "--endpoints=127.0.0.1:notaport"],
])
def test_bad_flag_exits_2_with_usage(pyz, args):
    module, archive = _both(args)
    assert archive.returncode == 2, archive.stderr
    assert module.returncode == 2, module.stderr
    assert "usage" in archive.stderr.lower()
    assert "Traceback" not in archive.stderr
    assert _normalised(archive.stderr) == _normalised(module.stderr)


def test_bad_config_exits_1_with_one_line(pyz):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["start", "--listen-addr=127.0.0.1:%d" % port, "--endpoints=127.0.0.1:1"]
        module, archive = _both(args)
    assert archive.returncode == 1, archive.stderr
    assert module.returncode == 1, module.stderr
    assert "Traceback" not in archive.stderr
    assert len(archive.stderr.strip().splitlines()) == 1, archive.stderr
    assert _normalised(archive.stderr) == _normalised(module.stderr)


def test_no_endpoints_exits_1(pyz):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    module, archive = _both(["start", "--listen-addr=127.0.0.1:%d" % port, "--endpoints="])
    assert archive.returncode == module.returncode == 1, archive.stderr
    assert len(archive.stderr.strip().splitlines()) == 1, archive.stderr
