"""A bounded soak test of normserve: mixed load from many clients, including
failures and cancellations, for a fixed time; then the figures and three
verdicts.

1. Status codes. Every call has a kind, and every kind a set of expected
   codes (a malformed input: INVALID_ARGUMENT; an unknown session: NOT_FOUND;
   a cancelled call: CANCELLED or OK; a call with a deadline of a few
   milliseconds: DEADLINE_EXCEEDED or OK; ...). Any call may be shed with
   RESOURCE_EXHAUSTED naming max_concurrent_requests (the server runs with a
   small --max-concurrent-requests so that shedding happens), except health
   checks. Anything else (INTERNAL, UNAVAILABLE, UNKNOWN, a bad call that
   succeeds, a wrong number in a reply) is a failure. The server's own
   /metrics must show no INTERNAL/UNKNOWN/DATA_LOSS/UNAVAILABLE answer and no
   store error, and no request still in progress once the load has stopped.
2. Memory. The server's VmRSS is sampled every 0.5 s. glibc keeps freed large
   buffers for reuse (src/memory.rs), so the resident set settles at the
   working set's peak: the reference is the peak during the warm-up (the
   first third of the run, at most 15 s), and the peak after it may exceed
   that by at most --rss-bound-mib.
3. Consistency. Every train-mode Forward on a shared session sends the same
   batch, so the state after k applied steps does not depend on their order:
   at the end each shared session's num_batches_tracked k must lie between
   the acknowledged steps and those plus the steps whose fate the client
   cannot know (cancelled, past their deadline, unanswered in a cancelled
   stream), and its running statistics must equal torch.nn.BatchNorm*d's
   after k steps on that batch. Eval outputs, exports and other sessions are
   checked against PyTorch too, and a restart of the server on the same data
   directory must serve exactly the same sessions.

Usage: tests/soak/soak.py [--duration 60] [--processes 3] [--threads 8] ...
(NORMSERVE_BIN names the server binary; default target/release/normserve).
Writes target/soak/soak.json and exits 1 on any failure.
"""

import argparse
import collections
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from normserve import codec  # noqa: E402
from normserve.v1 import (  # noqa: E402
    batch_norm_pb2 as bn,
    batch_norm_pb2_grpc,
    compare_pb2,
    compare_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
    tensor_pb2,
)

OK = "OK"
SHED = "SHED"  # RESOURCE_EXHAUSTED naming max_concurrent_requests
# CANCELLED "Timeout expired": tonic's answer when a call's grpc-timeout
# passes in the server (its grpc_timeout layer; the gRPC spec says
# DEADLINE_EXCEEDED). Counted apart so that the figures show it.
SERVER_TIMEOUT = "CANCELLED:timeout"
# Codes the server must never give in this soak, whatever the call, as the
# server's /metrics labels them (also for calls whose client has gone away).
SERVER_FAULT_CODES = ("INTERNAL", "UNKNOWN", "DATA_LOSS", "UNAVAILABLE")
MAX_MESSAGE_BYTES = 1 << 20
# google.rpc.Code values (StreamError.code) -> names, as grpc.StatusCode.
RPC_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
F32 = tensor_pb2.DATA_TYPE_FLOAT32
F64 = tensor_pb2.DATA_TYPE_FLOAT64
FLOAT_TOLERANCE = {"float32": (1.3e-6, 1e-5), "float64": (1e-7, 1e-7)}

# Each kind of call and the codes it may end with (SHED is allowed for every
# kind but health, see `Recorder.call`). A kind's weight is how often a
# client picks the operation that makes it.
EXPECTED = {
    "train": {OK},
    "train_cancel": {OK, "CANCELLED"},
    "train_deadline": {OK, "DEADLINE_EXCEEDED", SERVER_TIMEOUT},
    "eval_frozen": {OK},
    "eval_big": {OK},
    "eval_shared": {OK},
    "stream": {OK},
    "stream_msg": {OK, "INVALID_ARGUMENT", "NOT_FOUND"},
    "stream_cancel": {OK, "CANCELLED"},
    "get": {OK},
    "list": {OK},
    "compare": {OK},
    "export": {OK},
    "import": {OK},
    "import_bad": {"INVALID_ARGUMENT"},
    "create": {OK},
    "churn_forward": {OK},
    "delete": {OK},
    "get_deleted": {"NOT_FOUND"},
    "bad_channels": {"INVALID_ARGUMENT"},
    "bad_length": {"INVALID_ARGUMENT"},
    "bad_dtype": {"INVALID_ARGUMENT"},
    "bad_rank": {"INVALID_ARGUMENT"},
    "unknown_session": {"NOT_FOUND"},
    "oversized": {"RESOURCE_EXHAUSTED"},
    "health": {OK},
    "server_info": {OK},
}
OPERATION_WEIGHTS = {
    "train": 20, "train_cancel": 4, "train_deadline": 4,
    "eval_frozen": 6, "eval_big": 2, "eval_shared": 4,
    "stream": 4, "stream_cancel": 2,
    "get": 4, "list": 2, "compare": 2, "export": 3,
    "import": 2, "import_bad": 1, "churn": 4,
    "bad_input": 4, "unknown_session": 2, "oversized": 1,
    "health": 1, "server_info": 1,
}

# The shared sessions: several writers each, one configuration per kind of
# layer and update rule. momentum None: cumulative average.
SHARED = [
    {"id": "shared-1d", "kind": "1d", "shape": (16, 8), "dtype": "float32", "momentum": 0.1},
    {"id": "shared-1d-seq", "kind": "1d", "shape": (8, 4, 6), "dtype": "float32", "momentum": None},
    {"id": "shared-2d", "kind": "2d", "shape": (4, 3, 5, 5), "dtype": "float32", "momentum": 0.3},
    {"id": "shared-3d", "kind": "3d", "shape": (2, 2, 3, 3, 3), "dtype": "float64", "momentum": 0.1},
]
FROZEN = {"id": "frozen", "num_features": 5, "eps": 1e-3, "num_batches_tracked": 5}
KIND_ENUM = {"1d": bn.BATCH_NORM_1D, "2d": bn.BATCH_NORM_2D, "3d": bn.BATCH_NORM_3D}


def channel_options():
    return [
        ("grpc.max_send_message_length", 8 * MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", 8 * MAX_MESSAGE_BYTES),
        ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
    ]


def tensor(array):
    """A numpy array as a raw little-endian Tensor message."""
    return codec.encode(np.ascontiguousarray(array))


def to_array(message):
    return np.array(codec.to_numpy(message), copy=True)


def close(got, want, dtype, scale=1.0):
    rtol, atol = FLOAT_TOLERANCE[dtype]
    return got.shape == want.shape and np.allclose(got, want, rtol=rtol * scale, atol=atol * scale)


def expected_running(spec, k):
    """running_mean, running_var after k identical steps, in closed form
    (float64): for the mid-run snapshots. The end uses PyTorch itself."""
    mean, var = spec["batch_mean"], spec["batch_var_unbiased"]
    if k == 0:
        return np.zeros_like(mean), np.ones_like(var)
    if spec["momentum"] is None:  # cumulative average of identical batches
        return mean, var
    keep = (1.0 - spec["momentum"]) ** k
    return mean * (1 - keep), var * (1 - keep) + keep


# ---------------------------------------------------------------- the server

class Server:
    """normserve on an ephemeral loopback port; its log goes to a file, scanned
    at the end for panics and errors."""

    def __init__(self, binary, data_dir, args, log_path):
        self.args = [binary, "--listen", "127.0.0.1:0", "--data-dir", data_dir, *args]
        self.log_file = open(log_path, "a")
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self.log_file, text=True)
        # The server prints one line once it is bound.
        line = self.proc.stdout.readline()
        if not line.startswith("normserve listening on "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}; see {log_path}")
        self.address = line.split()[3]
        self.pid = self.proc.pid
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def rss_kib(self):
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


def scrape_metrics(address):
    """The Prometheus text as {(name, frozenset(labels)): value}."""
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$", line)
        if not match:
            continue
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(3) or ""))
        samples[(match.group(1), labels)] = float(match.group(4))
    return samples


# ---------------------------------------------------------- the load clients

class Recorder:
    """Counts calls by (kind, outcome) and keeps the first failures."""

    def __init__(self, worker):
        self.worker = worker
        self.counts = collections.Counter()
        self.failures = []
        self.failure_count = 0
        self.shed = False  # the last call was shed: the client backs off

    def fail(self, kind, text):
        self.failure_count += 1
        if len(self.failures) < 40:
            self.failures.append(f"[{self.worker}] {kind}: {text}")

    def outcome(self, kind, error):
        """Records a finished call (error None: OK) and returns its outcome."""
        if error is None:
            label = OK
        else:
            code = error.code()
            details = error.details() or ""
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_requests" in details:
                label = SHED
            elif code == grpc.StatusCode.CANCELLED and details == "Timeout expired":
                label = SERVER_TIMEOUT
            else:
                label = code.name
        self.counts[(kind, label)] += 1
        self.shed = self.shed or label == SHED
        allowed = EXPECTED[kind] | ({SHED} if kind != "health" else set())
        if label not in allowed:
            detail = "" if error is None else f" ({error.details()!r})"
            self.fail(kind, f"unexpected {label}{detail}")
        return label

    def call(self, kind, fn, *args, **kwargs):
        """(outcome, reply or None)."""
        try:
            reply = fn(*args, **kwargs)
        except grpc.RpcError as error:
            return self.outcome(kind, error), None
        return self.outcome(kind, None), reply


class Client:
    """One load thread: picks operations at random until the end time."""

    def __init__(self, plan, stubs, recorder, ledger, name, rng):
        self.plan = plan
        self.bn, self.compare, self.server, self.health = stubs
        self.rec = recorder
        self.ledger = ledger  # shared session id -> Counter(acked, uncertain, max_seen)
        self.name = name
        self.rng = rng
        self.churn_serial = 0
        self.import_id = f"import-{name}"
        self.import_version = None
        self.imports_acked = 0
        self.undeleted = []

    # -- helpers

    def shared(self):
        return self.rng.choice(self.plan["shared"])

    def train_request(self, spec):
        return bn.ForwardRequest(session_id=spec["id"], input=spec["x_proto"], mode=bn.MODE_TRAIN)

    def check_train_reply(self, spec, reply, kind):
        """A train reply: counters agree, and the output (batch statistics and
        the untouched weight/bias) is PyTorch's."""
        if reply.version != reply.num_batches_tracked + 1:
            self.rec.fail(kind, f"{spec['id']}: version {reply.version} != num_batches_tracked {reply.num_batches_tracked} + 1")
        led = self.ledger[spec["id"]]
        led["acked"] += 1
        led["max_seen"] = max(led["max_seen"], reply.num_batches_tracked)
        if self.rng.random() < 0.2 and not close(to_array(reply.output), spec["train_out"], spec["dtype"]):
            self.rec.fail(kind, f"{spec['id']}: train output differs from PyTorch's")

    def check_snapshot(self, spec, kind, version, k, running_mean, running_var):
        """A mid-run state: version and num_batches_tracked describe the same
        steps, and so do the running statistics."""
        if version != k + 1:
            self.rec.fail(kind, f"{spec['id']}: version {version} != num_batches_tracked {k} + 1")
        mean, var = expected_running(spec, k)
        if not (close(running_mean, mean, spec["dtype"], 100) and close(running_var, var, spec["dtype"], 100)):
            self.rec.fail(kind, f"{spec['id']}: running statistics do not describe {k} steps")
        led = self.ledger[spec["id"]]
        led["max_seen"] = max(led["max_seen"], k)

    # -- operations

    def op_train(self):
        spec = self.shared()
        outcome, reply = self.rec.call("train", self.bn.Forward, self.train_request(spec))
        if outcome == OK:
            self.check_train_reply(spec, reply, "train")

    def op_train_cancel(self):
        spec = self.shared()
        future = self.bn.Forward.future(self.train_request(spec))
        time.sleep(self.rng.uniform(0, 0.003))
        if future.cancel():
            self.rec.counts[("train_cancel", "CANCELLED")] += 1
            self.ledger[spec["id"]]["uncertain"] += 1
            return
        error = future.exception()
        outcome = self.rec.outcome("train_cancel", error)
        if outcome == OK:
            self.check_train_reply(spec, future.result(), "train_cancel")
        elif outcome == "CANCELLED":
            self.ledger[spec["id"]]["uncertain"] += 1

    def op_train_deadline(self):
        spec = self.shared()
        timeout = self.rng.uniform(0.0001, 0.004)
        outcome, reply = self.rec.call("train_deadline", self.bn.Forward, self.train_request(spec), timeout=timeout)
        if outcome == OK:
            self.check_train_reply(spec, reply, "train_deadline")
        elif outcome in ("DEADLINE_EXCEEDED", SERVER_TIMEOUT):
            self.ledger[spec["id"]]["uncertain"] += 1

    def op_eval_frozen(self, big=False):
        frozen = self.plan["frozen"]
        x, want = (frozen["x_big_proto"], frozen["eval_big_out"]) if big else (frozen["x_proto"], frozen["eval_out"])
        kind = "eval_big" if big else "eval_frozen"
        request = bn.ForwardRequest(session_id=frozen["id"], input=x, mode=bn.MODE_EVAL)
        outcome, reply = self.rec.call(kind, self.bn.Forward, request)
        if outcome == OK:
            if reply.version != 1 or reply.num_batches_tracked != FROZEN["num_batches_tracked"]:
                self.rec.fail(kind, f"frozen session changed: version {reply.version}")
            if not close(to_array(reply.output), want, "float32"):
                self.rec.fail(kind, "eval output differs from PyTorch's")

    def op_eval_big(self):
        self.op_eval_frozen(big=True)

    def op_eval_shared(self):
        spec = self.shared()
        request = bn.ForwardRequest(session_id=spec["id"], input=spec["x_proto"], mode=bn.MODE_EVAL)
        outcome, reply = self.rec.call("eval_shared", self.bn.Forward, request)
        if outcome == OK:
            out = to_array(reply.output)
            if reply.version != reply.num_batches_tracked + 1 or out.shape != spec["train_out"].shape or not np.isfinite(out).all():
                self.rec.fail("eval_shared", f"{spec['id']}: bad eval reply (version {reply.version})")

    def stream_requests(self, spec, n, bad):
        """n train requests on `spec`, some of them malformed when `bad`:
        (requests, what each should give)."""
        requests, wants = [], []
        for _ in range(n):
            roll = self.rng.random() if bad else 1.0
            if roll < 0.12:
                requests.append(bn.ForwardRequest(session_id=spec["id"], input=spec["x_bad_channels_proto"], mode=bn.MODE_TRAIN))
                wants.append("INVALID_ARGUMENT")
            elif roll < 0.16:
                requests.append(bn.ForwardRequest(session_id="ghost-stream", input=spec["x_proto"], mode=bn.MODE_TRAIN))
                wants.append("NOT_FOUND")
            else:
                requests.append(self.train_request(spec))
                wants.append(OK)
        return requests, wants

    def op_stream(self):
        spec = self.shared()
        requests, wants = self.stream_requests(spec, self.rng.randint(4, 16), bad=True)
        answered = 0
        try:
            for index, item in enumerate(self.bn.ForwardStream(iter(requests))):
                answered += 1
                if item.index != index:
                    self.rec.fail("stream", f"reply {index} has index {item.index}")
                    continue
                if item.HasField("error"):
                    label = RPC_CODE_NAMES.get(item.error.code, str(item.error.code))
                else:
                    label = OK
                self.rec.counts[("stream_msg", label)] += 1
                if label != wants[index]:
                    self.rec.fail("stream_msg", f"message {index}: {label}, expected {wants[index]}")
                elif label == OK:
                    self.check_train_reply(spec, item.response, "stream_msg")
        except grpc.RpcError as error:
            outcome = self.rec.outcome("stream", error)
            if outcome != SHED or answered:
                self.ledger[spec["id"]]["uncertain"] += sum(w == OK for w in wants[answered:])
            return
        self.rec.outcome("stream", None)
        if answered != len(requests):
            self.rec.fail("stream", f"{answered} replies to {len(requests)} requests")

    def op_stream_cancel(self):
        spec = self.shared()
        requests, wants = self.stream_requests(spec, 16, bad=False)
        read_before_cancel = self.rng.randint(0, 8)
        call = self.bn.ForwardStream(iter(requests))
        acked = 0
        try:
            for item in call:
                if item.HasField("error"):
                    self.rec.fail("stream_cancel", f"in-band error {item.error.code}: {item.error.message}")
                else:
                    self.check_train_reply(spec, item.response, "stream_cancel")
                    acked += 1
                if acked >= read_before_cancel:
                    call.cancel()
        except grpc.RpcError as error:
            outcome = self.rec.outcome("stream_cancel", error)
            if outcome != SHED or acked:
                self.ledger[spec["id"]]["uncertain"] += len(requests) - acked
            return
        self.rec.outcome("stream_cancel", None)

    def op_get(self):
        spec = self.shared()
        outcome, reply = self.rec.call("get", self.bn.GetSession, bn.GetSessionRequest(session_id=spec["id"]))
        if outcome == OK:
            s = reply.session
            self.check_snapshot(spec, "get", s.version, s.num_batches_tracked, to_array(s.running_mean), to_array(s.running_var))

    def op_list(self):
        token = ""
        for _ in range(3):
            outcome, reply = self.rec.call("list", self.bn.ListSessions, bn.ListSessionsRequest(page_size=16, page_token=token))
            if outcome != OK or not reply.next_page_token:
                return
            token = reply.next_page_token

    def op_compare(self):
        spec = self.plan["shared"][0]
        request = compare_pb2.CompareRequest(
            input=spec["x_proto"], training=True,
            candidate=compare_pb2.Candidate(output=tensor(spec["train_out_unbiased"])))
        outcome, reply = self.rec.call("compare", self.compare.Compare, request)
        if outcome == OK:
            names = [h.name for h in reply.diagnosis.hypotheses if h.explains]
            if "unbiased_variance" not in names:
                self.rec.fail("compare", f"unbiased variance not diagnosed: {names}")

    def op_export(self):
        spec = self.shared()
        outcome, reply = self.rec.call("export", self.bn.ExportState, bn.ExportStateRequest(session_id=spec["id"]))
        if outcome == OK:
            state = safetensors.numpy.load(reply.safetensors)
            k = int(state["num_batches_tracked"])
            self.check_snapshot(spec, "export", reply.version, k, state["running_mean"], state["running_var"])

    def op_import(self):
        if self.import_version is None:
            request = bn.CreateSessionRequest(session_id=self.import_id, kind=bn.BATCH_NORM_1D, num_features=FROZEN["num_features"])
            outcome, reply = self.rec.call("create", self.bn.CreateSession, request)
            if outcome != OK:
                return
            self.import_version = reply.session.version
        request = bn.ImportStateRequest(session_id=self.import_id, safetensors=self.plan["frozen"]["export"])
        outcome, reply = self.rec.call("import", self.bn.ImportState, request)
        if outcome == OK:
            self.imports_acked += 1
            s = reply.session
            if s.version != self.import_version + 1 or s.num_batches_tracked != FROZEN["num_batches_tracked"]:
                self.rec.fail("import", f"version {s.version} after {self.import_version}, num_batches_tracked {s.num_batches_tracked}")
            self.import_version = s.version

    def op_import_bad(self):
        spec = self.shared()
        blob = self.plan["frozen"]["export"] if self.rng.random() < 0.5 else b"not safetensors"
        # The frozen export has 5 channels: a size mismatch on every shared session.
        self.rec.call("import_bad", self.bn.ImportState, bn.ImportStateRequest(session_id=spec["id"], safetensors=blob))

    def op_churn(self):
        """Create, train once, delete, and see it gone. Creation and deletion
        are retried when shed, so no session is left behind."""
        self.churn_serial += 1
        session_id = f"churn-{self.name}-{self.churn_serial}"
        request = bn.CreateSessionRequest(session_id=session_id, kind=bn.BATCH_NORM_1D, num_features=4,
                                          labels={"soak": "churn"})
        for _ in range(20):
            outcome, _ = self.rec.call("create", self.bn.CreateSession, request)
            if outcome == OK:
                break
            time.sleep(0.001)
        else:
            return
        self.undeleted.append(session_id)
        x = self.plan["churn_x_proto"]
        self.rec.call("churn_forward", self.bn.Forward, bn.ForwardRequest(session_id=session_id, input=x, mode=bn.MODE_TRAIN))
        if self.delete(session_id):
            self.rec.call("get_deleted", self.bn.GetSession, bn.GetSessionRequest(session_id=session_id))

    def delete(self, session_id, attempts=50):
        for _ in range(attempts):
            outcome, _ = self.rec.call("delete", self.bn.DeleteSession, bn.DeleteSessionRequest(session_id=session_id))
            if outcome == OK:
                self.undeleted.remove(session_id)
                return True
            time.sleep(0.002)
        return False

    def op_bad_input(self):
        spec = self.shared()
        kind = self.rng.choice(["bad_channels", "bad_length", "bad_dtype", "bad_rank"])
        x = spec["x_proto"]
        if kind == "bad_channels":
            bad = spec["x_bad_channels_proto"]
        elif kind == "bad_length":
            bad = tensor_pb2.Tensor(dtype=x.dtype, shape=x.shape, raw=x.raw[:-self.rng.randint(1, 4)])
        elif kind == "bad_dtype":
            bad = tensor_pb2.Tensor(dtype=77, shape=x.shape, raw=x.raw)
        else:
            bad = tensor_pb2.Tensor(dtype=x.dtype, shape=[len(x.raw) // (8 if spec["dtype"] == "float64" else 4)], raw=x.raw)
        self.rec.call(kind, self.bn.Forward, bn.ForwardRequest(session_id=spec["id"], input=bad, mode=bn.MODE_TRAIN))

    def op_unknown_session(self):
        if self.rng.random() < 0.5:
            self.rec.call("unknown_session", self.bn.GetSession, bn.GetSessionRequest(session_id="ghost"))
        else:
            request = bn.ForwardRequest(session_id="ghost", input=self.plan["churn_x_proto"], mode=bn.MODE_TRAIN)
            self.rec.call("unknown_session", self.bn.Forward, request)

    def op_oversized(self):
        spec = self.shared()
        n = MAX_MESSAGE_BYTES // 4 + 1024
        big = tensor_pb2.Tensor(dtype=F32, shape=[n // 8, 8], raw=bytes(n // 8 * 8 * 4))
        outcome, _ = self.rec.call("oversized", self.bn.Forward, bn.ForwardRequest(session_id=spec["id"], input=big, mode=bn.MODE_TRAIN))
        if outcome == OK:
            self.ledger[spec["id"]]["bad_applied"] += 1

    def op_health(self):
        outcome, reply = self.rec.call("health", self.health.Check, health_pb2.HealthCheckRequest(service=""))
        if outcome == OK and reply.status != health_pb2.HealthCheckResponse.SERVING:
            self.rec.fail("health", f"status {reply.status}")

    def op_server_info(self):
        self.rec.call("server_info", self.server.GetServerInfo, server_pb2.GetServerInfoRequest())

    def run(self, end):
        names = self.plan["operations"] or list(OPERATION_WEIGHTS)
        weights = [OPERATION_WEIGHTS[n] for n in names]
        while time.monotonic() < end:
            name = self.rng.choices(names, weights)[0]
            try:
                getattr(self, f"op_{name}")()
            except Exception as error:  # a client-side bug or an unexpected reply shape
                self.rec.fail(name, f"{type(error).__name__}: {error}")
            if self.rec.shed:
                # What the server asks of a shed client: retry after a backoff.
                self.rec.shed = False
                time.sleep(self.rng.uniform(0.001, 0.01))
        # Nothing left behind: sessions whose deletion was shed are deleted now.
        for session_id in list(self.undeleted):
            self.delete(session_id, attempts=500)


def worker_main(index, plan, threads, n_channels, seed, start_event, duration, results):
    """One load process: `threads` clients over `n_channels` channels."""
    for spec in plan["shared"]:
        spec["x_proto"] = tensor(spec["x"])
        spec["x_bad_channels_proto"] = tensor(spec["x_bad_channels"])
    frozen = plan["frozen"]
    frozen["x_proto"], frozen["x_big_proto"] = tensor(frozen["x"]), tensor(frozen["x_big"])
    plan["churn_x_proto"] = tensor(plan["churn_x"])

    channels = [grpc.insecure_channel(plan["address"], options=channel_options()) for _ in range(n_channels)]
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=30)
    stubs = [(batch_norm_pb2_grpc.BatchNormServiceStub(ch), compare_pb2_grpc.CompareServiceStub(ch),
              server_pb2_grpc.ServerServiceStub(ch), health_pb2_grpc.HealthStub(ch)) for ch in channels]
    results.put(("ready", index))
    start_event.wait()
    end = time.monotonic() + duration

    clients = []
    for t in range(threads):
        rec = Recorder(f"p{index}t{t}")
        ledger = collections.defaultdict(collections.Counter)
        clients.append(Client(plan, stubs[t % n_channels], rec, ledger, f"p{index}t{t}", random.Random(seed * 1000003 + index * 101 + t)))
    runners = [threading.Thread(target=c.run, args=(end,)) for c in clients]
    for r in runners:
        r.start()
    for r in runners:
        r.join()
    for ch in channels:
        ch.close()

    counts, ledger, failures, failure_count, imports, undeleted = collections.Counter(), {}, [], 0, {}, []
    for c in clients:
        counts.update(c.rec.counts)
        failures += c.rec.failures
        failure_count += c.rec.failure_count
        for sid, led in c.ledger.items():
            total = ledger.setdefault(sid, collections.Counter())
            for key in ("acked", "uncertain", "bad_applied"):
                total[key] += led[key]
            total["max_seen"] = max(total["max_seen"], led["max_seen"])
        if c.import_version is not None:
            imports[c.import_id] = {"acked": c.imports_acked, "version": c.import_version}
        undeleted += c.undeleted
    results.put(("done", index, {
        "counts": [[k, o, n] for (k, o), n in counts.items()],
        "ledger": {sid: dict(led) for sid, led in ledger.items()},
        "failures": failures, "failure_count": failure_count,
        "imports": imports, "undeleted": undeleted,
    }))


# ------------------------------------------------------------------ the plan

def build_plan(stub, seed):
    """Creates the shared and frozen sessions and computes, with PyTorch, what
    the clients must see."""
    import torch
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    modules = {"1d": torch.nn.BatchNorm1d, "2d": torch.nn.BatchNorm2d, "3d": torch.nn.BatchNorm3d}
    shared = []
    for s in SHARED:
        dtype = getattr(torch, s["dtype"])
        x = (torch.randn(s["shape"], generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
        channels = s["shape"][1]
        module = modules[s["kind"]](channels, momentum=s["momentum"], dtype=dtype)
        with torch.no_grad():
            module.weight.copy_(torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5)
            module.bias.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
        initial = {key: value.clone() for key, value in module.state_dict().items()}
        with torch.no_grad():
            train_out = module.train()(x)
        dims = [0] + list(range(2, x.dim()))
        x64 = x.double()
        centred = (x64 - x64.mean(dims, keepdim=True))
        # Compare's candidate: normalized (no affine) with the unbiased variance.
        train_out_unbiased = centred / torch.sqrt(x64.var(dims, keepdim=True, unbiased=True) + module.eps)
        bad_shape = list(s["shape"])
        bad_shape[1] += 1
        request = bn.CreateSessionRequest(
            session_id=s["id"], kind=KIND_ENUM[s["kind"]], num_features=channels,
            param_dtype=F64 if s["dtype"] == "float64" else F32,
            weight=tensor(initial["weight"].numpy()), bias=tensor(initial["bias"].numpy()))
        if s["momentum"] is None:
            request.cumulative_average = True
        else:
            request.momentum = s["momentum"]
        stub.CreateSession(request)
        shared.append({
            **s, "module": module, "initial": initial, "x_torch": x,
            "x": x.numpy(), "x_bad_channels": torch.zeros(bad_shape, dtype=dtype).numpy(),
            "train_out": train_out.numpy(),
            "train_out_unbiased": train_out_unbiased.float().numpy() if s["dtype"] == "float32" else train_out_unbiased.numpy(),
            "batch_mean": x64.mean(dims).numpy(), "batch_var_unbiased": x64.var(dims, unbiased=True).numpy(),
        })

    c = FROZEN["num_features"]
    frozen_module = torch.nn.BatchNorm1d(c, eps=FROZEN["eps"])
    with torch.no_grad():
        frozen_module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        frozen_module.bias.copy_(torch.randn(c, generator=gen))
        frozen_module.running_mean.copy_(torch.randn(c, generator=gen))
        frozen_module.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        frozen_module.num_batches_tracked.fill_(FROZEN["num_batches_tracked"])
    frozen_module.eval()
    x = torch.randn(32, c, generator=gen)
    x_big = torch.randn(8192, c, generator=gen)  # 256 KiB: the compute pool's blocking threads
    with torch.no_grad():
        eval_out, eval_big_out = frozen_module(x), frozen_module(x_big)
    sd = frozen_module.state_dict()
    stub.CreateSession(bn.CreateSessionRequest(
        session_id=FROZEN["id"], kind=bn.BATCH_NORM_1D, num_features=c, eps=FROZEN["eps"],
        weight=tensor(sd["weight"].numpy()), bias=tensor(sd["bias"].numpy()),
        running_mean=tensor(sd["running_mean"].numpy()), running_var=tensor(sd["running_var"].numpy()),
        num_batches_tracked=FROZEN["num_batches_tracked"]))
    export = stub.ExportState(bn.ExportStateRequest(session_id=FROZEN["id"])).safetensors
    frozen = {"id": FROZEN["id"], "module": frozen_module, "x": x.numpy(), "x_big": x_big.numpy(),
              "eval_out": eval_out.numpy(), "eval_big_out": eval_big_out.numpy(), "export": export}
    churn_x = torch.randn(6, 4, generator=gen).numpy()
    return {"shared": shared, "frozen": frozen, "churn_x": churn_x}


def picklable(plan, address):
    """The part of the plan the load processes get (no torch objects)."""
    keep = ("id", "kind", "dtype", "momentum", "x", "x_bad_channels", "train_out", "train_out_unbiased",
            "batch_mean", "batch_var_unbiased")
    return {
        "address": address,
        "shared": [{k: s[k] for k in keep} for s in plan["shared"]],
        "frozen": {k: plan["frozen"][k] for k in ("id", "x", "x_big", "eval_out", "eval_big_out", "export")},
        "churn_x": plan["churn_x"],
    }


# ------------------------------------------------------------- the verdicts

class Checks:
    def __init__(self):
        self.results = []

    def check(self, name, ok, detail=""):
        self.results.append({"check": name, "ok": bool(ok), "detail": detail})
        return ok

    @property
    def failed(self):
        return [r for r in self.results if not r["ok"]]


def final_consistency(checks, stub, health, plan, ledgers, imports):
    """The end state of every session against PyTorch and the clients' books."""
    import torch
    figures = {}
    for spec in plan["shared"]:
        sid = spec["id"]
        led = ledgers.get(sid, {})
        acked, uncertain = led.get("acked", 0), led.get("uncertain", 0)
        session = stub.GetSession(bn.GetSessionRequest(session_id=sid)).session
        k = session.num_batches_tracked
        figures[sid] = {"num_batches_tracked": k, "version": session.version, "acked": acked,
                        "uncertain": uncertain, "applied_of_uncertain": k - acked}
        checks.check(f"{sid}: version = num_batches_tracked + 1", session.version == k + 1,
                     f"version {session.version}, num_batches_tracked {k}")
        checks.check(f"{sid}: acked <= k <= acked + uncertain", acked <= k <= acked + uncertain,
                     f"acked {acked}, k {k}, uncertain {uncertain}")
        checks.check(f"{sid}: k >= every num_batches_tracked a client saw", k >= led.get("max_seen", 0),
                     f"max seen {led.get('max_seen', 0)}")
        checks.check(f"{sid}: no malformed or oversized call applied", led.get("bad_applied", 0) == 0)
        # PyTorch: k train steps on the same batch from the same start.
        module = spec["module"]
        module.load_state_dict(spec["initial"])
        module.train()
        with torch.no_grad():
            for _ in range(k):
                module(spec["x_torch"])
        tol = {"rtol": 1e-7, "atol": 1e-7} if spec["dtype"] == "float64" else {}
        state = module.state_dict()
        problems = []
        for key in ("weight", "bias", "running_mean", "running_var"):
            try:
                torch.testing.assert_close(torch.from_numpy(to_array(getattr(session, key))), state[key], **tol)
            except AssertionError as error:
                problems.append(f"{key}: " + " ".join(line.strip() for line in str(error).splitlines() if line.strip()))
        checks.check(f"{sid}: state = PyTorch after {k} steps", not problems, "; ".join(problems))
        export = stub.ExportState(bn.ExportStateRequest(session_id=sid))
        exported = safetensors.numpy.load(export.safetensors)
        checks.check(f"{sid}: export is the same state", export.version == session.version
                     and int(exported["num_batches_tracked"]) == k
                     and np.array_equal(exported["running_mean"], to_array(session.running_mean))
                     and np.array_equal(exported["running_var"], to_array(session.running_var)))
        module.eval()
        with torch.no_grad():
            want = module(spec["x_torch"]).numpy()
        reply = stub.Forward(bn.ForwardRequest(session_id=sid, input=tensor(spec["x"]), mode=bn.MODE_EVAL))
        checks.check(f"{sid}: eval output = PyTorch's with those statistics",
                     close(to_array(reply.output), want, spec["dtype"]) and reply.version == session.version)

    frozen = stub.GetSession(bn.GetSessionRequest(session_id=FROZEN["id"])).session
    checks.check("frozen: unchanged (version 1, eval only)", frozen.version == 1
                 and frozen.num_batches_tracked == FROZEN["num_batches_tracked"])
    for import_id, book in sorted(imports.items()):
        session = stub.GetSession(bn.GetSessionRequest(session_id=import_id)).session
        state = safetensors.numpy.load(stub.ExportState(bn.ExportStateRequest(session_id=import_id)).safetensors)
        want = safetensors.numpy.load(plan["frozen"]["export"])
        same = all(np.array_equal(state[key], want[key]) for key in want) or book["acked"] == 0
        checks.check(f"{import_id}: version = 1 + imports, state = the imported one",
                     session.version == 1 + book["acked"] and same,
                     f"version {session.version}, imports {book['acked']}")

    listed, token = [], ""
    while True:
        reply = stub.ListSessions(bn.ListSessionsRequest(page_size=100, page_token=token))
        listed += [s.session_id for s in reply.sessions]
        token = reply.next_page_token
        if not token:
            break
    want_ids = sorted([s["id"] for s in plan["shared"]] + [FROZEN["id"]] + list(imports))
    checks.check("sessions: exactly the shared, frozen and import sessions remain (churn all deleted)",
                 sorted(listed) == want_ids, f"extra {sorted(set(listed) - set(want_ids))}, missing {sorted(set(want_ids) - set(listed))}")
    status = health.Check(health_pb2.HealthCheckRequest(service="")).status
    checks.check("health: SERVING after the load", status == health_pb2.HealthCheckResponse.SERVING)
    return figures, sorted(listed)


def snapshot_all(stub, ids):
    """Every session's full state, for the restart comparison."""
    out = {}
    for sid in ids:
        session = stub.GetSession(bn.GetSessionRequest(session_id=sid)).session
        # The last use lives in memory only: a restarted server counts from load.
        session.ClearField("last_used_at")
        export = stub.ExportState(bn.ExportStateRequest(session_id=sid))
        out[sid] = (session.SerializeToString(deterministic=True), export.safetensors, export.version)
    return out


# -------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=float(os.environ.get("SOAK_SECONDS", 60)), help="seconds of load (default 60, env SOAK_SECONDS)")
    p.add_argument("--processes", type=int, default=3, help="load processes (default 3)")
    p.add_argument("--threads", type=int, default=8, help="client threads per process (default 8)")
    p.add_argument("--channels", type=int, default=2, help="gRPC channels per process (default 2)")
    p.add_argument("--max-concurrent-requests", type=int, default=16, help="the server's limit: small, so some calls are shed (default 16)")
    # Measured growth after warm-up: 0.3 to 3.3 MiB (60 s runs: 2.8, 3.3); 32
    # MiB is ~10x that, and a leak of 1 KiB per call (~45 MiB in 45 s at
    # 1000 calls/s) exceeds it.
    p.add_argument("--rss-bound-mib", type=float, default=32.0, help="allowed RSS growth after warm-up, MiB (default 32)")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--json", default=os.path.join(ROOT, "target", "soak", "soak.json"))
    p.add_argument("--no-restart", action="store_true", help="skip the restart (durability) check")
    p.add_argument("--server-log", default="warn", help="the server's --log filter (default warn; debug logs every request)")
    p.add_argument("--only", default="", help="comma-separated operations to run, to narrow down a failure "
                   f"(default: all of {', '.join(OPERATION_WEIGHTS)}; coverage checks then fail)")
    p.add_argument("--keep-data", action="store_true", help="keep the data directory and server log")
    return p.parse_args(argv)


def rss_figures(samples, warmup_s):
    warm = [kib for t, kib in samples if t <= warmup_s]
    after = [kib for t, kib in samples if t > warmup_s]
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    figures = {"start_mib": mib(samples[0][1]), "peak_mib": mib(max(k for _, k in samples)),
               "end_mib": mib(samples[-1][1]), "warmup_s": round(warmup_s, 1),
               "warmup_peak_mib": mib(max(warm)), "samples": len(samples)}
    if after:
        figures["after_warmup_peak_mib"] = mib(max(after))
        figures["growth_after_warmup_mib"] = mib(max(after) - max(warm))
        # The trend after warm-up (least squares), for information.
        ts = np.array([t for t, kib in samples if t > warmup_s])
        ks = np.array(after, dtype=float)
        if len(ts) > 2 and np.ptp(ts) > 0:
            figures["slope_after_warmup_mib_per_min"] = round(float(np.polyfit(ts, ks, 1)[0]) * 60 / 1024, 2)
    return figures


def main(argv=None):
    args = parse_args(argv)
    binary = os.environ.get("NORMSERVE_BIN", os.path.join(ROOT, "target", "release", "normserve"))
    work = tempfile.mkdtemp(prefix="normserve-soak-")
    data_dir, log_path = os.path.join(work, "data"), os.path.join(work, "server.log")
    metrics_addr = f"127.0.0.1:{free_port()}"
    server_args = ["--durability", "sync", "--compute-threads", "2",
                   "--max-concurrent-requests", str(args.max_concurrent_requests),
                   "--max-message-bytes", str(MAX_MESSAGE_BYTES),
                   "--metrics-addr", metrics_addr, "--log", args.server_log]
    checks = Checks()
    report = {"config": {**vars(args), "server_args": server_args, "binary": binary}}

    server = Server(binary, data_dir, server_args, log_path)
    channel = grpc.insecure_channel(server.address, options=channel_options())
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    plan = build_plan(stub, args.seed)

    ctx = multiprocessing.get_context("spawn")
    results, start = ctx.Queue(), ctx.Event()
    shipped = picklable(plan, server.address)
    shipped["operations"] = [op for op in args.only.split(",") if op]
    unknown = set(shipped["operations"]) - set(OPERATION_WEIGHTS)
    if unknown:
        raise SystemExit(f"--only: unknown operations {sorted(unknown)}")
    workers = [ctx.Process(target=worker_main, args=(i, shipped, args.threads, args.channels, args.seed,
                                                      start, args.duration, results), daemon=True)
               for i in range(args.processes)]
    for w in workers:
        w.start()
    for _ in workers:
        message = results.get(timeout=120)
        assert message[0] == "ready", message

    samples, sampling = [], threading.Event()
    t0 = time.monotonic()

    def sample():
        while not sampling.is_set():
            samples.append((time.monotonic() - t0, server.rss_kib()))
            sampling.wait(0.5)
    samples.append((0.0, server.rss_kib()))
    start.set()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    outcomes = {}
    deadline = time.monotonic() + args.duration + 120
    while len(outcomes) < len(workers):
        message = results.get(timeout=max(1, deadline - time.monotonic()))
        outcomes[message[1]] = message[2]
    load_s = time.monotonic() - t0
    for w in workers:
        w.join(timeout=30)
    time.sleep(1.0)  # a last sample once the server is idle
    sampling.set()
    sampler.join()
    samples.append((time.monotonic() - t0, server.rss_kib()))

    counts, ledgers, imports, failures, failure_count, undeleted = collections.Counter(), {}, {}, [], 0, []
    for out in outcomes.values():
        for kind, outcome, n in out["counts"]:
            counts[(kind, outcome)] += n
        for sid, led in out["ledger"].items():
            total = ledgers.setdefault(sid, collections.Counter())
            for key in ("acked", "uncertain", "bad_applied"):
                total[key] += led.get(key, 0)
            total["max_seen"] = max(total["max_seen"], led.get("max_seen", 0))
        imports.update(out["imports"])
        failures += out["failures"]
        failure_count += out["failure_count"]
        undeleted += out["undeleted"]
    checks.check("calls: every status code the expected one for its kind", failure_count == 0,
                 f"{failure_count} failures; first: {failures[:10]}")
    checks.check("churn: every created session deleted", not undeleted, f"{undeleted[:10]}")
    for kind in ("train", "train_cancel", "train_deadline", "stream", "churn_forward"):
        checks.check(f"coverage: some {kind} calls succeeded", counts[(kind, OK)] > 0)
    for kind, outcome in (("train_cancel", "CANCELLED"), ("train_deadline", "DEADLINE_EXCEEDED"),
                          ("oversized", "RESOURCE_EXHAUSTED"), ("stream_msg", "INVALID_ARGUMENT")):
        checks.check(f"coverage: some {kind} calls ended {outcome}", counts[(kind, outcome)] > 0)
    checks.check("coverage: some calls were shed", sum(n for (k, o), n in counts.items() if o == SHED) > 0)

    warmup_s = min(15.0, args.duration / 3)
    rss = rss_figures(samples, warmup_s)
    if "growth_after_warmup_mib" in rss:
        checks.check(f"rss: peak after warm-up <= warm-up peak + {args.rss_bound_mib:g} MiB",
                     rss["growth_after_warmup_mib"] <= args.rss_bound_mib,
                     f"growth {rss['growth_after_warmup_mib']} MiB")

    # The server's side: no fault codes, no store errors, nothing in flight.
    metrics = scrape_metrics(metrics_addr)
    server_codes, server_codes_by_rpc = collections.Counter(), collections.defaultdict(dict)
    for (name, labels), value in metrics.items():
        if name == "normserve_requests_total" and value:
            labels = dict(labels)
            server_codes[labels["code"]] += int(value)
            server_codes_by_rpc[labels["rpc"]][labels["code"]] = int(value)
    # A Forward cancelled while its request is still arriving ends tonic's
    # decoding inside a message: the server records INVALID_ARGUMENT
    # ("truncated"), never INTERNAL, so no exception is made here.
    faults = {rpc: {c: n for c, n in codes.items() if c in SERVER_FAULT_CODES}
              for rpc, codes in server_codes_by_rpc.items()}
    faults = {rpc: codes for rpc, codes in faults.items() if codes}
    checks.check("server metrics: no INTERNAL/UNKNOWN/DATA_LOSS/UNAVAILABLE answers", not faults, f"{faults}")
    store_errors = sum(v for (name, _), v in metrics.items() if name == "normserve_store_errors_total")
    checks.check("server metrics: no store errors", store_errors == 0, f"{store_errors}")
    inflight = sum(v for (name, _), v in metrics.items() if name == "normserve_inflight_requests")
    checks.check("server metrics: no request in progress after the load (admission places all returned)",
                 inflight == 0, f"normserve_inflight_requests {inflight}")
    server_shed = sum(v for (name, _), v in metrics.items() if name == "normserve_shed_requests_total")

    figures, ids = final_consistency(checks, stub, health, plan, ledgers, imports)
    # Every place came back: as many calls at once as the limit allows all succeed.
    with_limit = [stub.GetSession.future(bn.GetSessionRequest(session_id=FROZEN["id"]))
                  for _ in range(args.max_concurrent_requests)]
    shed_after = 0
    for f in with_limit:
        try:
            f.result()
        except grpc.RpcError as error:
            shed_after += 1
            checks.check("after the load: calls up to the limit are admitted", False, f"{error.code().name}: {error.details()}")
    if not shed_after:
        checks.check("after the load: calls up to the limit are admitted", True)

    restart = {}
    if not args.no_restart:
        before = snapshot_all(stub, ids)
        channel.close()
        t = time.monotonic()
        code = server.stop()
        checks.check("restart: the server stops cleanly on SIGTERM (exit 0)", code == 0, f"exit {code}")
        server = Server(binary, data_dir, server_args, log_path)
        channel = grpc.insecure_channel(server.address, options=channel_options())
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
        restart["restart_s"] = round(time.monotonic() - t, 2)
        after = snapshot_all(stub, ids)
        differ = [sid for sid in ids if before[sid] != after[sid]]
        checks.check("restart: every session recovered exactly from the data dir", not differ, f"differ: {differ}")
        reply = stub.ListSessions(bn.ListSessionsRequest(page_size=1000))
        extra = {s.session_id for s in reply.sessions} - set(ids)
        checks.check("restart: no other session recovered", not extra, f"{sorted(extra)}")
        restart["sessions"] = len(ids)
    channel.close()
    code = server.stop()
    checks.check("the server exits 0 at the end", code == 0, f"exit {code}")
    with open(log_path) as log:
        lines = log.read().splitlines()
    bad_lines = [line for line in lines if re.search(r"panic|ERROR", line)]
    warnings = [line for line in lines if "WARN" in line]
    checks.check("server log: no panic and no ERROR line", not bad_lines, "; ".join(bad_lines[:5]))

    by_kind = collections.defaultdict(dict)
    for (kind, outcome), n in sorted(counts.items()):
        by_kind[kind][outcome] = n
    by_outcome = collections.Counter()
    for (kind, outcome), n in counts.items():
        if kind != "stream_msg":
            by_outcome[outcome] += n
    total_calls = sum(by_outcome.values())
    report.update({
        "duration_s": round(load_s, 1),
        "calls": total_calls,
        "calls_per_s": round(total_calls / load_s, 1),
        "admitted_calls_per_s": round((total_calls - by_outcome[SHED]) / load_s, 1),
        "stream_messages": sum(n for (k, _), n in counts.items() if k == "stream_msg"),
        "calls_by_kind": by_kind,
        "calls_by_outcome": dict(by_outcome),
        "server_codes": dict(server_codes),
        "server_codes_by_rpc": server_codes_by_rpc,
        "server_log_warnings": warnings[:20],
        "server_log_warning_count": len(warnings),
        "server_shed_total": int(server_shed),
        "server_inflight_after_load": inflight,
        "rss": rss,
        "rss_samples": [[round(t, 2), kib] for t, kib in samples],
        "sessions": figures,
        "restart": restart,
        "checks": checks.results,
        "ok": not checks.failed,
    })
    print_summary(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as out:
        json.dump(report, out, indent=1, default=str)
    print(f"\nJSON: {args.json}")
    if args.keep_data or checks.failed:
        print(f"data dir and server log kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not checks.failed else 1


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def print_summary(report):
    print(f"\nnormserve soak: {report['duration_s']} s, {report['calls']} calls "
          f"({report['calls_per_s']}/s, {report['admitted_calls_per_s']}/s not shed) + {report['stream_messages']} stream messages")
    outcomes = sorted({o for row in report["calls_by_kind"].values() for o in row})
    width = max(len(k) for k in report["calls_by_kind"]) + 2
    widths = [max(len(o), 6) + 2 for o in outcomes]
    print("\n" + "kind".ljust(width) + "".join(o.rjust(w) for o, w in zip(outcomes, widths)))
    for kind, row in sorted(report["calls_by_kind"].items()):
        print(kind.ljust(width) + "".join(str(row.get(o, "")).rjust(w) for o, w in zip(outcomes, widths)))
    print("total".ljust(width) + "".join(str(report["calls_by_outcome"].get(o, "")).rjust(w) for o, w in zip(outcomes, widths))
          + "   (stream_msg not counted: in-band replies)")
    print(f"\nserver /metrics codes: {report['server_codes']}; shed (server count): {report['server_shed_total']}")
    for rpc, codes in sorted(report["server_codes_by_rpc"].items()):
        faults = {c: n for c, n in codes.items() if c in SERVER_FAULT_CODES}
        if faults:
            print(f"  {rpc}: {faults}")
    print(f"server log: {report['server_log_warning_count']} WARN lines" +
          "".join(f"\n  {line[:300]}" for line in report["server_log_warnings"][:5]))
    rss = report["rss"]
    print(f"\nRSS MiB: start {rss['start_mib']}, warm-up peak {rss['warmup_peak_mib']} (first {rss['warmup_s']} s), "
          f"peak after warm-up {rss.get('after_warmup_peak_mib')}, end {rss['end_mib']}; "
          f"growth after warm-up {rss.get('growth_after_warmup_mib')} MiB, "
          f"trend {rss.get('slope_after_warmup_mib_per_min')} MiB/min")
    print("\nshared sessions: k = num_batches_tracked at the end")
    for sid, f in report["sessions"].items():
        print(f"  {sid:15} k {f['num_batches_tracked']:6}  acked {f['acked']:6}  uncertain {f['uncertain']:5}  "
              f"(of which applied {f['applied_of_uncertain']})")
    if report["restart"]:
        print(f"restart: {report['restart']}")
    print()
    for r in report["checks"]:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']}" + (f"  [{r['detail']}]" if not r["ok"] and r["detail"] else ""))
    print(f"\n{'PASS' if report['ok'] else 'FAIL'}: {sum(not r['ok'] for r in report['checks'])} failed checks")


if __name__ == "__main__":
    sys.exit(main())
