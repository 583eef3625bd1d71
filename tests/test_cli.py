"""Every mistake a user can make on ``vllm-mux`` gets one clear line, not a
traceback nor argparse's usage dump: bad sizes, an unknown device, an
unreachable daemon, an unknown model name, a port in use, a missing config."""

import importlib.util
import socket
import subprocess
import sys

import pytest

from conftest import LiveDaemon
from vllm_mux.launch import free_port


def daemon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_mux.cli", "daemon", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (
            ["--device", "gpu", "--device-memory", "1GiB"],
            "unknown device 'gpu'; known: cpu, cuda, npu",
        ),
        (["--device-memory", "1MiB"], "smaller than one chunk (33554432)"),
        (["--device-memory", "1GiB", "--chunk-size", "12345"], "not a multiple of the device"),
    ],
)
def test_bad_daemon_arguments_get_one_clear_line(args, says, tmp_path):
    done = daemon(*args, "--socket", str(tmp_path / "d.sock"))
    assert done.returncode == 2
    assert says in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "d.sock").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("cuda") is not None, reason="cuda-bindings is installed here"
)
def test_cuda_without_cuda_bindings_says_what_to_install(tmp_path):
    done = daemon("--device", "cuda", "--device-memory", "1GiB", "--socket", str(tmp_path / "s"))
    assert done.returncode == 2 and "pip install vllm-mux[cuda]" in done.stderr
    assert "Traceback" not in done.stderr


def mux(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_mux.cli", *args], capture_output=True, text=True, timeout=60
    )


def one_line(done: subprocess.CompletedProcess, says: str, code: int) -> None:
    """The command failed with ``code`` and said ``says`` in one line of stderr."""
    assert done.returncode == code, done
    assert says in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "usage:" not in done.stderr and not done.stdout


@pytest.mark.parametrize(
    "args, says",
    [
        (["--device-memory", "lots"], "argument --device-memory: not a size: 'lots'"),
        (["--device-memory", "1GiB", "--host-memory", "x"], "argument --host-memory: not a size"),
        (["--device-memory", "1GiB", "--chunk-size", "big"], "argument --chunk-size: not a size"),
        (["--device", "cuda:first", "--device-memory", "1GiB"], "unknown device 'cuda:first'"),
        ([], "the following arguments are required: --device-memory"),
        (["--device-memory", "9" * 400], "9" * 40 + "... is more than 1 PiB, more memory than"),
        (["--device-memory", "2048TiB"], "2048TiB is more than 1 PiB"),
        (["--device", "cpu:3", "--device-memory", "1GiB"], "'cpu:3': the cpu device is one"),
        *(
            (["--device-memory", "1GiB", "--wait-timeout", t], "not a number of seconds above 0")
            for t in ("0", "-1", "nan", "inf", "soon")
        ),
    ],
)
def test_daemon_mistakes_are_one_line(args, says, tmp_path):
    one_line(mux("daemon", *args, "--socket", str(tmp_path / "d.sock")), says, 2)


@pytest.mark.parametrize(
    "args, says",
    [
        (["--device-memory", "lots"], "device_memory must be a size like 2GiB"),
        (["--host-memory", "plenty"], "host_memory must be a size like 2GiB"),
        (["--chunk-size", "0"], "chunk_size must be a size like 2GiB"),
        (["--device", "gpu"], "unknown device 'gpu'; known: cpu, cuda, npu"),
        (["--port", "eighty"], "argument --port: invalid int value: 'eighty'"),
        (["--port", "99999"], "port must be 1 to 65535, not 99999"),
        (["--max-body", "huge"], "max_body must be a size"),
        (["--model", "smollm2"], "--model takes NAME=SOURCE, not 'smollm2'"),
        (["--model", "a\x1bb=smollm2"], "--model name 'a\\x1bb' has a control character"),
        (["--device-memory", "9" * 400], "device_memory: " + "9" * 40 + "... is more than 1 PiB"),
    ],
)
def test_serve_mistakes_are_one_line_before_anything_starts(args, says, tmp_path):
    done = mux("serve", "--model", "a=smollm2", *args, "--socket", str(tmp_path / "d.sock"))
    one_line(done, says, 2)
    assert not (tmp_path / "d.sock").exists()  # no daemon was started


def test_serve_config_mistakes_are_one_line(tmp_path):
    one_line(mux("serve", str(tmp_path / "none.yaml")), "none.yaml: No such file or directory", 2)
    config = tmp_path / "mux.yaml"
    config.write_text("device_memory: lots\nmodels:\n  - {name: a, source: smollm2}\n")
    one_line(mux("serve", str(config)), "mux.yaml:1: device_memory must be a size", 2)


def test_serve_on_a_port_in_use_says_so_before_the_models_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = mux("serve", "--model", "a=smollm2", "--port", port, "--socket", str(tmp_path / "s"))
    one_line(done, f"cannot listen on 127.0.0.1:{port}", 2)
    assert "pass a free --port" in done.stderr


@pytest.mark.parametrize("command", ["status", "ps", "sleep", "wake", "pin", "unpin"])
def test_an_unreachable_daemon_says_how_to_start_one(command, tmp_path):
    name = [] if command in ("status", "ps") else ["chat"]
    done = mux(command, *name, "--socket", str(tmp_path / "none.sock"))
    one_line(done, f"no daemon answers at {tmp_path / 'none.sock'}", 1)
    assert "`vllm-mux daemon --device-memory SIZE`" in done.stderr and "--socket" in done.stderr


def test_an_unknown_model_name_is_one_line_naming_the_known_ones(tmp_path):
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 2, 1 << 20)
    try:
        daemon.client().hello("chat", key="k")
        for op in ("sleep", "wake", "pin", "unpin"):
            done = mux(op, "nope", "--socket", daemon.path)
            one_line(done, "no model 'nope' on this daemon; it knows chat", 1)
        one_line(mux("sleep", "chat", "--socket", daemon.path), "chat is not running", 1)
    finally:
        daemon.stop()
    one_line(mux("model", "path", "nope"), "unknown model 'nope'; known models: smollm2", 2)


def test_a_wrong_command_is_one_line():
    one_line(mux("frob"), "invalid choice: 'frob'", 2)
    one_line(mux("sleep"), "the following arguments are required: name", 2)


@pytest.mark.parametrize(
    "args, says",
    [
        (["--device-memory", "1MiB"], "--device-memory 1048576 is smaller than one chunk"),
        (["--chunk-size", "12345"], "chunk size 12345 is not a multiple of the device's"),
    ],
)
def test_serve_says_in_one_line_why_its_daemon_did_not_start(args, says, tmp_path):
    args = [*args, "--port", str(free_port()), "--socket", str(tmp_path / "d.sock")]
    done = mux("serve", "--model", "a=smollm2", *args)
    assert done.returncode == 1 and says in done.stderr, done
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_a_second_daemon_on_a_socket_in_use_is_one_line(tmp_path):
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 2, 1 << 20)
    try:
        done = mux("daemon", "--device-memory", "64MiB", "--socket", daemon.path)
        one_line(done, f"a daemon is already listening at {daemon.path}", 2)
        assert "choose another --socket" in done.stderr
    finally:
        daemon.stop()


@pytest.fixture
def mute(tmp_path):
    """A socket that takes connections and never answers: the path, and a
    list of the connections it took."""
    import os
    import threading

    path = str(tmp_path / "mute.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen()
    taken = []

    def take():
        while True:
            try:
                taken.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=take, daemon=True).start()
    yield path, taken
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    for conn in taken:
        conn.close()


@pytest.mark.parametrize("args", [["ps"], ["status", "--json"], ["pin", "a"]])
def test_ctrl_c_while_the_daemon_does_not_answer_is_one_line(args, mute):
    import signal

    from test_controller import wait_for

    from conftest import PATIENCE_S

    path, taken = mute
    cli = subprocess.Popen(
        [sys.executable, "-m", "vllm_mux.cli", *args, "--socket", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a run in the background (CI under nohup) inherits
        # SIGINT ignored, and Python then never turns it into KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert wait_for(lambda: taken and taken[0].recv(1 << 16), PATIENCE_S)  # it asked
    cli.send_signal(signal.SIGINT)
    out, err = cli.communicate(timeout=PATIENCE_S)
    assert cli.returncode == 130 and not out
    assert err.count("\n") == 1 and err.startswith("vllm-mux: interrupted"), err


def test_a_pin_the_daemon_does_not_answer_gives_up_in_one_line(mute, monkeypatch, capsys):
    from vllm_mux import cli
    from vllm_mux.daemon import server

    monkeypatch.setattr(server, "ASK_TIMEOUT", 0.1)
    assert cli.main(["pin", "a", "--socket", mute[0]]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "timed out" in err and "Traceback" not in err


def test_ps_shows_a_name_with_a_control_character_on_its_one_row(tmp_path):
    daemon = LiveDaemon(str(tmp_path / "d.sock"), 2, 1 << 20)
    try:
        daemon.client().hello("a\nb", key="k")
        done = mux("ps", "--socket", daemon.path)
    finally:
        daemon.stop()
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    assert len(rows) == 4 and "'a\\nb'" in rows[3], rows
