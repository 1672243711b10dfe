"""A loopback TCP proxy whose link a test cuts, pauses or delays: the
network between two regions, without `tc netem`. Clients of each region
keep their own direct connections, so a cut is a partition, not a crash.
It runs its own event loop in a thread; every method may be called from
the test."""

import asyncio
import threading


class FaultProxy:
    def __init__(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.state = "up"
        self.delay = 0.0
        self.conns = set()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(10)

    def _run(self, started):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    async def _accept(self, reader, writer):
        if self.state == "cut":
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        pair = (writer, up_w)
        self.conns.add(pair)
        await asyncio.gather(self._pump(reader, up_w, False), self._pump(up_r, writer, True),
                             return_exceptions=True)
        self.conns.discard(pair)
        for w in pair:
            w.close()

    async def _pump(self, reader, writer, reply):
        while True:
            data = await reader.read(65536)
            if not data:
                break
            while self.state == "paused" or (reply and self.state == "replies-paused"):
                await asyncio.sleep(0.02)
            if self.state == "cut":
                break
            if self.delay:
                await asyncio.sleep(self.delay)
            writer.write(data)
            await writer.drain()
        writer.close()

    def _call(self, f):
        done = threading.Event()

        def run():
            f()
            done.set()
        self.loop.call_soon_threadsafe(run)
        done.wait(10)

    def cut(self):
        """Drops every connection and refuses new ones."""
        def f():
            self.state = "cut"
            for pair in list(self.conns):
                for w in pair:
                    w.transport.abort()
            self.conns.clear()
        self._call(f)

    def pause(self):
        """Holds every byte, with connections open (a black hole)."""
        self._call(lambda: setattr(self, "state", "paused"))

    def pause_replies(self):
        """Holds what the target sends back, while what is sent to it
        still arrives: requests are served and their answers lost."""
        self._call(lambda: setattr(self, "state", "replies-paused"))

    def heal(self):
        self._call(lambda: setattr(self, "state", "up"))

    def close(self):
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
