"""Admission and look-ahead, measured from outside: a ForwardStream client
that sends 32 MiB messages and never reads its answers holds the server's
memory to about --stream-look-ahead-bytes (64 MiB by default) plus a few
messages in transit, not a reply queue of 16 answers (about 740 MiB before).
The answers, once read, are PyTorch's."""

import threading
import time

import numpy as np
import torch

from conftest import ServerProcess
from normserve.v1 import batch_norm_pb2, batch_norm_pb2_grpc, tensor_pb2
import grpc

MIB = 1024 * 1024
ROWS, FEATURES = 131072, 64  # float32: 32 MiB per message and per answer
MESSAGES = 16


def vm_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        [kib] = [line.split()[1] for line in f if line.startswith("VmRSS:")]
    return int(kib) * 1024


def test_a_stream_client_that_never_reads_holds_a_bounded_amount_of_server_memory():
    server = ServerProcess("--durability", "none", "--compute-threads", "1")
    try:
        options = [("grpc.max_send_message_length", 64 * MIB),
                   ("grpc.max_receive_message_length", 64 * MIB)]
        channel = grpc.insecure_channel(server.address, options=options)
        stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
        session = stub.CreateSession(batch_norm_pb2.CreateSessionRequest(
            kind=batch_norm_pb2.BATCH_NORM_1D, num_features=FEATURES)).session.session_id
        torch.manual_seed(0)
        data = torch.randn(ROWS, FEATURES, dtype=torch.float32)
        tensor = tensor_pb2.Tensor(shape=[ROWS, FEATURES], dtype=tensor_pb2.DATA_TYPE_FLOAT32,
                                   raw=data.numpy().tobytes())
        request = batch_norm_pb2.ForwardRequest(session_id=session, input=tensor,
                                                mode=batch_norm_pb2.MODE_EVAL)
        baseline = vm_rss(server.proc.pid)

        sent = []
        def requests():
            for i in range(MESSAGES):
                sent.append(i)
                yield request

        replies = stub.ForwardStream(requests())
        # Not reading: wait until the client can send no more (the server
        # stopped reading) or has sent everything (it did not).
        last, still = -1, 0
        while len(sent) < MESSAGES and still < 4:
            time.sleep(0.5)
            still = still + 1 if len(sent) == last else 0
            last = len(sent)
        held = vm_rss(server.proc.pid) - baseline

        answers = list(replies)
        assert len(answers) == MESSAGES
        expected = torch.nn.functional.batch_norm(
            data, torch.zeros(FEATURES), torch.ones(FEATURES), training=False, eps=1e-5)
        first = answers[0].response.output
        got = torch.from_numpy(np.frombuffer(first.raw, dtype=np.float32).reshape(ROWS, FEATURES).copy())
        torch.testing.assert_close(got, expected)
        # 64 MiB of look-ahead, one answer being handed over, the messages in
        # the HTTP/2 windows: well under 12 messages' worth.
        assert held < 12 * 32 * MIB, f"server memory grew by {held / MIB:.0f} MiB ({len(sent)} messages sent)"
        channel.close()
    finally:
        assert server.stop() == 0
