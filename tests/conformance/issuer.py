"""A stand-in Kubernetes ServiceAccount token issuer for the Entra conformance tests.

`python issuer.py DIR` generates an RSA key pair in DIR: `issuer.key` (PKCS#8 PEM, mode 0600)
and `jwks.json` (the public key, as the kube-apiserver serves it at /openid/v1/jwks), which
acs-emulator is pointed at with --issuer-jwks-file; it prints the issuer URL and the subject,
one a line, for the emulator's --federated-credential. `assertion()` signs a token shaped like a
projected ServiceAccount token (audience api://AzureADTokenExchange) with that key.
"""

import json
import os
import sys
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# What the kube-apiserver of a kind/AKS cluster names itself, and the operator's ServiceAccount.
ISSUER = "https://kubernetes.default.svc.cluster.local"
SUBJECT = "system:serviceaccount:acs-system:acs-identity-operator"
AUDIENCE = "api://AzureADTokenExchange"
KID = "conformance-issuer-key"


def generate(directory):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    os.makedirs(directory, mode=0o700, exist_ok=True)
    key_path = os.path.join(directory, "issuer.key")
    with open(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(pem)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": KID, "use": "sig", "alg": "RS256"})
    with open(os.path.join(directory, "jwks.json"), "w", encoding="ascii") as f:
        json.dump({"keys": [jwk]}, f)


def assertion(key_path, lifetime=3600, **overrides):
    """A ServiceAccount-shaped token from now for `lifetime` seconds; `overrides` replace claims."""
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": SUBJECT,
        "aud": [AUDIENCE],
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        "kubernetes.io": {
            "namespace": "acs-system",
            "serviceaccount": {"name": "acs-identity-operator"},
        },
    }
    claims.update(overrides)
    with open(key_path, "rb") as f:
        key = f.read()
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})


if __name__ == "__main__":
    generate(sys.argv[1])
    print(ISSUER)
    print(SUBJECT)
