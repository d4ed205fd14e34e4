"""The published contract (docs/api.md) as a test: the protos are compiled afresh
and every service, method and field that callers rely on must be there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from usersvc_protos.v1 import auth_service_pb2, user_pb2, user_service_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"

USER_FIELDS = {
    "id",
    "email",
    "display_name",
    "roles",
    "state",
    "labels",
    "create_time",
    "update_time",
    "delete_time",
    "etag",
}
USER_STATES = {"STATE_UNSPECIFIED", "STATE_ACTIVE", "STATE_DISABLED", "STATE_DELETED"}

# method -> (request fields, response fields), straight from docs/api.md.
USER_SERVICE = {
    "CreateUser": (
        {"email", "password", "display_name", "roles", "labels", "request_id"},
        {"user"},
    ),
    "GetUser": ({"id"}, {"user"}),
    "LookupUser": ({"email"}, {"user"}),
    "ListUsers": (
        {"page_size", "page_token", "filter", "order_by", "show_deleted"},
        {"users", "next_page_token", "total_size"},
    ),
    "UpdateUser": ({"user", "update_mask"}, {"user"}),
    "DeleteUser": ({"id", "etag"}, {"user"}),
    "UndeleteUser": ({"id"}, {"user"}),
    "PurgeUser": ({"id"}, set()),
    "DisableUser": ({"id"}, {"user"}),
    "EnableUser": ({"id"}, {"user"}),
    "ChangePassword": ({"id", "current_password", "new_password"}, set()),
    "BatchCreateUsers": ({"requests", "request_id"}, {"users"}),
    "BatchGetUsers": ({"ids"}, {"users"}),
    # A client stream of ImportUsersRequest (see test below).
    "ImportUsers": ({"users"}, {"imported_count", "failed_count", "errors", "errors_truncated"}),
}
TOKEN_PAIR = {"access_token", "refresh_token", "token_type", "expires_in", "user"}
AUTH_SERVICE = {
    "Login": ({"email", "password"}, TOKEN_PAIR),
    "RefreshToken": ({"refresh_token"}, TOKEN_PAIR),
    "Logout": ({"refresh_token"}, set()),
    "RevokeAllSessions": ({"user_id"}, {"revoked_count"}),
    "GetJwks": (set(), {"jwks_json"}),
    "IntrospectToken": ({"token"}, {"active", "sub", "roles", "session_id", "expire_time"}),
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pool.DescriptorPool:
    out = tmp_path_factory.mktemp("descriptors") / "usersvc.binpb"
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            *protos,
        ],
        check=True,
        cwd=PROTOS,
    )
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    fresh = descriptor_pool.DescriptorPool()
    for file in files.file:
        fresh.Add(file)
    return fresh


@pytest.mark.parametrize(
    ("service", "methods"),
    [("usersvc.v1.UserService", USER_SERVICE), ("usersvc.v1.AuthService", AUTH_SERVICE)],
)
def test_every_contract_method_has_the_contract_fields(
    pool: descriptor_pool.DescriptorPool,
    service: str,
    methods: dict[str, tuple[set[str], set[str]]],
) -> None:
    descriptor = pool.FindServiceByName(service)
    published = {m.name: m for m in descriptor.methods}
    assert set(methods) <= set(published), f"missing methods: {set(methods) - set(published)}"
    for name, (request_fields, response_fields) in methods.items():
        method = published[name]
        assert method.input_type.name == f"{name}Request"
        assert method.output_type.name == f"{name}Response"
        assert request_fields <= {f.name for f in method.input_type.fields}, name
        assert response_fields <= {f.name for f in method.output_type.fields}, name


def test_import_users_is_a_client_stream_of_users_with_password_hashes(
    pool: descriptor_pool.DescriptorPool,
) -> None:
    method = pool.FindServiceByName("usersvc.v1.UserService").methods_by_name["ImportUsers"]
    users = method.input_type.fields_by_name["users"]
    assert (method.client_streaming, method.server_streaming) == (True, False)
    assert users.message_type.full_name == "usersvc.v1.ImportedUser"
    assert {f.name for f in users.message_type.fields} >= {
        "email",
        "password_hash",
        "display_name",
        "roles",
        "labels",
        "create_time",
    }
    error = method.output_type.fields_by_name["errors"].message_type
    assert {f.name for f in error.fields} >= {"row", "field", "reason", "description"}


def test_user_resource_has_the_contract_fields_and_states(
    pool: descriptor_pool.DescriptorPool,
) -> None:
    user = pool.FindMessageTypeByName("usersvc.v1.User")
    assert {f.name for f in user.fields} >= USER_FIELDS
    assert {v.name for v in user.enum_types_by_name["State"].values} == USER_STATES
    assert user.fields_by_name["create_time"].message_type.full_name == (
        "google.protobuf.Timestamp"
    )
    assert (
        pool.FindMessageTypeByName("usersvc.v1.UpdateUserRequest")
        .fields_by_name["update_mask"]
        .message_type.full_name
        == "google.protobuf.FieldMask"
    )


def test_no_message_has_a_field_that_could_carry_a_password_hash(
    pool: descriptor_pool.DescriptorPool,
) -> None:
    user = pool.FindMessageTypeByName("usersvc.v1.User")
    assert not {f.name for f in user.fields} & {"password", "password_hash", "hash"}


@pytest.mark.parametrize("module", [user_pb2, user_service_pb2, auth_service_pb2])
def test_the_generated_code_was_built_from_these_protos(
    pool: descriptor_pool.DescriptorPool, module: object
) -> None:
    generated = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(generated)  # type: ignore[attr-defined]
    fresh = descriptor_pb2.FileDescriptorProto()
    pool.FindFileByName(generated.name).CopyToProto(fresh)
    assert _without_json_names(generated) == _without_json_names(fresh)


def _without_json_names(
    file: descriptor_pb2.FileDescriptorProto,
) -> descriptor_pb2.FileDescriptorProto:
    # protoc fills json_name in descriptor sets; CopyToProto leaves it out.
    def strip(messages: object) -> None:
        for message in messages:  # type: ignore[attr-defined]
            for field in message.field:
                field.ClearField("json_name")
            strip(message.nested_type)

    strip(file.message_type)
    return file


def test_committed_generated_directory_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
