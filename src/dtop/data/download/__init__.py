"""Download the benchmarks, the R1M distractors and the training sets: resumable, verified, idempotent.

:mod:`.catalogue` names the official sources (:data:`CATALOGUE`) and mirrors, :mod:`.fetching`
fetches one file (resuming, retrying, checking its md5), :mod:`.archive` extracts the listed
images, and :mod:`.dataset` runs a whole dataset (:func:`download_dataset`). ``docs/data.md``
describes the layouts, what is verified and how interrupted runs continue.
"""

from dtop.data.download.archive import extract_archive
from dtop.data.download.catalogue import (
    BASE_URL_ENV,
    CATALOGUE,
    GLDV2_ARCHIVES,
    GLDV2_CLEAN_IMAGES,
    INDEX_KINDS,
    R1M_ARCHIVES,
    DatasetSource,
    Resource,
    expected_images,
    md5_resource,
    parse_md5_file,
    resolve_base_url,
    resource_url,
)
from dtop.data.download.dataset import MARKER_NAME, DownloadReport, download_dataset
from dtop.data.download.errors import ChecksumError, CorruptArchiveError, DownloadError
from dtop.data.download.fetching import CHUNK, USER_AGENT, fetch

__all__ = [
    "BASE_URL_ENV",
    "CATALOGUE",
    "CHUNK",
    "GLDV2_ARCHIVES",
    "GLDV2_CLEAN_IMAGES",
    "INDEX_KINDS",
    "MARKER_NAME",
    "R1M_ARCHIVES",
    "USER_AGENT",
    "ChecksumError",
    "CorruptArchiveError",
    "DatasetSource",
    "DownloadError",
    "DownloadReport",
    "Resource",
    "download_dataset",
    "expected_images",
    "extract_archive",
    "fetch",
    "md5_resource",
    "parse_md5_file",
    "resolve_base_url",
    "resource_url",
]
