"""Chaos test of normserve's durability (`make chaos`): rounds of kill -9
under load, damage to the store, and restarts, each checked against a
PyTorch replay of what the server acknowledged.

Each round:

1. Client processes (no torch in them) send train-mode Forwards with
   request ids to the sessions; each prints every request before sending it
   and every acknowledgement (session, request id, version) as it arrives.
2. After a random moment the server is killed with SIGKILL.
3. The store is damaged, or not: one of `none`, `flip` (one bit at a random
   place in sessions.redb), `flip-record` (one bit in the newest copy of a
   random session's record), `truncate` (the file cut at a random length,
   sometimes 0) or `delete`.
4. The server is started again on the data directory. Then:
   - it starts: every session must be whole, or DATA_LOSS (only after
     damage). Requests sent but not acknowledged are retried with the same
     request id (applied at most once); then each session's versions must be
     2..n+1 for its n acknowledged requests (none applied twice, none lost),
     and its running statistics and num_batches_tracked must equal
     torch.nn.BatchNorm1d fed the acknowledged batches in version order.
   - it refuses: only after damage, and with a message naming
     --accept-store-rollback or `normserve store salvage`. The operator's way
     out is then taken: `store check` (must report problems), `store
     salvage` into a new directory, and a start on it. Every session salvage
     calls whole or recovered must be whole as above; one it calls older or
     unconfirmed (it could not tell, redb's index being unusable) must be
     whole, or equal the replay of its first k < n acknowledged batches (a
     loss it announced); one it calls lost must be absent. A missing or
     emptied store (nothing to salvage) is started with
     --accept-store-rollback and must hold no session.
   A session found DATA_LOSS, behind or lost is deleted and created again,
   and its oracle starts over.

Anything else is a failure: a refusal after a plain kill, a session behind
its acknowledged steps without DATA_LOSS or a salvage report saying so, a
step applied twice, a state PyTorch disagrees with.

Usage: tests/chaos/chaos.py [--rounds 20] [--seconds 300] [--clients 3]
[--sessions 4] [--seed N] [--damages KIND,...] [--json PATH]. NORMSERVE_BIN names the server
binary (default target/release/normserve). Exits 1 on any failure.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from normserve import codec  # noqa: E402
from normserve.v1 import batch_norm_pb2 as bn  # noqa: E402
from normserve.v1 import batch_norm_pb2_grpc  # noqa: E402

# The sessions: BatchNorm1d(features, momentum), inputs (batch, features).
SPECS = [(4, 0.1), (3, None), (5, 0.3), (2, 0.5), (6, 0.1), (3, 0.2)]
BATCH = 6
DAMAGES = ["none", "none", "flip", "flip-record", "flip-record", "truncate", "delete"]


def batch(seed, features):
    """The input of one request, regenerated from its seed by the driver."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((BATCH, features)) * 2 + 1).astype(np.float32)


# ---------------------------------------------------------------- client --

def client_main(spec):
    """One load process: Forwards until the server goes away or the plan ends.
    Prints `send SID RID SEED` before a request, `ack SID RID VERSION` after."""
    rng = random.Random(spec["seed"])
    channel = grpc.insecure_channel(spec["address"])
    stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
    sessions = spec["sessions"]
    for seq in range(spec["requests"]):
        sid, features = sessions[rng.randrange(len(sessions))]
        seed = rng.randrange(2**62)
        rid = f"{spec['name']}-{seq}"
        print(f"send {sid} {rid} {seed}", flush=True)
        request = bn.ForwardRequest(session_id=sid, input=codec.encode(batch(seed, features)),
                                    mode=bn.MODE_TRAIN, request_id=rid)
        try:
            reply = stub.Forward(request, timeout=10)
        except grpc.RpcError as error:
            print(f"error {sid} {rid} {error.code().name}", flush=True)
            return
        print(f"ack {sid} {rid} {reply.version}", flush=True)


# ---------------------------------------------------------------- server --

class Server:
    def __init__(self, binary, data_dir, *args):
        started = time.monotonic()
        self.proc = subprocess.Popen([binary, "--listen", "127.0.0.1:0", "--data-dir", data_dir, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        self.started_ms = (time.monotonic() - started) * 1e3
        if not line.startswith("normserve listening on "):
            self.proc.wait(timeout=60)
            self.address = None
            self.stderr = self.proc.stderr.read()
            return
        self.address = line.split()[3]
        self.stderr = ""
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=lambda s=stream: [None for _ in s], daemon=True).start()

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        return self.proc.returncode


def store_command(binary, *args):
    done = subprocess.run([binary, "store", *args, "--json"], capture_output=True, text=True, timeout=300)
    report = json.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, report, done.stderr


# ---------------------------------------------------------------- damage --

def damage(kind, path, rng):
    """Damages the store file; returns a description."""
    if kind == "none" or not os.path.exists(path):
        return kind
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if kind == "delete":
        os.remove(path)
        return kind
    if kind == "truncate":
        size = 0 if rng.random() < 0.3 else rng.randrange(len(data))
        os.truncate(path, size)
        return f"truncate to {size} of {len(data)}"
    if kind == "flip":
        at = rng.randrange(len(data))
    else:
        # The newest copy of a random session: the frame with its highest
        # version is hard to tell from bytes, so: a random intact frame's
        # last copy in the file (redb writes new pages after old ones mostly).
        frames = []
        start = 0
        while (at := data.find(b"NSRC\x01\x00\x00\x00", start)) >= 0:
            frames.append(at)
            start = at + 1
        if not frames:
            return "flip-record (no record found)"
        frame = frames[rng.randrange(max(1, len(frames) - 4), len(frames) + 1) - 1]
        at = min(len(data) - 1, frame + 12 + rng.randrange(8, 48))
    data[at] ^= 1 << rng.randrange(8)
    with open(path, "wb") as f:
        f.write(data)
    return f"{kind} at {at} of {len(data)}"


# ---------------------------------------------------------------- oracle --

class Session:
    def __init__(self, sid, features, momentum):
        self.sid, self.features, self.momentum = sid, features, momentum
        self.acked = {}    # request id -> (version, seed)
        self.pending = {}  # request id -> seed: sent, not acknowledged

    def create(self, stub):
        import torch
        self.acked, self.pending = {}, {}
        module = torch.nn.BatchNorm1d(self.features, momentum=self.momentum)
        request = bn.CreateSessionRequest(session_id=self.sid, kind=bn.BATCH_NORM_1D,
                                          num_features=self.features, eps=module.eps)
        if self.momentum is None:
            request.cumulative_average = True
        else:
            request.momentum = self.momentum
        stub.CreateSession(request)

    def replay(self, count=None):
        """torch.nn.BatchNorm1d fed the first `count` acknowledged batches."""
        import torch
        module = torch.nn.BatchNorm1d(self.features, momentum=self.momentum)
        module.train()
        steps = sorted(self.acked.values())[:count]
        for _, seed in steps:
            with torch.no_grad():
                module(torch.from_numpy(batch(seed, self.features)))
        return module

    def check(self, session, count=None):
        """Problems of the served `session` against the replay of `count` steps."""
        import torch
        from normserve import codec as c
        n = len(self.acked) if count is None else count
        problems = []
        versions = sorted(v for v, _ in self.acked.values())[:n]
        if versions != list(range(2, 2 + n)):
            problems.append(f"{self.sid}: acknowledged versions {versions} are not 2..{n + 1}")
        if (session.version, session.num_batches_tracked) != (1 + n, n):
            problems.append(f"{self.sid}: version {session.version}, num_batches_tracked "
                            f"{session.num_batches_tracked}; {n} steps acknowledged")
            return problems
        module = self.replay(n)
        for key in ("running_mean", "running_var"):
            got = c.to_torch(getattr(session, key))
            try:
                torch.testing.assert_close(got, getattr(module, key))
            except AssertionError as error:
                problems.append(f"{self.sid}: {key} differs from PyTorch: {error}")
        return problems


# ---------------------------------------------------------------- driver --

class Chaos:
    def __init__(self, args):
        self.args = args
        self.binary = os.environ.get("NORMSERVE_BIN", os.path.join(ROOT, "target", "release", "normserve"))
        self.rng = random.Random(args.seed)
        self.work = tempfile.mkdtemp(prefix="normserve-chaos-")
        self.data_dir = os.path.join(self.work, "data-0")
        self.sessions = [Session(f"chaos-{i}", *SPECS[i % len(SPECS)]) for i in range(args.sessions)]
        self.failures = []
        self.stats = {"rounds": 0, "kills": 0, "acknowledged": 0, "retried": 0, "damage": {},
                      "outcomes": {}, "client_errors": {}, "data_loss_sessions": 0, "announced_short": {}, "lost_sessions": 0,
                      "emptied_sessions": 0, "unlisted_sessions": 0,
                      "restart_ms": [], "salvage_ms": [], "salvage_sessions": []}
        self.generation = 0
        self.damaged = False
        self.unconfirmed = False
        self.what = ""

    def count(self, table, key):
        self.stats[table][key] = self.stats[table].get(key, 0) + 1

    def fail(self, round_no, message):
        self.failures.append(f"round {round_no} ({self.what}): {message}")
        print(f"FAIL round {round_no} ({self.what}): {message}", flush=True)

    def stub(self, address):
        channel = grpc.insecure_channel(address)
        return channel, batch_norm_pb2_grpc.BatchNormServiceStub(channel)

    def start(self, *args):
        server = Server(self.binary, self.data_dir, *args)
        if server.address:
            self.stats["restart_ms"].append(server.started_ms)
        return server

    def load(self, address, round_no):
        """Starts the client processes; returns them."""
        clients = []
        for c in range(self.args.clients):
            spec = {"address": address, "seed": self.rng.randrange(2**62), "requests": 100000,
                    "name": f"r{round_no}c{c}",
                    "sessions": [(s.sid, s.features) for s in self.sessions]}
            # stderr inherited: a client's traceback shows in the driver's output.
            proc = subprocess.Popen([sys.executable, __file__, "--client", json.dumps(spec)],
                                    stdout=subprocess.PIPE, text=True)
            clients.append(proc)
        # Under load from here: each client has sent its first request.
        first = [proc.stdout.readline() for proc in clients]
        return clients, first

    def collect(self, clients, first):
        by_id = {s.sid: s for s in self.sessions}
        for proc, head in zip(clients, first):
            # read(), not communicate(): readline() above filled the buffer.
            out = proc.stdout.read()
            proc.wait(timeout=120)
            sent = {}
            for line in (head + out).splitlines():
                parts = line.split()
                if parts[0] == "send":
                    sent[parts[2]] = (parts[1], int(parts[3]))
                elif parts[0] == "ack":
                    sid, rid, version = parts[1], parts[2], int(parts[3])
                    by_id[sid].acked[rid] = (version, sent.pop(rid)[1])
                    self.stats["acknowledged"] += 1
                elif parts[0] == "error":
                    self.count("client_errors", parts[3])
            for rid, (sid, seed) in sent.items():
                by_id[sid].pending[rid] = seed

    def retry_pending(self, stub, session):
        for rid, seed in sorted(session.pending.items()):
            request = bn.ForwardRequest(session_id=session.sid, mode=bn.MODE_TRAIN, request_id=rid,
                                        input=codec.encode(batch(seed, session.features)))
            reply = stub.Forward(request, timeout=30)
            session.acked[rid] = (reply.version, seed)
            self.stats["retried"] += 1
        session.pending = {}

    def recreate(self, stub, session):
        try:
            stub.DeleteSession(bn.DeleteSessionRequest(session_id=session.sid))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
        session.create(stub)

    def verify(self, round_no, address, verdicts=None):
        """Checks every session on a started server; `verdicts`: salvage's
        report by session id (after a salvage)."""
        channel, stub = self.stub(address)
        try:
            for session in self.sessions:
                verdict = (verdicts or {}).get(session.sid)
                try:
                    served = stub.GetSession(bn.GetSessionRequest(session_id=session.sid), timeout=30).session
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.DATA_LOSS and verdicts is None and self.damaged:
                        self.stats["data_loss_sessions"] += 1
                        self.recreate(stub, session)
                        continue
                    if error.code() == grpc.StatusCode.NOT_FOUND and verdict and verdict["verdict"] == "lost":
                        self.stats["lost_sessions"] += 1
                        session.create(stub)
                        continue
                    if error.code() == grpc.StatusCode.NOT_FOUND and verdict is None and self.unconfirmed:
                        # No byte of it left, and the report said nothing
                        # could be confirmed (redb's index unusable).
                        self.stats["unlisted_sessions"] += 1
                        session.create(stub)
                        continue
                    self.fail(round_no, f"{session.sid}: {error.code().name} {error.details()} (salvage: {verdict})")
                    self.recreate(stub, session)
                    continue
                if verdict and verdict["verdict"] in ("older", "unconfirmed") \
                        and served.version - 1 < len(session.acked):
                    # Announced: the session may be behind; it must be a
                    # state it really had after its first k steps.
                    problems = session.check(served, served.version - 1)
                    if problems:
                        self.fail(round_no, "; ".join(problems))
                    self.count("announced_short", verdict["verdict"])
                    self.recreate(stub, session)
                    continue
                if verdicts is not None and verdict is None:
                    self.fail(round_no, f"{session.sid}: served after salvage but not in its report")
                self.retry_pending(stub, session)
                served = stub.GetSession(bn.GetSessionRequest(session_id=session.sid), timeout=30).session
                for problem in session.check(served):
                    self.fail(round_no, problem)
                    self.recreate(stub, session)
                    break
        finally:
            channel.close()

    def salvage(self, round_no):
        """The operator's way out of a refused start; returns the new server."""
        code, report, stderr = store_command(self.binary, "check", "--data-dir", self.data_dir)
        if code != 1 or report is None or report["whole"]:
            self.fail(round_no, f"store check on a refused store: exit {code}, {report}, {stderr}")
        self.generation += 1
        out = os.path.join(self.work, f"data-{self.generation}")
        started = time.monotonic()
        code, report, stderr = store_command(self.binary, "salvage", "--data-dir", self.data_dir, "--out", out)
        elapsed = (time.monotonic() - started) * 1e3
        if code not in (0, 1) or report is None:
            self.fail(round_no, f"store salvage: exit {code}: {stderr}")
            return None, None
        self.stats["salvage_ms"].append(elapsed)
        self.stats["salvage_sessions"].append(report["salvaged"]["written"])
        redb = report["redb"]
        self.unconfirmed = not redb["opens"] or redb["commits"] < (report["commit_mark"] or 0)
        bad = [s for s in report["sessions"] if s["verdict"] not in ("whole", "recovered")]
        # Without a trusted index nothing is confirmed: exit 1 even when every
        # session was found whole.
        if self.unconfirmed:
            if code != 1:
                self.fail(round_no, f"store salvage exit {code} without redb's index")
        elif (code == 0) != (not bad):
            self.fail(round_no, f"store salvage exit {code} with {bad}")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir = out
        return self.start(), {s["id"]: s for s in report["sessions"]}

    def round(self, round_no, server):
        clients, first = self.load(server.address, round_no)
        time.sleep(self.rng.uniform(0.2, 1.0))  # load for a while, then the kill
        server.kill9()
        self.stats["kills"] += 1
        self.collect(clients, first)
        if self.args.damages:
            kinds = self.args.damages.split(",")
            kind = kinds[(round_no - 1) % len(kinds)]
        else:
            kind = self.rng.choice(DAMAGES)
        self.count("damage", kind)
        what = damage(kind, os.path.join(self.data_dir, "sessions.redb"), self.rng)
        self.damaged = kind != "none"
        self.what = what
        server = self.start()
        print(f"round {round_no}: {what}: {'started' if server.address else 'refused'}", flush=True)
        if server.address:
            self.count("outcomes", "started")
            self.verify(round_no, server.address)
            return server
        refusal = server.stderr
        if not self.damaged:
            self.fail(round_no, f"refused to start after a plain kill -9: {refusal[-2000:]}")
            return None
        if "missing or empty" in refusal:
            self.count("outcomes", "refused: missing or empty")
            server = self.start("--accept-store-rollback")
            if not server.address:
                self.fail(round_no, f"--accept-store-rollback did not start: {server.stderr[-2000:]}")
                return None
            channel, stub = self.stub(server.address)
            for session in self.sessions:
                try:
                    stub.GetSession(bn.GetSessionRequest(session_id=session.sid), timeout=30)
                    self.fail(round_no, f"{session.sid} served from an emptied store")
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        self.fail(round_no, f"{session.sid}: {error.code().name} from an emptied store")
                self.stats["emptied_sessions"] += 1
                self.recreate(stub, session)
            channel.close()
            return server
        if "gone back in time" in refusal:
            self.count("outcomes", "refused: gone back in time")
        elif "store salvage" in refusal:
            self.count("outcomes", "refused: damaged")
        else:
            self.fail(round_no, f"refused ({what}) without naming a way out: {refusal[-2000:]}")
            return None
        server, verdicts = self.salvage(round_no)
        if server is None or not server.address:
            self.fail(round_no, f"the salvaged store did not start: {server and server.stderr[-2000:]}")
            return None
        self.verify(round_no, server.address, verdicts)
        return server

    def run(self):
        os.makedirs(self.data_dir)
        server = self.start()
        if not server.address:
            raise RuntimeError(server.stderr)
        channel, stub = self.stub(server.address)
        for session in self.sessions:
            session.create(stub)
        channel.close()
        deadline = time.monotonic() + self.args.seconds
        round_no = 0
        while round_no < self.args.rounds and time.monotonic() < deadline:
            round_no += 1
            server = self.round(round_no, server)
            self.stats["rounds"] = round_no
            if server is None:
                break
        if server is not None:
            server.stop()
        shutil.rmtree(self.work, ignore_errors=True)
        return self.report()

    def report(self):
        stats = dict(self.stats)
        for key in ("restart_ms", "salvage_ms"):
            values = stats.pop(key)
            stats[key] = {"count": len(values), "median": statistics.median(values) if values else None,
                          "max": max(values) if values else None}
        sizes = stats.pop("salvage_sessions")
        stats["salvage_sessions_max"] = max(sizes) if sizes else 0
        stats["failures"] = self.failures
        stats["ok"] = not self.failures
        return stats


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--client":
        client_main(json.loads(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--damages", default=None,
                        help="damage kinds to cycle through, e.g. none,flip-record,truncate,delete "
                             "(default: a random one each round)")
    parser.add_argument("--json", default=None, help="write the summary here too")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.randrange(2**31)
    import torch
    torch.set_num_threads(1)
    report = Chaos(args).run()
    report["seed"] = args.seed
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
