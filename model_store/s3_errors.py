"""What an S3 client's errors say: their HTTP status and error code, and what an operator should check for those no
retry heals (an outside check saw only the code: "could not read the index (SignatureDoesNotMatch)")."""

from __future__ import annotations


def error_status(e: Exception) -> int | None:
    if not isinstance(response := getattr(e, "response", None), dict):
        return None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code")
    return status if isinstance(status, int) else int(code) if isinstance(code, str) and code.isdigit() else None


def error_code(e: Exception) -> str | None:
    response = getattr(e, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


CREDENTIALS = ": check the credentials this server was given (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, its role)"
OPERATOR_HINTS = {  # failures no retry heals by itself: said with what to check (an outside check saw only the code)
    **dict.fromkeys(
        ("SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidClientTokenId", "ExpiredToken"), CREDENTIALS
    ),
    "AccessDenied": ": these credentials may not read it (their permissions, or the bucket's policy)",
    "NoSuchBucket": ": create the bucket, or correct the store's s3://BUCKET/prefix (CLIPBANK_STORE, --store)",
}
