#!/usr/bin/env bash
# The ACS access-token quickstart, told through the cluster: create identity -> issue token ->
# refresh -> revoke -> delete, each line printed only once the operator has done it and the demo
# has seen it in the resource's status, its Secret, its Events and the emulator.
#
# Builds what it needs, starts a local cluster (control plane and one node), the acs-emulator and
# the operator as a Pod installed by the Helm chart from the image scripts/build-image.sh makes,
# and stops all of them on exit. A workload Pod reads the token's Secret from a volume.
# Exits 0 only when every step was observed.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/lib/toolchain.sh

source scripts/lib/stack.sh
STACK_OPERATOR=pod
stack_up "$repo/.dev/demo" acs-demo
fail() { stack_fail "$@"; }

# The resource the story is about, and its Secret.
resource=alice
jsonpath() { kubectl -n $namespace get commid "$resource" -o "jsonpath=$1"; }
# A key with a dot (voip.token) is given escaped: 'voip\.token'.
secret_value() { kubectl -n $namespace get secret "$resource-acs-token" -o "jsonpath={.data.$1}" | base64 -d; }
# What the emulator says of a token: its field $2 (status, identity, scopes).
verdict() { emulator POST validate "{\"token\":\"$1\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin).get(sys.argv[1], ""))' "$2"; }
token_status() { verdict "$1" status; }
has_event() { kubectl -n $namespace get events.events.k8s.io -o jsonpath='{.items[*].reason}' | grep -qw "$1"; }
# A token is shown only as its first characters (the same JWT header for every token) and a
# short fingerprint that tells tokens apart without revealing them.
redact() { echo "${1:0:12}… (${#1} characters, sha256 $(printf '%s' "$1" | sha256sum | cut -c1-12))"; }
# Tokens carry whole-second times: two minted in the same second for the same identity and
# scopes are identical, so the next one is asked for once the current token's second is over.
# $1: the token's expiresOn key (default expiresOn), $2: its lifetime in seconds (default 1 h).
after_mint_second() {
  local minted=$(($(date -d "$(secret_value "${1:-expiresOn}")" +%s) - ${2:-3600}))
  eventually 3 '[ "$(date +%s)" -gt "$minted" ]'
}

echo
echo "Azure Communication Services - Access Tokens Quickstart (through acs-identity-operator)"
kubectl -n $namespace apply -f examples/communicationidentity.yaml >/dev/null
eventually 60 '[ "$(jsonpath "{.status.conditions[?(@.type==\"Ready\")].status}")" = True ]' ||
  fail "alice did not become Ready: $(jsonpath '{.status.conditions}')"
identity=$(jsonpath '{.status.identityId}')
wait_until 10 has_event IdentityCreated || fail "no IdentityCreated event"
echo "Created an identity: $identity"

token=$(secret_value token)
[ "$(token_status "$token")" = valid ] || fail "the emulator does not accept the token in the Secret"
echo "Issued an access token with '$(secret_value scopes)' scope that expires at $(secret_value expiresOn):"
echo "  $(redact "$token")  (in Secret alice-acs-token)"

# A workload as users write one: a Pod mounting the Secret (it prints what it read, never the token).
kubectl -n $namespace apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: reader}
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  securityContext: {runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532}
  containers:
    - name: reader
      image: acs-test/busybox:local
      imagePullPolicy: Never
      command: [/bin/sh, -c, 'echo "identity $(cat /acs/identityId), scopes $(cat /acs/scopes), expires $(cat /acs/expiresOn); token: $(wc -c </acs/token) bytes"']
      securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
      volumeMounts: [{name: token, mountPath: /acs, readOnly: true}]
  volumes: [{name: token, secret: {secretName: alice-acs-token}}]
EOF
eventually 120 '[ "$(kubectl -n $namespace get pod reader -o jsonpath={.status.phase})" = Succeeded ]' ||
  fail "the workload Pod did not run: $(kubectl -n $namespace get pod reader -o jsonpath='{.status}')"
echo "A workload Pod mounting the Secret read: $(pod_output $namespace reader)"

after_mint_second
kubectl -n $namespace annotate commid alice acs-operator.io/refresh-requested-at="$(date +%s)" --overwrite >/dev/null
eventually 30 '[ "$(secret_value token)" != "$token" ]' || fail "the refresh request was not acted on"
refreshed=$(secret_value token)
wait_until 10 has_event TokenRefreshed || fail "no TokenRefreshed event"
[ "$(token_status "$token")" = valid ] || fail "the refresh revoked the previous token"
echo "Refreshed the access token (requested by annotation); it now expires at $(secret_value expiresOn):"
echo "  $(redact "$refreshed")  (the previous token stays valid: a refresh never revokes)"

after_mint_second
kubectl -n $namespace annotate commid alice acs-operator.io/revoke-requested-at="$(date +%s)" --overwrite >/dev/null
eventually 30 '[ "$(token_status "$refreshed")" = revoked ]' || fail "the revoke request was not acted on"
eventually 30 '[ "$(secret_value token)" != "$refreshed" ]' || fail "no new token after the revoke"
reissued=$(secret_value token)
[ "$(token_status "$reissued")" = valid ] || fail "the token issued after the revoke is not valid"
echo "Successfully revoked all access tokens for identity with ID: $identity"
echo "  and issued a fresh one: $(redact "$reissued")"

kubectl -n $namespace delete commid alice --wait=true --timeout 60s >/dev/null
eventually 30 '[ "$(token_status "$reissued")" = deleted ]' || fail "the identity is still alive in ACS"
eventually 60 '! kubectl -n $namespace get secret alice-acs-token' || fail "the Secret outlived its owner"
echo "Deleted the identity with ID: $identity (gone from ACS; its Secret removed with it)"

echo
echo "The same, with a 'voip' and a 'chat' token for one identity (examples/two-tokens.yaml):"
resource=duo
kubectl -n $namespace apply -f examples/two-tokens.yaml >/dev/null
eventually 60 '[ "$(jsonpath "{.status.conditions[?(@.type==\"Ready\")].status}")" = True ]' ||
  fail "duo did not become Ready: $(jsonpath '{.status.conditions}')"
identity=$(jsonpath '{.status.identityId}')
echo "Created an identity: $identity"
declare -A issued
for name in voip chat; do
  token=$(secret_value "$name\.token")
  [ "$(token_status "$token")" = valid ] || fail "the emulator does not accept the $name token"
  [ "$(verdict "$token" identity)" = "$identity" ] || fail "the $name token is not for $identity"
  [ "$(verdict "$token" scopes)" = "$name" ] || fail "the $name token has scopes $(verdict "$token" scopes)"
  [ "$(secret_value "$name\.scopes")" = "$name" ] || fail "$name.scopes in the Secret is not $name"
  issued[$name]=$token
  echo "Issued an access token with '$name' scope that expires at $(secret_value "$name\.expiresOn"):"
  echo "  $(redact "$token")  (in Secret duo-acs-token, key $name.token)"
done

after_mint_second 'voip\.expiresOn' 3600
after_mint_second 'chat\.expiresOn' 7200
kubectl -n $namespace annotate commid duo acs-operator.io/revoke-requested-at="$(date +%s)" --overwrite >/dev/null
for name in voip chat; do
  eventually 30 '[ "$(token_status "${issued[$name]}")" = revoked ]' || fail "the $name token was not revoked"
  eventually 30 '[ "$(secret_value "$name\.token")" != "${issued[$name]}" ]' || fail "no new $name token after the revoke"
  [ "$(token_status "$(secret_value "$name\.token")")" = valid ] || fail "the new $name token is not valid"
done
echo "Successfully revoked all access tokens for identity with ID: $identity"
echo "  and issued a fresh 'voip' and a fresh 'chat' token, both for the same identity"

reissued=$(secret_value 'voip\.token')
kubectl -n $namespace delete commid duo --wait=true --timeout 60s >/dev/null
eventually 30 '[ "$(token_status "$reissued")" = deleted ]' || fail "the identity is still alive in ACS"
eventually 60 '! kubectl -n $namespace get secret duo-acs-token' || fail "the Secret outlived its owner"
echo "Deleted the identity with ID: $identity (gone from ACS; its Secret removed with it)"
echo
stack_info "every step observed; stopping everything"
