"""Decrypt ``private-encrypted-*`` event data as a subscriber does, so a test can check the
plaintext a browser would see.

Written from Pusher's end-to-end encryption spec (what pusher-js does), not by calling the
pusher library's crypto module: relay encrypts with that library, and a test that decrypts
with the same code could not catch a misuse of it. The per-channel key is
SHA-256(channel name + master key); the data is ``{"nonce": b64, "ciphertext": b64}`` of a
NaCl secretbox.
"""

import base64
import binascii
import hashlib
import json

import nacl.exceptions
import nacl.secret


class DecryptError(ValueError):
    """The data is not what an encrypting Pusher library would have sent for this channel."""


def master_key(key_base64: str) -> bytes:
    """The 32-byte master key; ValueError otherwise (the key itself is never in the text)."""
    try:
        key = base64.b64decode(key_base64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("encryption master key is not valid base64") from None
    if len(key) != nacl.secret.SecretBox.KEY_SIZE:
        raise ValueError("encryption master key must decode to 32 bytes")
    return key


def decrypt(channel: str, data: str, key: bytes) -> str:
    """The plaintext of one encrypted event's data."""
    try:
        fields = json.loads(data)
        nonce = base64.b64decode(fields["nonce"], validate=True)
        ciphertext = base64.b64decode(fields["ciphertext"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise DecryptError("data is not {\"nonce\": b64, \"ciphertext\": b64}") from None
    shared = hashlib.sha256(channel.encode("utf-8") + key).digest()
    try:
        plain = nacl.secret.SecretBox(shared).decrypt(ciphertext, nonce)
    except (nacl.exceptions.CryptoError, ValueError):
        raise DecryptError("does not decrypt with this channel's key") from None
    return plain.decode("utf-8")
