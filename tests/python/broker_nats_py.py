#!/usr/bin/env python3
"""The embedded broker with the Python NATS client (nats-py), unchanged.

Starts `syncgate broker` on a random loopback port (read back from its log),
runs a subset of the broker tests, and prints `N passed, M failed`.
Usage: broker_nats_py.py [path/to/syncgate]
"""

import asyncio
import json
import os
import subprocess
import sys
import threading
import traceback

import nats
from nats.errors import NoRespondersError, MaxPayloadError

SYNCGATE = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SYNCGATE_BIN", "target/debug/syncgate")


class Broker:
    """A `syncgate broker` process; its address is read from its JSON log."""

    def __init__(self, *flags):
        self.proc = subprocess.Popen(
            [SYNCGATE, "broker", "--broker-listen", "127.0.0.1:0", "--log-format", "json", *flags],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = None
        for line in self.proc.stderr:
            try:
                fields = json.loads(line).get("fields", {})
            except json.JSONDecodeError:
                continue
            if fields.get("message") == "broker listening":
                self.url = "nats://" + fields["addr"]
                break
        if self.url is None:
            raise RuntimeError(f"broker did not start (exit {self.proc.wait()})")
        # Keep reading its log so a full pipe never blocks the broker.
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


async def test_pub_sub_wildcards(b):
    nc = await nats.connect(b.url)
    got = {"exact": [], "star": [], "tail": []}

    async def collect(name):
        async def cb(msg):
            got[name].append(msg.subject)
        return cb

    await nc.subscribe("orders.created", cb=await collect("exact"))
    await nc.subscribe("orders.*", cb=await collect("star"))
    await nc.subscribe("orders.>", cb=await collect("tail"))
    await nc.flush()
    await nc.publish("orders.created", b"1")
    await nc.publish("orders.eu.created", b"2")
    await nc.publish("orders", b"3")
    await nc.flush()
    # A request to ourselves is a barrier: everything before it has been dispatched.
    sub = await nc.subscribe("barrier")
    await nc.publish("barrier", b"")
    await sub.next_msg(timeout=10)
    assert got == {
        "exact": ["orders.created"],
        "star": ["orders.created"],
        "tail": ["orders.created", "orders.eu.created"],
    }, got
    await nc.close()


async def test_queue_group(b):
    nc = await nats.connect(b.url)
    counts = [0, 0, 0]
    done = asyncio.Event()
    total = 90

    def member(i):
        async def cb(msg):
            counts[i] += 1
            if sum(counts) == total:
                done.set()
        return cb

    for i in range(3):
        await nc.subscribe("work", queue="workers", cb=member(i))
    await nc.flush()
    for i in range(total):
        await nc.publish("work", str(i).encode())
    await asyncio.wait_for(done.wait(), 10)
    assert sum(counts) == total and all(c > 0 for c in counts), counts
    await nc.close()


async def test_request_reply_and_no_responders(b):
    nc = await nats.connect(b.url)

    async def echo(msg):
        await msg.respond(b"echo:" + msg.data)

    await nc.subscribe("svc.echo", cb=echo)
    await nc.flush()
    reply = await nc.request("svc.echo", b"hi", timeout=10)
    assert reply.data == b"echo:hi", reply.data
    try:
        await nc.request("svc.nobody", b"", timeout=10)
        raise AssertionError("expected no responders")
    except NoRespondersError:
        pass
    await nc.close()


async def test_headers(b):
    nc = await nats.connect(b.url)
    sub = await nc.subscribe("h")
    await nc.publish("h", b"body", headers={"Nats-Msg-Id": "op-1", "Syncgate-Seq": "7"})
    msg = await sub.next_msg(timeout=10)
    assert msg.headers == {"Nats-Msg-Id": "op-1", "Syncgate-Seq": "7"}, msg.headers
    assert msg.data == b"body"
    await nc.close()


async def test_unsubscribe_after(b):
    nc = await nats.connect(b.url)
    sub = await nc.subscribe("limited")
    await sub.unsubscribe(limit=2)
    for i in range(5):
        await nc.publish("limited", str(i).encode())
    await nc.flush()
    first = await sub.next_msg(timeout=10)
    second = await sub.next_msg(timeout=10)
    assert (first.data, second.data) == (b"0", b"1")
    # A later subscriber to the same subject still gets messages; the limited one got 2.
    await nc.close()


async def _quiet(_err):
    """Keeps nats-py from printing the refusal this test expects."""


async def test_bad_credentials(_):
    b = Broker("--broker-token", "right-token")
    try:
        try:
            await nats.connect(
                b.url, token="wrong-token", allow_reconnect=False, max_reconnect_attempts=0, error_cb=_quiet
            )
            raise AssertionError("a wrong token was accepted")
        except AssertionError:
            raise
        except Exception as e:  # nats-py raises its own error types here
            assert "authorization" in str(e).lower() or "Authorization" in repr(e), repr(e)
        nc = await nats.connect(b.url, token="right-token")
        await nc.flush()
        await nc.close()
    finally:
        b.stop()


async def test_max_payload(_):
    b = Broker("--broker-max-payload", "1KiB")
    try:
        nc = await nats.connect(b.url)
        assert nc.max_payload == 1024, nc.max_payload
        try:
            await nc.publish("big", b"x" * 2048)
            raise AssertionError("an over-size payload was accepted")
        except MaxPayloadError:
            pass
        await nc.publish("small", b"x" * 1024)
        await nc.flush()
        await nc.close()
    finally:
        b.stop()


TESTS = [
    test_pub_sub_wildcards,
    test_queue_group,
    test_request_reply_and_no_responders,
    test_headers,
    test_unsubscribe_after,
    test_bad_credentials,
    test_max_payload,
]


async def main():
    broker = Broker()
    passed = failed = 0
    try:
        for test in TESTS:
            try:
                await asyncio.wait_for(test(broker), 60)
                print(f"PASS {test.__name__}")
                passed += 1
            except Exception:
                print(f"FAIL {test.__name__}")
                traceback.print_exc()
                failed += 1
    finally:
        broker.stop()
    print(f"nats-py: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
