"""PeerWatch: under torchrun, a rank that dies stops the others in seconds, not after the
process-group timeout (60 minutes in train.py, sized for rank 0's teacher pass).

    watch = PeerWatch(rank, world, note=lambda: "the last checkpoint ... is kept")
    ...                         # train; after a collective fails: why = watch.verdict()
    watch.close(error=None)     # this rank ends (well, or with the error's gist)

Needs torch.distributed's TCPStore and torchrun's MASTER_ADDR / MASTER_PORT; nothing else.
"""
import contextlib
import datetime
import os
import sys
import threading
import time

import torch.distributed as dist

import nodes


class PeerWatch:
    """Heartbeats through torchrun's store, so a rank that dies stops the others in seconds.

    Every rank bumps its counter every BEAT_S seconds (a daemon thread: it beats while the main
    thread computes or waits in a collective) and watches the next rank's (a ring: store traffic
    grows with the world size, not its square). A neighbour silent for DEAD_AFTER_S (killed,
    crashed, its node gone), or a rank that ended with an error, sets one `abort` key naming it;
    every rank reads that key and stops with one line. A collective that fails asks `verdict` who
    is gone. torchrun's agent already stops the ranks on the dead rank's node; this covers the
    other nodes and NCCL collectives, which would otherwise wait out the process-group timeout."""
    BEAT_S = 0.5         # seconds between beats
    DEAD_AFTER_S = 10.0  # a silent neighbour is dead after this long
    CONFIRM_S = 2.0      # the silence that names a rank once a collective has failed

    def __init__(self, rank, world, note=lambda: ""):
        # note(): what the one line adds about the files kept (called only when this rank exits)
        self.rank, self.world, self.note = rank, world, note
        self.dead, self.limit = None, self.DEAD_AFTER_S
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"cdeit-watch/{attempt}/"  # one set of keys per attempt
        # a client of its own: the process group's store is busy in the main thread's collectives
        self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                   is_master=False,
                                   timeout=datetime.timedelta(seconds=self.DEAD_AFTER_S))
        self.store.set(self.key(f"who/{rank}"), nodes.who())  # named with its host across nodes
        self.found, self.quit = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="peer-watch")
        self.thread.start()

    def key(self, name):
        return self.prefix + name

    def _get(self, key):
        return self.store.get(key).decode() if self.store.check([key]) else None

    def _loop(self):
        peer, beat, last, since = (self.rank + 1) % self.world, 0, None, time.monotonic()
        while not self.quit.wait(self.BEAT_S):
            try:
                beat += 1
                self.store.set(self.key(f"beat/{self.rank}"), str(beat))
                why = self._get(self.key("abort"))
                # a peer that ended well is quiet
                if why is None and self._get(self.key(f"end/{peer}")) is None:
                    n, now = self._get(self.key(f"beat/{peer}")), time.monotonic()
                    if n is None or n != last:
                        last, since = n, now
                    elif now - since > self.limit:
                        name = self._get(self.key(f"who/{peer}")) or f"rank {peer}"
                        why = (f"{name} stopped responding {now - since:.0f}s ago "
                               "(killed, hung, crashed or its machine lost)")
                        # the first finder names it for all
                        self.store.compare_set(self.key("abort"), "", why)
                        why = self._get(self.key("abort"))
                if why is not None:
                    return self._stop(why)
            except Exception as e:  # noqa: BLE001  (the store lives in rank 0 or torchrun's agent)
                gist = str(e).splitlines()[0] if str(e) else type(e).__name__
                return self._stop(f"lost the rendezvous store {os.environ['MASTER_ADDR']}:"
                                  f"{os.environ['MASTER_PORT']}, so rank 0 or torchrun's agent is "
                                  f"gone ({gist})")

    def _stop(self, why):
        self.dead = why
        self.found.set()
        if not self.quit.wait(2.0):  # the main thread may be blocked in a collective: 2 s for it
            print(f"error: {nodes.who()}: {why}; {self.note()}", file=sys.stderr, flush=True)
            os._exit(1)

    def verdict(self):
        """After a failed collective: wait until the lost rank is named; None if none seems gone."""
        self.limit = self.CONFIRM_S  # a collective failed, so a rank is gone: a short silence does
        self.found.wait(self.DEAD_AFTER_S + 2)
        return self.dead

    def close(self, error=None):
        """This rank ends: well (the others stop watching it) or with an error (they stop too)."""
        self.quit.set()
        if self.thread is not threading.current_thread():
            # not mid store call at exit: that aborts the process
            self.thread.join(self.DEAD_AFTER_S + 1)
        with contextlib.suppress(Exception):
            if error:
                why = f"{nodes.who()} stopped with an error ({error})"
                self.store.compare_set(self.key("abort"), "", why)
            self.store.set(self.key(f"end/{self.rank}"), "ok" if not error else "error")
        self.store = None  # the client closes now, before the process group and the interpreter go
