"""Study access tags in the index (migration 0012): which tags each study carries.

The table joins the index's one `schema.metadata`; `AccessTagStore.on_stored` is an intake
subscriber that gives a study the tags of the peer that sent it and of the access tag rules the
arriving object meets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import Column, Index, String, Table, select
from sqlalchemy.exc import IntegrityError

from dicomnode.archive.index import Index as IndexDatabase
from dicomnode.archive.schema import metadata
from dicomnode.core.model import IngestResult, Source

study_access_tags = Table(
    "study_access_tags",
    metadata,
    Column("study_instance_uid", String(64), primary_key=True),
    Column("tag", String(64), primary_key=True),
    Index("ix_study_access_tags_tag", "tag"),
)


class AccessTagStore:
    """The tags of studies; `intake_tags` maps a configured peer's name to its intake tags,
    `tags_by_rule` gives the tags an arriving object (its parsed header) from a source earns by
    the ``[[access_tag_rules]]`` (governance.access_tags.rule_tags, bound by compose)."""

    def __init__(
        self,
        index: IndexDatabase,
        intake_tags: Mapping[str, tuple[str, ...]] | None = None,
        tags_by_rule: Callable[[Any, Source], Iterable[str]] | None = None,
    ) -> None:
        self.index = index
        self.intake_tags = {name: tags for name, tags in (intake_tags or {}).items() if tags}
        self.tags_by_rule = tags_by_rule

    def tag(self, study_uid: str, tags: Iterable[str]) -> None:
        """Give `study_uid` every tag of `tags` it does not carry yet."""
        wanted = set(tags) - self.tags_of([study_uid]).get(study_uid, set())
        for tag in sorted(wanted):
            try:
                with self.index.write() as conn:
                    conn.execute(
                        study_access_tags.insert().values(study_instance_uid=study_uid, tag=tag)
                    )
            except IntegrityError:  # another process tagged it at the same moment
                pass

    def tags_of(self, study_uids: Iterable[str]) -> dict[str, set[str]]:
        """study UID -> its tags (studies without tags are left out)."""
        uids = sorted(set(study_uids))
        found: dict[str, set[str]] = {}
        with self.index.read() as conn:
            for start in range(0, len(uids), 500):
                rows = conn.execute(
                    select(study_access_tags.c.study_instance_uid, study_access_tags.c.tag).where(
                        study_access_tags.c.study_instance_uid.in_(uids[start : start + 500])
                    )
                )
                for study, tag in rows:
                    found.setdefault(study, set()).add(tag)
        return found

    def on_stored(self, result: IngestResult, source: Source) -> None:
        """Intake subscriber: a study gets the intake tags of the configured peer that sent it
        and the tag of every rule the arriving object meets."""
        tags = set(self.intake_tags.get(source.peer or "", ()))
        if self.tags_by_rule is not None:
            tags.update(self.tags_by_rule(result.header, source))
        if tags:
            self.tag(result.instance.study_instance_uid, tags)
