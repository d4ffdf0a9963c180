"""Throw-away certificates (a CA, a server certificate for 127.0.0.1/localhost, a client
certificate) made with openssl, for the TLS tests and the TLS benchmark."""

import os
import subprocess


def _openssl(directory: str, *args) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)


def make_ca(directory: str, name: str) -> str:
    _openssl(directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN=btcfeed test {name}")
    return os.path.join(directory, f"{name}.crt")


def make_signed(directory: str, name: str, ca: str, extensions: str) -> str:
    with open(os.path.join(directory, f"{name}.ext"), "w") as handle:
        handle.write(extensions + "\n")
    _openssl(directory, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}")
    _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return os.path.join(directory, f"{name}.crt")


def make_test_pki(directory: str) -> str:
    """ca.crt, other-ca.crt (a CA that signed nothing here), server.crt/key, client.crt/key."""
    make_ca(directory, "ca")
    make_ca(directory, "other-ca")
    make_signed(directory, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost")
    make_signed(directory, "client", "ca", "extendedKeyUsage=clientAuth")
    return directory


def tls_server_args(directory: str, tls_port: int, auth_clients: str = "optional") -> list:
    """redis-server arguments for a TLS port next to the plain one."""
    return ["--tls-port", str(tls_port), "--tls-cert-file", f"{directory}/server.crt",
            "--tls-key-file", f"{directory}/server.key", "--tls-ca-cert-file", f"{directory}/ca.crt",
            "--tls-auth-clients", auth_clients]
