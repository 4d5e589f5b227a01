"""What the pipeline counts of the messages it handles, for /v1/metrics (shared with MediaReader)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MessageCounters:
    received: int = 0
    answered: int = 0
    failed: int = 0
    duplicates: int = 0
    skipped: int = 0
    rate_limited: int = 0
    queued: int = 0
    spilled: int = 0  # left in the store while too many waited in memory, taken back later
    transcribed: int = 0
    merged: int = 0  # answered by the reply to a later message of their burst
    photos: int = 0  # shown to the model
    photos_unseen: int = 0  # not shown: not downloaded, unreadable, too large, or refused by the model
    documents: int = 0  # PDFs read (their text, or a scan's pages shown as photos)
    documents_unread: int = 0  # not downloaded, too large, password-protected, corrupt, or a scan unshown
    videos: int = 0  # shown to the model as frames
    videos_unseen: int = 0  # not downloaded, too large, undecodable, or refused by the model
