"""The API-server side of an instance: requests wake it, idleness puts it to sleep.

vLLM's engine already pauses its scheduler and queues requests while asleep;
what it lacks is someone who decides. The controller does, in the process
that sees the requests:

- a request to a sleeping instance wakes it and waits for the wake; requests
  that arrive meanwhile join the same wake;
- an instance with no request for ``idle_ttl`` seconds goes to sleep by
  itself, never with a request in flight, never while pinned (a pin or an
  unpin at run time, ``vllm-mux pin``, counts from the next check);
- when the daemon needs memory it asks the controller to sleep: new requests
  then wait, the ones in flight finish, and the instance sleeps; the waiting
  requests wake it again once the daemon can grant memory;
- a user asks, through the daemon (``vllm-mux sleep|wake|pin|unpin``): the
  controller answers at once and does the work on its loop; the daemon
  follows the outcome in ``report``: the state, the counts of wakes and
  sleeps done and failed, and ``asked``, the daemon's asks still to be done
  (one of each at most: an ask while one is pending is not queued again);
- a pin calls off a sleep that has not reached the engine yet (an idle one,
  or one the daemon asked for): from the pin on, the model stays awake.

It knows asyncio, the daemon's socket and an engine's ``sleep``/``wake_up``
coroutines, not vLLM. If the daemon goes away (a crash, an upgrade) the
controller reconnects, trying for RECONNECT_S (client.py), and the server
serves on meanwhile; a request that needs a wake waits for the daemon or
fails with 503 (see instance.py). Only a daemon that stays away longer stops
the server: the instance's memory would go unaccounted for ever after.
"""

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from contextlib import asynccontextmanager

from vllm_mux.daemon import policy, protocol
from vllm_mux.daemon.client import Client, DaemonError, reconnect, reconnect_seconds

log = logging.getLogger("vllm_mux.controller")

DEFAULT_IDLE_TTL = 600.0  # seconds; VLLM_MUX_IDLE_TTL, 0 = never sleep when idle


# The policy's knobs (daemon/policy.py) from the environment, per instance.
KNOB_ENV = {
    "quantum_s": "VLLM_MUX_QUANTUM_S",
    "linger_s": "VLLM_MUX_LINGER_S",
    "max_wait_s": "VLLM_MUX_MAX_WAIT_S",
    "priority": "VLLM_MUX_PRIORITY",
}


def knobs_from_env(environ=os.environ) -> dict:
    """The knobs set in the environment (the others keep the policy's
    defaults); ValueError naming the variable for a value that is not one."""
    knobs = {}
    for knob, name in KNOB_ENV.items():
        text = environ.get(name, "").strip()
        if not text:
            continue
        try:
            knobs[knob] = int(text) if knob == "priority" else float(text)
            policy.knobs_from({knob: knobs[knob]})
        except ValueError as e:
            raise ValueError(f"{name}={text!r}: {e}") from None
    return knobs


class WakeError(RuntimeError):
    """The instance could not wake (no memory in time, or the wake failed)."""


class Controller:
    def __init__(
        self,
        socket_path,
        key,
        sleep,
        wake_up,
        idle_ttl,
        pinned,
        loop,
        on_lost=None,
        drop_host=None,
        knobs=None,
    ):
        self._sleep, self._wake_up = sleep, wake_up  # the engine's own coroutines
        # The engine's workers let their host copy go (the daemon needs the room).
        self._drop_host = drop_host
        # What to do when the daemon is gone: stop this server (SIGTERM to self).
        self._on_lost = on_lost or (lambda: os.kill(os.getpid(), signal.SIGTERM))
        self.idle_ttl, self.pinned, self.loop = idle_ttl, pinned, loop
        self.knobs = knobs or {}  # the policy's, told to the daemon at hello
        self.state = "awake"  # awake, sleeping, asleep, waking
        self.draining = False  # asked to sleep: new requests wait, in-flight finish
        self.in_flight = self.waiting = 0
        # A turn is the time from one wake to the next. The requests that waited
        # for a wake all run in the turn it begins, even if the daemon asks the
        # instance to sleep at once: ``owed`` of them are not admitted yet.
        self.turn = self.owed = 0
        self.wakes = self.sleeps = self.failed_wakes = self.failed_sleeps = 0
        # The daemon's asks ("wake", "sleep") scheduled on the loop and not done:
        # one of each at most, so that asking again never queues a second wake.
        self._asked: dict = {}
        # A pin, and a sleep's last look at it before the engine is told: one at
        # a time (the pin comes on the daemon's thread, the sleep on the loop).
        self._gate = threading.Lock()
        self.last_error = ""  # why the last wake or sleep failed, for whoever asked
        self.last_active = time.time()
        self.changed = asyncio.Condition()
        self.key, self.reconnect_s = key, reconnect_seconds()
        self.daemon = Client(socket_path, timeout=None)
        self._hello(self.daemon)
        threading.Thread(target=self._answer_daemon, name="vllm-mux", daemon=True).start()
        self._ttl_task = loop.create_task(self._sleep_when_idle())

    # -- requests --

    @asynccontextmanager
    async def request(self):
        """Hold the instance awake for one request, waking it first if need be."""
        arrived = self.turn
        self.waiting += 1
        try:
            await self._until_awake(arrived)
        finally:
            self.waiting -= 1
            if arrived < self.turn and self.owed:  # it waited for the last wake
                self.owed -= 1
                if not self.owed:
                    async with self.changed:
                        self.changed.notify_all()  # a drain may wait for it
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self.last_active = time.time()
            if self.in_flight == 0:
                async with self.changed:
                    self.changed.notify_all()

    async def _until_awake(self, arrived: int) -> None:
        """Until the instance is awake and admits this request: one that
        arrived before the last wake (``arrived`` is the turn then) is admitted
        even while the instance drains for a sleep."""
        failures = self.failed_wakes
        async with self.changed:
            while not (self.state == "awake" and (not self.draining or arrived < self.turn)):
                if self.failed_wakes != failures:
                    raise WakeError("the instance failed to wake; retry later")
                if self.state == "asleep" and not self.draining:
                    self.state = "waking"
                    break
                await self.changed.wait()
            else:
                return
        await self._unowned(self.wake())

    def _unowned(self, coroutine):
        """Run an engine transition in a task of its own: a request that
        started it may be cancelled (its client left), the transition must
        still finish and leave the state true."""
        return asyncio.shield(self._task(coroutine))

    def _task(self, coroutine) -> asyncio.Task:
        """A task whose failure nobody need retrieve: its coroutine records it."""
        task = self.loop.create_task(coroutine)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
        return task

    async def wake(self) -> None:
        """Wake now (the caller has set state to 'waking')."""
        error = None
        try:
            await self._wake_up()
        except Exception as e:  # no memory in time, daemon refused, worker failed
            error = e
        async with self.changed:
            self.state = "asleep" if error else "awake"
            if not error:
                self.turn += 1
                self.owed = self.waiting  # every one arrived before this wake
            self.wakes += error is None
            self.failed_wakes += error is not None
            self.last_error = str(error)[:500] if error else self.last_error
            self.last_active = time.time()
            self.changed.notify_all()
        if error:
            log.error("wake failed: %s", error)
            raise WakeError(f"the instance failed to wake: {error}") from error

    # -- sleeping --

    async def sleep(
        self, drain: bool = True, unless_pinned: bool = False, **upstream_kwargs
    ) -> bool:
        """Sleep once nothing is in flight (or at once, ``drain=False``, as
        upstream's ``/sleep`` does). False if already asleep or sleeping, or,
        ``unless_pinned`` (the mux's own sleeps: idle, or asked by the
        daemon), if a pin came before the engine was told."""
        async with self.changed:
            if self.state != "awake" or self.draining:
                return False
            self.draining = True
            try:
                if drain:  # what it admitted, and what waited for its last wake
                    await self.changed.wait_for(
                        lambda: (unless_pinned and self.pinned) or self.in_flight == self.owed == 0
                    )
            except BaseException:  # cancelled while draining: serve again
                self.draining = False
                self.changed.notify_all()
                raise
            with self._gate:
                if unless_pinned and self.pinned:  # called off: serve again
                    self.draining = False
                    self.changed.notify_all()
                    return False
                self.state = "sleeping"  # from here on a pin finds it going to sleep
        return await self._unowned(self._enter_sleep(upstream_kwargs))

    async def _enter_sleep(self, upstream_kwargs: dict) -> bool:
        error = None
        try:
            await self._sleep(**upstream_kwargs)
        except Exception as e:
            # The engine paused its scheduler before the worker failed: a wake
            # (the executor is not asleep) resumes it.
            log.exception("sleep failed; staying awake")
            with contextlib.suppress(Exception):
                await self._wake_up()
            error = e
        async with self.changed:
            self.state, self.draining = "awake" if error else "asleep", False
            self.sleeps += error is None
            self.failed_sleeps += error is not None
            self.last_error = str(error)[:500] if error else self.last_error
            if not error and self.waiting:
                # Requests waited through the drain: wake again now, in the same
                # step, so that whoever looks next sees it waking, not asleep.
                self.state = "waking"
                self._task(self.wake())
            self.changed.notify_all()
        return error is None

    async def wake_up(self) -> None:
        """An explicit wake (upstream's ``/wake_up``)."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.state in ("awake", "asleep"))
            if self.state == "awake":
                return
            self.state = "waking"
        await self._unowned(self.wake())

    async def _sleep_when_idle(self) -> None:
        """Checks ``pinned`` each time round: a pin may come and go at run time."""
        if self.idle_ttl <= 0:
            return
        while True:
            await asyncio.sleep(min(self.idle_ttl / 4, 1.0))
            idle = time.time() - self.last_active >= self.idle_ttl
            busy = self.in_flight or self.waiting
            if idle and not self.pinned and self.state == "awake" and not busy:
                log.info("idle for %.0f s: sleeping", self.idle_ttl)
                await self.sleep(unless_pinned=True)

    # -- the daemon --

    def report(self) -> dict:
        return {
            "ok": True,
            "state": self.state,
            "draining": self.draining,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "last_active": self.last_active,
            "wakes": self.wakes,
            "sleeps": self.sleeps,
            "failed_wakes": self.failed_wakes,
            "failed_sleeps": self.failed_sleeps,
            "last_error": self.last_error,
            "asked": sorted(op for op, done in self._asked.items() if not done.done()),
        }

    def _hello(self, client: Client) -> None:
        client.call(
            "hello",
            role="controller",
            key=self.key,
            pinned=self.pinned,
            idle_ttl=self.idle_ttl,
            knobs=self.knobs,
        )

    def _answer_daemon(self) -> None:
        """Answer the daemon's questions; when it goes away, reconnect (the
        daemon may know the instance again only once its worker has)."""
        while True:
            self._answer(self.daemon.sock)
            self.daemon.close()
            log.warning(
                "lost the vllm-mux daemon at %s; serving on and reconnecting",
                self.daemon.socket_path,
            )
            try:
                self.daemon = reconnect(self.daemon.socket_path, self._hello, self.reconnect_s)
            except DaemonError as e:
                return self._daemon_lost(e)
            log.warning("reconnected to the vllm-mux daemon at %s", self.daemon.socket_path)

    def _answer(self, sock) -> None:
        """Answer the daemon's questions at once, until the connection breaks;
        a sleep runs on the loop."""
        while True:
            try:
                message, fds = protocol.recv(sock)
                protocol.close_fds(fds)  # the daemon sends none with a question
            except (OSError, protocol.ProtocolError):
                message = None
            if message is None:
                return
            op = message.get("op")
            if op == "report":
                reply = self.report()
            elif op == "sleep" and (self.pinned or self.state != "awake"):
                why = "pinned" if self.pinned else "not_awake"
                reply = {"ok": False, "error": f"not asleep: {why}", "code": why}
            elif op in ("sleep", "wake"):
                # "ok" to a sleep tells the daemon this instance's memory is
                # coming back; it follows the outcome in report.
                self._ask(op)
                reply = {"ok": True}
            elif op in ("pin", "unpin"):
                with self._gate:  # the daemon's books follow once we answer
                    self.pinned = op == "pin"
                    state, draining = self.state, self.draining
                if self.pinned and draining and state == "awake":
                    draining = False  # its drain ends in a call-off: tell it now
                    asyncio.run_coroutine_threadsafe(self._notify(), self.loop)
                reply = {"ok": True, "state": state, "draining": draining}
            elif op == "drop_host" and self._drop_host and self.state == "asleep":
                # The worker tells the daemon when it has let the copy go, or
                # wakes first (then the daemon keeps the copy).
                asyncio.run_coroutine_threadsafe(self._drop_host(), self.loop)
                reply = {"ok": True}
            else:
                reply = {"ok": False, "error": f"cannot {op!r}"}
            try:
                protocol.send(sock, {**reply, "seq": message.get("seq")})
            except OSError:
                return

    def _ask(self, op: str) -> None:
        """Do the daemon's "sleep" or "wake" on the loop, unless one asked
        before is still to be done: a loop busy for a while must not pile up
        wakes that run one after another, each a wait for memory, long after
        the first one failed."""
        pending = self._asked.get(op)
        if pending is None or pending.done():
            work = self.sleep(unless_pinned=True) if op == "sleep" else self.wake_up()
            self._asked[op] = asyncio.run_coroutine_threadsafe(work, self.loop)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def _daemon_lost(self, error: DaemonError) -> None:
        log.critical(
            "lost the vllm-mux daemon for good: %s; this instance's memory is no longer "
            "accounted for; stopping the server",
            error,
        )
        self._on_lost()
