"""Server reflection that also resolves method symbols, on v1alpha and v1.

grpcio-reflection's servicer answers ``file_containing_symbol`` with
``DescriptorPool.FindFileContainingSymbol``, which knows services, messages and enums
(top-level and nested), enum values, fields and extensions, but not methods: it answers
NOT_FOUND for ``hongbao.v1.WalletService.GetBalance`` (grpc/grpc#34743), and that is the
symbol grpcurl's ``describe`` of a method and ghz's ``--call`` ask for (bojand/ghz#419).
:class:`ReflectionServicer` is the library's asyncio servicer with one change: a symbol the
pool does not find is tried as a method, and answered with the file of its service. Every
other request (list_services, file_by_filename, file_containing_extension,
all_extension_numbers_of_type) and every NOT_FOUND is the library's own code.

grpcio-reflection (1.85) implements only ``grpc.reflection.v1alpha``. Its successor
``grpc.reflection.v1`` is the same protocol under another package name: grpc-proto's
``v1/reflection.proto`` has the same messages with the same field numbers and types, so a
message of one is the same bytes as its twin in the other. :func:`enable_reflection` therefore
serves ``grpc.reflection.v1.ServerReflection`` with the same servicer and v1alpha's
(de)serialisers, and adds a v1 file descriptor, derived from v1alpha's by renaming the
package, to the pool so that a client can reflect on the v1 service too.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer as _AsyncReflectionServicer

V1ALPHA_SERVICE_NAME: str = reflection_pb2.DESCRIPTOR.services_by_name[
    "ServerReflection"].full_name
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
# The v1 file's name in grpc-proto, which clients may ask for by file_by_filename.
V1_FILE_NAME = "grpc/reflection/v1/reflection.proto"
# Both reflection services, for the service list (grpc-go lists both too).
SERVICE_NAMES = (V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME)
_METHOD = "ServerReflectionInfo"


class ReflectionServicer(_AsyncReflectionServicer):
    """grpcio-reflection's asyncio servicer, resolving ``package.Service.Method`` symbols."""

    def _file_containing_symbol(self, request, fully_qualified_name):
        response = super()._file_containing_symbol(request, fully_qualified_name)
        if not response.HasField("error_response"):
            return response
        file = self._file_of_method(fully_qualified_name)
        if file is None:
            return response  # the library's NOT_FOUND
        return self._file_by_filename(request, file.name)

    def _file_of_method(self, fully_qualified_name: str) -> descriptor.FileDescriptor | None:
        """The file declaring the service of method ``fully_qualified_name``, or None."""
        try:
            method = self._pool.FindMethodByName(fully_qualified_name)
        except KeyError:
            return None
        return method.containing_service.file


def _renamed(type_name: str, old_package: str) -> str:
    """``type_name`` (``.pkg.Type``) moved from ``old_package`` into the v1 package."""
    prefix = f".{old_package}."
    assert type_name.startswith(prefix), type_name  # reflection.proto imports nothing
    return f".{V1_PACKAGE}.{type_name[len(prefix):]}"


def v1_file_proto() -> descriptor_pb2.FileDescriptorProto:
    """grpc-proto's ``grpc/reflection/v1/reflection.proto``, derived from v1alpha's file."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old_package = proto.package
    proto.name, proto.package = V1_FILE_NAME, V1_PACKAGE
    assert not proto.dependency, proto.dependency
    for message in proto.message_type:
        assert not message.nested_type and not message.enum_type, message.name
        for field in message.field:
            if field.type_name:
                field.type_name = _renamed(field.type_name, old_package)
    for service in proto.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type, old_package)
            method.output_type = _renamed(method.output_type, old_package)
    # The file options of grpc-proto's v1 file, in place of v1alpha's.
    proto.options.Clear()
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.java_multiple_files = True
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    return proto


def _ensure_v1_file(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds the v1 reflection file to ``pool`` unless a file of that name is there already."""
    try:
        pool.FindFileByName(V1_FILE_NAME)
    except KeyError:
        pool.AddSerializedFile(v1_file_proto().SerializeToString())


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server,
                      pool: descriptor_pool.DescriptorPool | None = None) -> None:
    """Serves reflection v1alpha and v1 on ``server``, listing ``service_names``.

    The counterpart of ``grpc_reflection.v1alpha.reflection.enable_server_reflection`` for an
    asyncio server; ``pool`` defaults to ``descriptor_pool.Default()``.
    """
    pool = descriptor_pool.Default() if pool is None else pool
    _ensure_v1_file(pool)
    servicer = ReflectionServicer(service_names, pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1_handlers = {_METHOD: grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, v1_handlers),))
