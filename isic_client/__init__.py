"""ISIC Archive API v2 client (requests + pydantic only). The local ISIC-compatible server is tasks.fake.isic_server."""

from isic_client.client import IsicClient, explain_query_error
from isic_client.download import DownloadReport, download_images
from isic_client.models import Collection, FileRef, Image, ImageFiles, ImageMetadata, Page, validate_isic_id
from isic_client.retry import (
    ISIC_RETRY,
    InsecureTokenError,
    IsicApiError,
    IsicError,
    IsicTimeoutError,
    IsicTransportError,
    RetryPolicy,
    TruncatedBody,
)

__all__ = [
    "IsicClient", "explain_query_error", "DownloadReport", "download_images", "Collection", "FileRef", "Image",
    "ImageFiles", "ImageMetadata", "Page", "validate_isic_id", "ISIC_RETRY", "InsecureTokenError", "IsicApiError",
    "IsicError", "IsicTimeoutError", "IsicTransportError", "RetryPolicy", "TruncatedBody",
]
