"""usersvc.v1.EventService over gRPC, and the wire form of an event (also
the body the relay publishes to NATS).

Thin like the other servicers: request -> one service call as the caller
-> response. Domain errors go to ErrorMappingInterceptor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from usersvc_protos.v1 import event_service_pb2 as pb
from usersvc_protos.v1 import event_service_pb2_grpc
from usersvc.api import mappers
from usersvc.api.context import current_principal
from usersvc.domain.events import StoredEvent

if TYPE_CHECKING:
    from usersvc.services.events import EventService

_Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

EVENT_SERVICE = pb.DESCRIPTOR.services_by_name["EventService"].full_name


def event_to_proto(event: StoredEvent) -> pb.Event:
    """The wire form of ``event``. Raises ValueError for a naive timestamp."""
    # Built in one constructor call: the relay encodes every event it
    # publishes, and a user set afterwards with CopyFrom costs a second copy.
    return pb.Event(
        id=str(event.id),
        sequence=event.sequence,
        type=event.type,
        user_id="" if event.user_id is None else str(event.user_id),
        actor=event.actor,
        request_id=event.request_id,
        create_time=mappers.timestamp_to_proto(event.create_time),
        changed_fields=event.changed_fields,
        attributes=event.attributes,
        user=None if event.user is None else mappers.user_to_proto(event.user),
    )


class EventServicer(event_service_pb2_grpc.EventServiceServicer):
    """Every method raises what the service raises (usersvc.domain.errors)."""

    def __init__(self, event_service: EventService) -> None:
        self._events = event_service

    async def ListEvents(
        self, request: pb.ListEventsRequest, context: _Context
    ) -> pb.ListEventsResponse:
        page = await self._events.list_events(
            principal=current_principal(),
            page_size=request.page_size,
            page_token=request.page_token,
            filter=request.filter,
            after_sequence=request.after_sequence,
        )
        return pb.ListEventsResponse(
            events=[event_to_proto(event) for event in page.events],
            next_page_token=page.next_page_token,
        )

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: _Context
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        events = await self._events.watch_events(
            principal=current_principal(),
            after_sequence=request.after_sequence,
            filter=request.filter,
        )
        async for event in events:
            yield pb.WatchEventsResponse(event=event_to_proto(event))
