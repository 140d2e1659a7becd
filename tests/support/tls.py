"""A throwaway self-signed certificate for servers that speak TLS in tests."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed_certificate(directory: Path, name: str = "mail.poplock.test") -> tuple[Path, Path]:
    """Returns (certificate, key) PEM files, made once per directory."""
    certificate, key = directory / "tls.crt", directory / "tls.key"
    if not certificate.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(certificate)],
            check=True, capture_output=True,
        )
        key.chmod(0o644)
    return certificate, key
