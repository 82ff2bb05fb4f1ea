"""Microsoft's ACS identity SDK (azure-communication-identity 1.5.0), unchanged, against acs-emulator;
and with Microsoft's azure-identity (1.27.0) getting its bearer token from the emulator's Entra
authority through a federated client assertion (workload identity), instead of the access key.

Run through tests/conformance/run.sh, which starts the emulators and sets:
ACS_EMULATOR_HTTP / ACS_EMULATOR_HTTPS (connection strings, both started with --admin),
ACS_EMULATOR_CA and REQUESTS_CA_BUNDLE (the HTTPS emulator's CA), and, for the Entra
application the HTTPS emulator knows, ACS_ENTRA_TENANT, ACS_ENTRA_CLIENT and
ACS_ENTRA_ISSUER_KEY (the key of the ServiceAccount issuer it trusts; see issuer.py).
"""

import asyncio
import base64
import datetime
import json
import os

import pytest
import requests
from azure.identity import ClientAssertionCredential, WorkloadIdentityCredential
from azure.communication.identity import (
    CommunicationIdentityClient,
    CommunicationTokenScope,
    CommunicationUserIdentifier,
)
from azure.communication.identity._shared.utils import create_access_token
from azure.communication.identity.aio import (
    CommunicationIdentityClient as AsyncCommunicationIdentityClient,
)
from azure.core.credentials import AccessToken, AzureKeyCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)

import issuer

# The scope the ACS SDK asks azure-identity for.
ACS_SCOPE = "https://communication.azure.com//.default"
PREVIEW = "2025-03-02-preview"
GA_VERSIONS = ["2025-06-30", "2026-07-22", "2026-09-23"]


def parse_connection_string(text):
    parts = dict(part.split("=", 1) for part in text.strip().split(";") if part)
    return parts["endpoint"].rstrip("/"), parts["accesskey"]


def env(name):
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run tests/conformance/run.sh")
    return value


class Emulator:
    def __init__(self, kind):
        self.kind = kind
        self.connection_string = env(f"ACS_EMULATOR_{kind.upper()}")
        self.endpoint, self.key = parse_connection_string(self.connection_string)
        self.verify = env("ACS_EMULATOR_CA") if kind == "https" else True

    def client(self, key=None):
        if self.kind == "http":
            # The constructor with an http:// endpoint talks plain HTTP.
            return CommunicationIdentityClient(self.endpoint, AzureKeyCredential(key or self.key))
        if key:
            return CommunicationIdentityClient.from_connection_string(
                f"endpoint={self.endpoint}/;accesskey={key}"
            )
        # from_connection_string always talks HTTPS and trusts REQUESTS_CA_BUNDLE.
        return CommunicationIdentityClient.from_connection_string(self.connection_string)

    def admin(self, method, path, body=None):
        response = requests.request(
            method, f"{self.endpoint}/_emulator/{path}", json=body, verify=self.verify, timeout=10
        )
        response.raise_for_status()
        return response.json()

    def requests_count(self, operation, status):
        stats = self.admin("GET", "stats")
        return stats["requests"].get(operation, {}).get(str(status), 0)


@pytest.fixture(params=["http", "https"])
def emulator(request):
    return Emulator(request.param)


@pytest.fixture
def client(emulator):
    return emulator.client()


def claims(token):
    """The payload as the SDK itself reads it: standard base64, '==' appended."""
    payload = token.split(".")[1]
    assert "-" not in payload and "_" not in payload, payload
    return json.loads(base64.b64decode(payload + "==").decode("ascii"))


def expires_on_seconds(expires_on):
    """`expires_on` as the SDK hands it over (a raw string in 1.5.0), in epoch seconds."""
    if isinstance(expires_on, datetime.datetime):
        return int(expires_on.timestamp())
    if isinstance(expires_on, (int, float)):
        return int(expires_on)
    return int(datetime.datetime.fromisoformat(expires_on).timestamp())


def check_token(access_token, lifetime_seconds, user=None):
    c = claims(access_token.token)
    assert c["exp"] - c["iat"] == lifetime_seconds
    assert c["exp"] == expires_on_seconds(access_token.expires_on)
    # The SDK's own JWT reader (used by its token credential) sees the same expiry.
    assert create_access_token(access_token.token).expires_on == c["exp"]
    if user is not None:
        assert "8:" + c["skypeid"] == user.properties["id"]


def test_create_user(client):
    user = client.create_user()
    assert isinstance(user, CommunicationUserIdentifier)
    assert user.properties["id"].startswith("8:acs:")


def test_get_token_for_60_minutes(client):
    user = client.create_user()
    token = client.get_token(
        user,
        [CommunicationTokenScope.CHAT, CommunicationTokenScope.VOIP],
        token_expires_in=datetime.timedelta(minutes=60),
    )
    check_token(token, 3600, user)
    assert claims(token.token)["acsScope"] == "chat,voip"


def test_get_token_defaults_to_24_hours(client):
    user = client.create_user()
    token = client.get_token(user, [CommunicationTokenScope.VOIP])
    check_token(token, 24 * 3600, user)


def test_create_user_and_token(client):
    user, token = client.create_user_and_token(
        [CommunicationTokenScope.CHAT], token_expires_in=datetime.timedelta(hours=2)
    )
    check_token(token, 2 * 3600, user)


def test_revoke_tokens(emulator, client):
    user = client.create_user()
    token = client.get_token(user, [CommunicationTokenScope.CHAT])
    assert emulator.admin("POST", "validate", {"token": token.token})["valid"] is True
    client.revoke_tokens(user)
    assert emulator.admin("POST", "validate", {"token": token.token})["status"] == "revoked"
    fresh = client.get_token(user, [CommunicationTokenScope.CHAT])
    assert emulator.admin("POST", "validate", {"token": fresh.token})["valid"] is True


def test_delete_user_and_a_token_for_it_is_refused(emulator, client):
    user, token = client.create_user_and_token([CommunicationTokenScope.CHAT])
    client.delete_user(user)
    assert emulator.admin("POST", "validate", {"token": token.token})["status"] == "deleted"
    with pytest.raises(ResourceNotFoundError) as refused:
        client.get_token(user, [CommunicationTokenScope.CHAT])
    assert refused.value.status_code == 404


def test_a_30_minute_lifetime_is_refused_with_400(emulator, client):
    user = client.create_user()
    before = emulator.requests_count("issueAccessToken", 400)
    with pytest.raises(HttpResponseError) as refused:
        client.get_token(
            user, [CommunicationTokenScope.CHAT], token_expires_in=datetime.timedelta(minutes=30)
        )
    assert refused.value.status_code == 400
    assert refused.value.error.code == "ValidationError"
    # No Retry-After on a 400, so the SDK did not retry it.
    assert emulator.requests_count("issueAccessToken", 400) == before + 1


def test_a_wrong_key_is_refused_with_401(emulator):
    wrong = base64.b64encode(b"not-the-resource-key-0123456789!").decode()
    with pytest.raises(HttpResponseError) as refused:
        emulator.client(key=wrong).create_user()
    assert refused.value.status_code == 401
    assert refused.value.error.code == "Denied"


def test_a_429_with_retry_after_is_retried_until_it_succeeds(emulator, client):
    user = client.create_user()
    emulator.admin("PATCH", "config", {"limits": {"issueAccessToken": 1, "windowSeconds": 1}})
    try:
        before = emulator.requests_count("issueAccessToken", 429)
        client.get_token(user, [CommunicationTokenScope.CHAT], token_expires_in=datetime.timedelta(hours=1))
        # The window is full: the service answers 429 + Retry-After: 1, the SDK waits and retries.
        token = client.get_token(
            user, [CommunicationTokenScope.CHAT], token_expires_in=datetime.timedelta(hours=1)
        )
        check_token(token, 3600, user)
        assert emulator.requests_count("issueAccessToken", 429) >= before + 1
    finally:
        emulator.admin(
            "PATCH", "config", {"limits": {"issueAccessToken": 1000, "windowSeconds": 30}}
        )


def test_the_async_client_sends_raw_ids_and_they_verify():
    emulator = Emulator("http")

    async def flow():
        async with AsyncCommunicationIdentityClient(
            emulator.endpoint, AzureKeyCredential(emulator.key)
        ) as client:
            user = await client.create_user()
            token = await client.get_token(user, [CommunicationTokenScope.VOIP])
            check_token(token, 24 * 3600, user)
            await client.revoke_tokens(user)
            await client.delete_user(user)
            with pytest.raises(ResourceNotFoundError):
                await client.get_token(user, [CommunicationTokenScope.VOIP])

    asyncio.run(flow())


# --- Entra ID workload identity: azure-identity signs in at the emulator's authority --------------


@pytest.fixture
def https():
    return Emulator("https")


def entra_kwargs(https):
    """What a workload needs to sign in: the emulator is the authority (its own endpoint, tenants
    under it); instance discovery is off, as for any authority that is not a public cloud."""
    return {
        "tenant_id": env("ACS_ENTRA_TENANT"),
        "client_id": env("ACS_ENTRA_CLIENT"),
        "authority": https.endpoint,
        "disable_instance_discovery": True,
    }


def assertion(**overrides):
    return issuer.assertion(env("ACS_ENTRA_ISSUER_KEY"), **overrides)


def quickstart(client):
    """The ACS quickstart: create an identity, issue a token, refresh it, revoke, delete."""
    user = client.create_user()
    token = client.get_token(user, [CommunicationTokenScope.VOIP], token_expires_in=datetime.timedelta(hours=1))
    check_token(token, 3600, user)
    refreshed = client.get_token(user, [CommunicationTokenScope.VOIP])
    check_token(refreshed, 24 * 3600, user)
    client.revoke_tokens(user)
    client.delete_user(user)
    with pytest.raises(ResourceNotFoundError):
        client.get_token(user, [CommunicationTokenScope.VOIP])
    return token, refreshed


def test_workload_identity_credential_runs_the_quickstart(https, tmp_path):
    # As on AKS: the projected ServiceAccount token in a file (AZURE_FEDERATED_TOKEN_FILE).
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(assertion())
    credential = WorkloadIdentityCredential(token_file_path=str(token_file), **entra_kwargs(https))
    before = https.requests_count("entraToken", 200)
    token, refreshed = quickstart(CommunicationIdentityClient(https.endpoint, credential))
    assert https.admin("POST", "validate", {"token": token.token})["status"] == "deleted"
    assert https.admin("POST", "validate", {"token": refreshed.token})["status"] == "deleted"
    # One Entra token, cached by azure-identity for every call of the quickstart.
    assert https.requests_count("entraToken", 200) == before + 1


def test_client_assertion_credential_gets_an_acs_token(https):
    credential = ClientAssertionCredential(func=assertion, **entra_kwargs(https))
    access = credential.get_token(ACS_SCOPE)
    assert access.expires_on > datetime.datetime.now().timestamp() + 3000
    payload = json.loads(base64.urlsafe_b64decode(access.token.split(".")[1] + "=="))
    assert payload["aud"] == "https://communication.azure.com/"
    assert payload["tid"] == env("ACS_ENTRA_TENANT")
    assert payload["appid"] == env("ACS_ENTRA_CLIENT")
    user, token = CommunicationIdentityClient(https.endpoint, credential).create_user_and_token(
        [CommunicationTokenScope.CHAT]
    )
    check_token(token, 24 * 3600, user)


@pytest.mark.parametrize(
    "change, code",
    [
        ({"client_id": "11111111-2222-4333-8444-555555555555"}, "AADSTS700016"),
        ({"assertion": {"sub": "system:serviceaccount:default:someone-else"}}, "AADSTS70021"),
        ({"assertion": {"aud": ["api://not-the-exchange"]}}, "AADSTS70021"),
        ({"assertion": {"exp": 1_000_000_000, "iat": 999_996_400, "nbf": 999_996_400}}, "AADSTS700024"),
    ],
    ids=["unknown-client", "wrong-subject", "wrong-audience", "expired"],
)
def test_entra_refusals_reach_azure_identity_with_their_aadsts_code(https, change, code):
    kwargs = entra_kwargs(https)
    kwargs.update({k: v for k, v in change.items() if k != "assertion"})
    credential = ClientAssertionCredential(func=lambda: assertion(**change.get("assertion", {})), **kwargs)
    with pytest.raises(ClientAuthenticationError) as refused:
        credential.get_token(ACS_SCOPE)
    assert code in str(refused.value)


def test_a_bearer_token_the_authority_did_not_issue_is_refused_with_401(https):
    class Forged:
        """A credential handing out a token signed by the ServiceAccount issuer, not by Entra."""

        def get_token(self, *scopes, **kwargs):
            forged = assertion(aud="https://communication.azure.com/")
            return AccessToken(forged, int(datetime.datetime.now().timestamp()) + 3600)

    with pytest.raises(HttpResponseError) as refused:
        CommunicationIdentityClient(https.endpoint, Forged()).create_user()
    assert refused.value.status_code == 401
    assert refused.value.error.code == "Denied"


# --- API versions: the GA versions, and a retired preview -------------------------------------


def sent_api_versions(call):
    """Calls `call(hook)` and returns the api-version of every request the SDK sent."""
    seen = []

    def hook(request):
        seen.append(request.http_request.url.split("api-version=", 1)[1].split("&")[0])

    call(hook)
    return seen


@pytest.mark.parametrize("version", GA_VERSIONS)
def test_the_sdk_runs_the_quickstart_on_each_ga_version(https, version):
    client = CommunicationIdentityClient.from_connection_string(https.connection_string, api_version=version)

    def flow(hook):
        user = client.create_user(raw_request_hook=hook)
        token = client.get_token(user, [CommunicationTokenScope.CHAT], raw_request_hook=hook)
        check_token(token, 24 * 3600, user)
        client.revoke_tokens(user, raw_request_hook=hook)
        client.delete_user(user, raw_request_hook=hook)

    assert set(sent_api_versions(flow)) == {version}


def test_a_retired_preview_is_refused_as_an_unsupported_api_version(https):
    client = CommunicationIdentityClient.from_connection_string(https.connection_string, api_version=PREVIEW)
    client.create_user()
    https.admin("PUT", "api-versions", {"retired": [PREVIEW]})
    try:
        with pytest.raises(HttpResponseError) as refused:
            client.create_user()
        assert refused.value.status_code == 400
        assert refused.value.error.code == "UnsupportedApiVersion"
        assert PREVIEW in refused.value.error.message
        # The GA versions still serve.
        CommunicationIdentityClient.from_connection_string(
            https.connection_string, api_version=GA_VERSIONS[-1]
        ).create_user()
    finally:
        https.admin("PUT", "api-versions", {"retired": []})
    client.create_user()
