"""A non-Rust client sees a real server: health, reflection, server info,
start-up errors and a clean SIGTERM stop."""

import subprocess
import os

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from normserve.v1 import server_pb2

from conftest import ServerProcess


def test_health_reports_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", "normserve.v1.BatchNormService", "normserve.v1.ServerService"]:
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_v1alpha_lists_the_normserve_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"normserve.v1.BatchNormService", "normserve.v1.ServerService", "grpc.health.v1.Health"} <= names


def test_server_info_reports_device_and_libtorch(server_stub):
    info = server_stub.GetServerInfo(server_pb2.GetServerInfoRequest())
    assert info.libtorch_version == torch.__version__.split("+")[0] == "2.11.0"
    assert info.devices[0].name == "cpu"
    if torch.cuda.is_available():
        assert info.default_device == "cuda:0"
        assert info.cuda_device_count == torch.cuda.device_count()
    else:
        assert info.default_device == "cpu"
        assert info.cuda_device_count == 0
    assert info.limits.max_message_bytes >= 64 * 1024 * 1024
    assert "sessions" in info.features


def test_cuda_request_without_cuda_is_a_startup_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    binary = os.environ.get("NORMSERVE_BIN", "target/release/normserve")
    done = subprocess.run([binary, "--listen", "127.0.0.1:0", "--device", "cuda"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "cuda:0 requested but libtorch sees 0 CUDA device(s)" in done.stderr


def test_bad_flag_values_are_rejected_with_usage_errors():
    binary = os.environ.get("NORMSERVE_BIN", "target/release/normserve")
    done = subprocess.run([binary, "--device", "gpu"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown device" in done.stderr


def test_sigterm_stops_the_server_cleanly():
    proc = ServerProcess()
    with grpc.insecure_channel(proc.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    assert proc.stop() == 0
