"""The npu backend, the real daemon and the real Instance over a simulated
ACL runtime (tests/acl_sim): CANN's rules enforced, no NPU anywhere.

The daemon runs as ``vllm-mux daemon --device npu`` in its own process (the
exporter of every chunk); each instance is a process of its own
(tests/npu_sim.py), since CANN refuses an import in the exporting process and
allows one import of a handle per process at a time. Every step ends on the
books: leased + free = total, a sleeping instance holds nothing.
"""

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from acl_sim import ACL_ERROR_RT_DRV_INTERNAL_ERROR, ACL_ERROR_RT_INVALID_HANDLE, build

from conftest import LiveDaemon, assert_books_balance
from vllm_mux.daemon.client import Client, DaemonError
from vllm_mux.memory import npu
from vllm_mux.memory.cpu import Backend as CpuBackend

HERE = Path(__file__).parent
CHUNK = 2 << 20  # the simulated device's granularity
POOL_CHUNKS = 8
WEIGHTS = 5 * CHUNK + 12345  # 6 chunks: one model fills the pool with its KV cache


@pytest.fixture(scope="module")
def libascendcl(tmp_path_factory) -> str:
    return str(build(tmp_path_factory.mktemp("acl")))


@pytest.fixture
def sim_env(libascendcl, tmp_path) -> dict:
    device = tmp_path / "device"
    device.mkdir()
    return os.environ | {
        "VLLM_MUX_ASCENDCL": libascendcl,
        "ACL_SIM_DIR": str(device),
        "ACL_SIM_DEVICE_BYTES": str(64 << 20),
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]),
    }


def start_daemon(env: dict, path: str, log_path: Path) -> subprocess.Popen:
    """``vllm-mux daemon --device npu`` on the simulated device, once it answers."""
    argv = [sys.executable, "-m", "vllm_mux.cli", "daemon", "--device", "npu",
            "--device-memory", str(POOL_CHUNKS * CHUNK), "--chunk-size", str(CHUNK),
            "--socket", path, "--host-memory", str(64 << 20), "--wait-timeout", "5"]  # fmt: skip
    with open(log_path, "a") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            Client(path, timeout=10).close()
            return proc
        except DaemonError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the npu daemon did not start:\n{log_path.read_text()}")
            time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def daemon(sim_env, tmp_path):
    path = str(tmp_path / "npu.sock")
    proc = start_daemon(sim_env, path, tmp_path / "daemon.log")
    yield path
    stop(proc)


class Worker:
    """An instance process (tests/npu_sim.py), one command at a time."""

    def __init__(self, socket_path: str, model: str, env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "npu_sim.py"), socket_path, model],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._reply() == "ok"

    def _reply(self) -> str:
        line = self.proc.stdout.readline()
        assert line, f"the instance exited ({self.proc.poll()})"
        return line.strip()

    def __call__(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def ok(self, command: str) -> str:
        reply = self(command)
        assert reply.startswith("ok"), f"{command}: {reply}"
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)


@pytest.fixture
def workers(daemon, sim_env):
    made = []

    def make(model: str) -> Worker:
        made.append(Worker(daemon, model, sim_env))
        return made[-1]

    yield make
    for w in made:
        w.close()


def books(path: str) -> dict:
    client = Client(path, timeout=10)
    try:
        status = client.status()
    finally:
        client.close()
    assert_books_balance(status)
    return status


def held(status: dict, model: str) -> int:
    return sum(i["chunks"] for i in status["instances"] if i["model"] == model)


def test_the_daemon_says_what_it_holds(daemon):
    status = books(daemon)
    assert status["device"] == "npu"
    assert status["total_chunks"] == POOL_CHUNKS and status["free_chunks"] == POOL_CHUNKS


def test_models_take_turns_and_each_wakes_to_its_own_bytes(daemon, workers):
    a, b = workers("a"), workers("b")
    a.ok(f"load {WEIGHTS} 1")
    a.ok(f"kv {CHUNK}")
    awake = held(books(daemon), "a")
    assert awake == 7
    a.ok("sleep")
    assert held(books(daemon), "a") == 0
    # b leases what a slept on: the daemon whitelists b on each chunk, and b
    # imports handles a imported before (a freed its imports when it slept).
    b.ok(f"load {WEIGHTS} 2")  # over a's bytes
    assert held(books(daemon), "b") == 6
    b.ok("sleep")
    for _ in range(2):
        a.ok("wake")  # its chunks were overwritten: copied back from the host copy
        assert held(books(daemon), "a") == awake
        a.ok("check")
        a.ok("sleep")
        b.ok("wake")
        b.ok("check")
        b.ok("sleep")
        books(daemon)
    a.ok("wake")
    a.ok("check")
    assert held(books(daemon), "a") == awake


def test_a_warm_wake_maps_the_same_chunks_again(daemon, workers):
    a = workers("a")
    a.ok(f"load {WEIGHTS} 3")
    for _ in range(3):
        a.ok("sleep")
        a.ok("wake")  # the same handles, imported again once the last import was freed
        a.ok("check")
    assert held(books(daemon), "a") == 6


def test_an_instance_killed_mid_lease_gives_its_chunks_back(daemon, workers):
    a = workers("a")
    a.ok(f"load {WEIGHTS} 4")
    a.ok(f"kv {CHUNK}")
    assert held(books(daemon), "a") == 7
    a.proc.kill()
    a.proc.wait()
    deadline = time.monotonic() + 30
    while books(daemon)["free_chunks"] != POOL_CHUNKS:
        assert time.monotonic() < deadline, "the dead instance's chunks never came back"
        time.sleep(0.1)
    # Its imports died with it: another process maps every chunk again.
    b = workers("b")
    b.ok(f"load {WEIGHTS} 5")
    b.ok(f"kv {CHUNK}")
    b.ok("check")
    assert held(books(daemon), "b") == 7


def test_an_instance_reconnects_to_the_same_daemon_holding_its_chunks(daemon, workers):
    """Its chunks travel as handles: it names them on hello, brings nothing,
    and the daemon, which still has them, takes it back (no share, which an
    NPU cannot)."""
    a = workers("a")
    a.ok(f"load {WEIGHTS} 7")
    a.ok(f"kv {CHUNK}")
    a.ok("reconnect")
    status = books(daemon)
    (me,) = status["instances"]
    assert me["state"] == "awake" and me["chunks"] == 7
    a.ok("check")
    a.ok("sleep")
    a.ok("wake")
    a.ok("check")
    assert held(books(daemon), "a") == 7


def test_an_awake_instance_outlives_a_daemon_restart(sim_env, tmp_path):
    """The chunks it imported from the dead daemon cannot be handed over: it
    names them on hello and maps them on; the new daemon keeps those ids as
    its own and makes them anew once it sleeps; its next wake copies in."""
    path, log = str(tmp_path / "npu.sock"), tmp_path / "daemon.log"
    first = start_daemon(sim_env, path, log)
    a = Worker(path, "a", sim_env | {"VLLM_MUX_RECONNECT_S": "60"})
    try:
        a.ok(f"load {WEIGHTS} 8")
        a.ok(f"kv {CHUNK}")
        first.kill()  # no goodbye: as a crash
        first.wait()
        second = start_daemon(sim_env, path, log)
        try:
            deadline = time.monotonic() + 60
            while not [i for i in books(path)["instances"] if i["state"] == "awake"]:
                assert time.monotonic() < deadline, "the instance did not come back"
                time.sleep(0.1)
            (me,) = books(path)["instances"]
            assert me["chunks"] == 7
            a.ok("check")  # its own imports, still mapped
            a.ok("sleep")
            assert books(path)["free_chunks"] == POOL_CHUNKS  # made anew, all free
            a.ok("wake")
            a.ok("check")
            assert held(books(path), "a") == 7
            assert "an earlier daemon made stay its own" in log.read_text()
        finally:
            a.close()
            stop(second)
    finally:
        if first.poll() is None:
            first.kill()


def identity(env: dict) -> str:
    code = "from vllm_mux.memory import npu; print(npu.Backend(0).identity)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()[-1]


def test_the_device_is_named_by_its_uuid_or_else_its_number(sim_env, tmp_path):
    named = identity(sim_env)
    assert re.fullmatch(r"NPU-[0-9a-f]{32}", named) and identity(sim_env) == named
    # A runtime before CANN 9.0 has no aclrtDeviceGetUuid: the visible number.
    old = str(build(tmp_path / "cann8", defines=["ACL_SIM_NO_UUID"]))
    assert identity(sim_env | {"VLLM_MUX_ASCENDCL": old, "ASCEND_RT_VISIBLE_DEVICES": "3"}) == (
        "NPU-3"
    )
    assert identity(sim_env | {"VLLM_MUX_ASCENDCL": old}) == "NPU-0"


def test_a_process_never_granted_a_chunk_cannot_import_it(daemon, workers):
    a, c = workers("a"), workers("c")
    a.ok(f"load {CHUNK} 6")
    handle = int(a.ok("handles").split()[1])
    # c leased nothing: not on the chunk's whitelist (the driver's EACCES)
    reply = c(f"import {handle}")
    assert reply.startswith("error aclrtMemImportFromShareableHandle failed"), reply
    assert f"aclError {ACL_ERROR_RT_DRV_INTERNAL_ERROR}" in reply and "whitelist" in reply, reply
    # One import of a handle per process at a time: a holds it already.
    reply = a(f"import {handle}")
    assert reply.startswith("error aclrtMemImportFromShareableHandle failed"), reply
    assert f"aclError {ACL_ERROR_RT_INVALID_HANDLE}" in reply, reply
    a.ok("check")  # and what a holds is untouched
    books(daemon)


def test_a_lease_of_npu_chunks_names_the_bare_tgid(daemon):
    client = Client(daemon, timeout=10)
    try:
        client.hello("raw", key="raw")
        with pytest.raises(DaemonError, match="bare tgid"):
            client.lease_back(1)
        with pytest.raises(DaemonError, match="bare tgid"):
            client.lease_back(1, tgid=-5)
    finally:
        client.close()
    status = books(daemon)
    assert status["free_chunks"] == POOL_CHUNKS


# How the header spells what npu.py's ctypes declarations say: the enum
# parameters (4 bytes, passed as c_int) and the const pointers.
_C_TYPES = {
    ctypes.c_void_p: "void *",
    ctypes.c_char_p: "const char *",
    ctypes.c_size_t: "size_t",
    ctypes.c_uint64: "uint64_t",
    ctypes.c_int32: "int32_t",
    ctypes.POINTER(ctypes.c_void_p): "void **",
    ctypes.POINTER(ctypes.c_size_t): "size_t *",
    ctypes.POINTER(ctypes.c_uint64): "uint64_t *",
    ctypes.POINTER(ctypes.c_int32): "int32_t *",
    ctypes.POINTER(npu._PhysicalMemProp): "aclrtPhysicalMemProp *",
    ctypes.POINTER(npu._Uuid): "aclrtUuid *",
}
_HEADER_SPELLING = {  # (function, argument index): the header's type where not the above
    ("aclrtMemGetAllocationGranularity", 1): "aclrtMemGranularityOptions",
    ("aclrtMemExportToShareableHandle", 1): "aclrtMemHandleType",
    ("aclrtMemcpy", 2): "const void *",
    ("aclrtMemcpy", 4): "aclrtMemcpyKind",
    ("aclrtMallocPhysical", 2): "const aclrtPhysicalMemProp *",
}
_CONSTANTS = [
    "ACL_SUCCESS", "ACL_ERROR_REPEAT_INITIALIZE", "ACL_MEM_HANDLE_TYPE_NONE",
    "ACL_MEM_ALLOCATION_TYPE_PINNED", "ACL_HBM_MEM_HUGE", "ACL_MEM_LOCATION_TYPE_DEVICE",
    "ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM", "ACL_MEMCPY_HOST_TO_DEVICE",
    "ACL_MEMCPY_DEVICE_TO_HOST",
]  # fmt: skip


def test_the_backends_declarations_match_cann_header(cann_include, libascendcl, tmp_path):
    """Every call npu.py makes, as its ctypes declaration has it, assigned to
    a pointer to the header's function (an error under -Werror if a type or
    the count differs); its constants and its struct's layout printed by a
    program built against the header (linked with the simulator, whose
    symbols it only takes the addresses of)."""
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "acl/acl.h"', ""]
    for name, argtypes in npu._SIGNATURES.items():
        params = [_HEADER_SPELLING.get((name, i)) or _C_TYPES[t] for i, t in enumerate(argtypes)]
        lines.append(f"aclError (*check_{name})({', '.join(params) or 'void'}) = {name};")
    lines.append("const char *(*check_msg)(void) = aclGetRecentErrMsg;")
    lines += ["", "int main(void) {"]
    lines += [f'    printf("{c} %lld\\n", (long long){c});' for c in _CONSTANTS]
    layout = {"sizeof": "sizeof(aclrtPhysicalMemProp)", "uuid": "sizeof(aclrtUuid)"}
    for field in ("handleType", "allocationType", "memAttr", "location", "reserve"):
        layout[field] = f"offsetof(aclrtPhysicalMemProp, {field})"
    layout |= {"location.id": "offsetof(aclrtMemLocation, id)",
               "location.type": "offsetof(aclrtMemLocation, type)"}  # fmt: skip
    lines += [f'    printf("{k} %zu\\n", {v});' for k, v in layout.items()]
    lines += ["    return 0;", "}"]
    source = tmp_path / "check.c"
    source.write_text("\n".join(lines) + "\n")
    built = subprocess.run(
        ["cc", "-Wall", "-Werror", "-Wno-unused-variable", f"-I{cann_include}",
         "-o", str(tmp_path / "check"), str(source), libascendcl, "-lpthread"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    env = os.environ | {"LD_LIBRARY_PATH": os.path.dirname(libascendcl)}
    printed = subprocess.run(
        [str(tmp_path / "check")], capture_output=True, text=True, check=True, env=env
    )
    values = dict(line.rsplit(" ", 1) for line in printed.stdout.splitlines())
    for c in _CONSTANTS:
        assert int(values[c]) == getattr(npu, c), c
    prop, location = npu._PhysicalMemProp, npu._Location
    assert int(values["sizeof"]) == ctypes.sizeof(prop)
    for field in ("handleType", "allocationType", "memAttr", "location", "reserve"):
        assert int(values[field]) == getattr(prop, field).offset, field
    assert int(values["location.id"]) == location.id.offset
    assert int(values["location.type"]) == location.type.offset
    assert int(values["uuid"]) == ctypes.sizeof(npu._Uuid)


# -- the daemon's handle path, with a stand-in backend (no simulator needed) --


class HandleBackend(CpuBackend):
    """The cpu backend, but its chunks travel as handles, as npu's do: a lease
    names the tgid to let in; ``grant`` fails on the ``fail_at``-th call, as
    CANN's whitelisting may."""

    name = "handle-test"
    transport = "handle"

    def __init__(self, fail_at: int = 0):
        super().__init__()
        self.grants, self.fail_at = 0, fail_at

    def grant(self, chunk, tgid: int) -> int:
        self.grants += 1
        if self.grants == self.fail_at:
            raise RuntimeError("aclrtMemSetPidToShareableHandle failed: aclError 507899")
        return 1000 + self.grants


@pytest.fixture
def handle_daemon(tmp_path):
    daemon = LiveDaemon(str(tmp_path / "h.sock"), 8, 1 << 20, backend=HandleBackend(fail_at=3))
    yield daemon
    daemon.stop()


def test_a_failed_grant_is_an_answer_and_gives_the_lease_back(handle_daemon):
    client = handle_daemon.client()
    client.hello("m", key="m")
    ids, handles, _ = client.lease_back(2, tgid=4242)
    assert len(ids) == 2 and handles == [1001, 1002]
    with pytest.raises(DaemonError, match="cannot let this instance import its chunks"):
        client.lease_back(2, tgid=4242)  # the third grant fails
    # The connection lives on: the same client is answered, and holds its first two.
    status = client.status()
    assert_books_balance(status)
    (me,) = status["instances"]
    assert me["chunks"] == 2 and me["state"] != "disconnected"
    assert client.lease_back(1, tgid=4242)[1] == [1004]


def test_a_hello_with_fds_to_a_handle_daemon_is_refused_and_its_fds_closed(handle_daemon):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        client = Client(handle_daemon.path, timeout=10)
        r, w = os.pipe()
        try:
            with pytest.raises(DaemonError, match="brings no fds"):
                client.hello("m", key="k", held=[0], fds=[r])
        finally:
            os.close(r), os.close(w)
            client.close()
    time.sleep(0.2)  # the daemon's threads close what they received
    assert len(os.listdir("/proc/self/fd")) <= before + 1


def test_a_backfill_never_takes_what_the_held_waiter_fits_in(handle_daemon):
    daemon = handle_daemon.daemon
    with daemon.lock:
        daemon.held_up = (7, 4)  # waiter 7, first, held up, needs 4
        taken = daemon.pool.lease(99, 5)  # 3 of 8 free: too few for it
        assert daemon._may_backfill(8, first=7)
        assert not daemon._may_backfill(7, first=7)  # the held one itself goes as first
        daemon.pool.release(99, taken[:2])  # 5 free: it fits now
        assert not daemon._may_backfill(8, first=7)
        daemon.pool.release(99, taken[2:])
        daemon.held_up = (7, 4)
        assert not daemon._may_backfill(8, first=9)  # another is first: it asks anew
        assert daemon.held_up is None
