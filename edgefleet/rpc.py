"""Register grpc.aio services so that a message that does not parse gets INVALID_ARGUMENT and a reason.

grpc turns an exception raised while deserializing into UNKNOWN "Unexpected <class DecodeError>" and logs a
traceback per request; the generated add_*Servicer_to_server functions parse with FromString, which raises.
Used by edge-agent's KServe server and by cloud-sync's device services.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

__all__ = ["add_service"]


@dataclass(frozen=True)
class _Malformed:
    message_type: str
    error: str

    @property
    def reason(self) -> str:
        return f"the request body is not a valid {self.message_type} ({self.error})"


def _parser(
    message_class: type[Message], custom: Callable[[bytes], Any] | None = None
) -> Callable[[bytes], Any | _Malformed]:
    read = custom or message_class.FromString

    def parse(data: bytes) -> Any | _Malformed:
        try:
            return read(data)
        except DecodeError as exc:
            return _Malformed(message_class.DESCRIPTOR.full_name, str(exc))

    return parse


def _unary(method: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await method(request, context)

    return handle


def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """The request stream with every message parsed; a bad one aborts the call with its reason."""

    async def parsed() -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            yield request

    return parsed()


def _stream_unary(method: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handle(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await method(_checked(requests, context), context)

    return handle


def _stream_stream(method: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def handle(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in method(_checked(requests, context), context):
            yield response

    return handle


def add_service(
    server: grpc.aio.Server,
    module: ModuleType,
    service_name: str,
    servicer: Any,
    parsers: Mapping[str, Callable[[bytes], Any]] | None = None,
) -> None:
    """Register every RPC of `service_name` (defined in the generated `module`) on `servicer`'s methods.

    `parsers`: method name -> a parser of its request bytes to use instead of the message class's FromString
    (it raises DecodeError for a body that does not parse).
    """
    service = module.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_class = getattr(module, method.input_type.name, None) or _message_class(method.input_type)
        response_class = getattr(module, method.output_type.name, None) or _message_class(method.output_type)
        implementation = getattr(servicer, method.name)
        custom = (parsers or {}).get(method.name)
        options = {
            "request_deserializer": _parser(request_class, custom),
            "response_serializer": response_class.SerializeToString,
        }
        if method.client_streaming and method.server_streaming:
            handler = grpc.stream_stream_rpc_method_handler(_stream_stream(implementation), **options)
        elif method.client_streaming:
            handler = grpc.stream_unary_rpc_method_handler(_stream_unary(implementation), **options)
        elif method.server_streaming:
            handler = grpc.unary_stream_rpc_method_handler(_unary_stream(implementation), **options)
        else:
            handler = grpc.unary_unary_rpc_method_handler(_unary(implementation), **options)
        handlers[method.name] = handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _unary_stream(method: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        async for response in method(request, context):
            yield response

    return handle


def _message_class(descriptor: Any) -> type[Message]:
    """The generated class of a message defined in another proto file of the same package."""
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)
