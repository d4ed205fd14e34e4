"""usersvc.v1.UserService over gRPC.

Each RPC is thin: request -> service input, one service call as the caller
from the request context, result -> response. Domain errors are not caught
here: ``ErrorMappingInterceptor`` turns them into statuses in one place.

The methods whose responses may reach 4 MiB (ListUsers and the batch reads
and writes) answer with the response already encoded, a user at a time
(usersvc.api.mappers.encode_users_response); the server passes those bytes
to the client as they are (usersvc.api.interceptors.encoded_responses).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from usersvc_protos.v1 import user_service_pb2 as pb
from usersvc_protos.v1 import user_service_pb2_grpc
from usersvc.api import mappers
from usersvc.api.context import current_principal, current_role_check
from usersvc.services.batch_writes import DeleteItem

if TYPE_CHECKING:
    from usersvc.services.account_codes import AccountCodeService
    from usersvc.services.batch_writes import BatchWriteService
    from usersvc.services.users import UserService

_Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

_SERVICE = "/usersvc.v1.UserService/"
# The methods whose handler hands the caller's pending role re-check
# (usersvc.api.context.current_role_check) to its one statement, which
# settles it: the reads (ListUsers: a page without a filter), and UpdateUser
# and CreateUser, whose writes refuse themselves unless the check passes
# (usersvc.adapters.repository.user_update, .user_create; a CreateUser with a
# request id settles it first in its unit of work). AuthInterceptor defers
# the check for these only, and settles it itself before the answer when the
# handler did not.
ROLE_CHECKED_IN_STATEMENT = frozenset(
    _SERVICE + name
    for name in (
        "GetUser",
        "LookupUser",
        "BatchGetUsers",
        "ListUsers",
        "UpdateUser",
        "CreateUser",
    )
)


class UserServicer(user_service_pb2_grpc.UserServiceServicer):
    """Every method raises what the service raises (usersvc.domain.errors)."""

    def __init__(
        self,
        user_service: UserService,
        *,
        account_codes: AccountCodeService | None = None,
        batch_writes: BatchWriteService | None = None,
    ) -> None:
        """``account_codes`` and ``batch_writes`` serve the code and batch
        write methods; a composition without them (unit tests of the other
        methods) answers those methods with INTERNAL."""
        self._users = user_service
        self._account_codes = account_codes
        self._batch_writes = batch_writes

    def _codes(self) -> AccountCodeService:
        if self._account_codes is None:
            raise RuntimeError("the account code service is not wired")
        return self._account_codes

    def _batches(self) -> BatchWriteService:
        if self._batch_writes is None:
            raise RuntimeError("the batch write service is not wired")
        return self._batch_writes

    async def CreateUser(
        self, request: pb.CreateUserRequest, context: _Context
    ) -> pb.CreateUserResponse:
        user = await self._users.create_user(
            principal=current_principal(),
            request=mappers.create_user_input(request),
            role_check=current_role_check(),
        )
        return pb.CreateUserResponse(user=mappers.user_to_proto(user))

    async def GetUser(self, request: pb.GetUserRequest, context: _Context) -> pb.GetUserResponse:
        user = await self._users.get_user(
            principal=current_principal(), user_id=request.id, role_check=current_role_check()
        )
        return pb.GetUserResponse(user=mappers.user_to_proto(user))

    async def LookupUser(
        self, request: pb.LookupUserRequest, context: _Context
    ) -> pb.LookupUserResponse:
        user = await self._users.lookup_user(
            principal=current_principal(), email=request.email, role_check=current_role_check()
        )
        return pb.LookupUserResponse(user=mappers.user_to_proto(user))

    async def ListUsers(  # type: ignore[override]  # answers encoded bytes
        self, request: pb.ListUsersRequest, context: _Context
    ) -> bytes:
        result = await self._users.list_users(
            principal=current_principal(),
            request=mappers.list_users_input(request),
            role_check=current_role_check(),
        )
        return await mappers.encoded_user_list_response(result)

    async def UpdateUser(
        self, request: pb.UpdateUserRequest, context: _Context
    ) -> pb.UpdateUserResponse:
        user = await self._users.update_user(
            principal=current_principal(),
            request=mappers.update_user_input(request),
            role_check=current_role_check(),
        )
        return pb.UpdateUserResponse(user=mappers.user_to_proto(user))

    async def DeleteUser(
        self, request: pb.DeleteUserRequest, context: _Context
    ) -> pb.DeleteUserResponse:
        user = await self._users.delete_user(
            principal=current_principal(), user_id=request.id, etag=request.etag
        )
        return pb.DeleteUserResponse(user=mappers.user_to_proto(user))

    async def UndeleteUser(
        self, request: pb.UndeleteUserRequest, context: _Context
    ) -> pb.UndeleteUserResponse:
        user = await self._users.undelete_user(principal=current_principal(), user_id=request.id)
        return pb.UndeleteUserResponse(user=mappers.user_to_proto(user))

    async def PurgeUser(
        self, request: pb.PurgeUserRequest, context: _Context
    ) -> pb.PurgeUserResponse:
        await self._users.purge_user(principal=current_principal(), user_id=request.id)
        return pb.PurgeUserResponse()

    async def DisableUser(
        self, request: pb.DisableUserRequest, context: _Context
    ) -> pb.DisableUserResponse:
        user = await self._users.disable_user(principal=current_principal(), user_id=request.id)
        return pb.DisableUserResponse(user=mappers.user_to_proto(user))

    async def EnableUser(
        self, request: pb.EnableUserRequest, context: _Context
    ) -> pb.EnableUserResponse:
        user = await self._users.enable_user(principal=current_principal(), user_id=request.id)
        return pb.EnableUserResponse(user=mappers.user_to_proto(user))

    async def ChangePassword(
        self, request: pb.ChangePasswordRequest, context: _Context
    ) -> pb.ChangePasswordResponse:
        await self._users.change_password(
            principal=current_principal(),
            user_id=request.id,
            current_password=request.current_password,
            new_password=request.new_password,
        )
        return pb.ChangePasswordResponse()

    async def BatchCreateUsers(
        self, request: pb.BatchCreateUsersRequest, context: _Context
    ) -> pb.BatchCreateUsersResponse:
        users = await self._users.batch_create_users(
            principal=current_principal(),
            requests=mappers.create_user_inputs(request),
            request_id=request.request_id,
        )
        return pb.BatchCreateUsersResponse(users=mappers.users_to_proto(users))

    async def BatchGetUsers(  # type: ignore[override]  # answers encoded bytes
        self, request: pb.BatchGetUsersRequest, context: _Context
    ) -> bytes:
        users = await self._users.batch_get_users(
            principal=current_principal(),
            user_ids=tuple(request.ids),
            role_check=current_role_check(),
        )
        return await mappers.encoded_batch_users_response(pb.BatchGetUsersResponse, users)

    async def ImportUsers(
        self, request_iterator: AsyncIterator[pb.ImportUsersRequest], context: _Context
    ) -> pb.ImportUsersResponse:
        # The service checks the caller before it reads the first message.
        result = await self._users.import_users(
            principal=current_principal(), rows=mappers.import_rows(request_iterator)
        )
        return mappers.import_users_response(result)

    async def BatchUpdateUsers(  # type: ignore[override]  # answers encoded bytes
        self, request: pb.BatchUpdateUsersRequest, context: _Context
    ) -> bytes:
        users = await self._batches().batch_update_users(
            principal=current_principal(), requests=mappers.batch_update_user_inputs(request)
        )
        return await mappers.encoded_batch_users_response(pb.BatchUpdateUsersResponse, users)

    async def BatchDeleteUsers(  # type: ignore[override]  # answers encoded bytes
        self, request: pb.BatchDeleteUsersRequest, context: _Context
    ) -> bytes:
        users = await self._batches().batch_delete_users(
            principal=current_principal(),
            requests=[DeleteItem(item.id, item.etag) for item in request.requests],
        )
        return await mappers.encoded_batch_users_response(pb.BatchDeleteUsersResponse, users)

    async def CreateEmailVerificationCode(
        self, request: pb.CreateEmailVerificationCodeRequest, context: _Context
    ) -> pb.CreateEmailVerificationCodeResponse:
        issued = await self._codes().create_email_verification_code(
            principal=current_principal(), user_id=request.id
        )
        return pb.CreateEmailVerificationCodeResponse(
            code=issued.code, expire_time=mappers.issued_code_timestamp(issued.expire_time)
        )

    async def VerifyEmail(
        self, request: pb.VerifyEmailRequest, context: _Context
    ) -> pb.VerifyEmailResponse:
        user = await self._codes().verify_email(
            principal=current_principal(), user_id=request.id, code=request.code
        )
        return pb.VerifyEmailResponse(user=mappers.user_to_proto(user))

    async def CreatePasswordResetCode(
        self, request: pb.CreatePasswordResetCodeRequest, context: _Context
    ) -> pb.CreatePasswordResetCodeResponse:
        issued = await self._codes().create_password_reset_code(
            principal=current_principal(), email=request.email
        )
        return pb.CreatePasswordResetCodeResponse(
            code=issued.code, expire_time=mappers.issued_code_timestamp(issued.expire_time)
        )

    async def ResetPassword(
        self, request: pb.ResetPasswordRequest, context: _Context
    ) -> pb.ResetPasswordResponse:
        await self._codes().reset_password(
            email=request.email, code=request.code, new_password=request.new_password
        )
        return pb.ResetPasswordResponse()
