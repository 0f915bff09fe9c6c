"""Query matching over the index: the one engine behind C-FIND, QIDO-RS, C-MOVE and C-GET.

Matching follows PS3.4 C.2.2.2 by the attribute's VR:
- empty value or ``*``: universal matching (the attribute is only returned);
- UI: single value or a backslash-separated list of UIDs;
- DA: single date or range ``A-B``, ``A-``, ``-B``; TM and DT: a single value matches the
  whole span it names (``10`` matches 10:00:00-10:59:59.999999), ranges as for DA;
- IS/US: numeric single value;
- PN: case-insensitive single value or wildcard (``*``, ``?``), by component group: a value
  without ``=`` matches a name when it matches any of the name's groups (alphabetic,
  ideographic, phonetic: ``홍^길동`` and ``Hong*`` both find ``Hong^Gildong=洪^吉洞=홍^길동``);
  a value with ``=`` matches group by group, an empty or ``*`` group matching any;
- other strings: case-sensitive single value or wildcard.
For string VRs a backslash-separated list matches any of its values.
Computed attributes (ModalitiesInStudy, the Number Of ... Related counts, ...) are filled from
the levels below; ModalitiesInStudy and SOPClassesInStudy can also be matched.
Attributes the index does not hold are returned empty, as PS3.4 allows.
A key value is bounded (MAX_KEY_VALUE_LENGTH characters per value, MAX_KEY_VALUES UIDs or
MAX_MATCH_VALUES other values in a list, numbers within 32 bits): beyond that the query is
refused as InvalidInput, before any SQL runs.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    String,
    and_,
    bindparam,
    distinct,
    exists,
    func,
    literal_column,
    or_,
    select,
    true,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.visitors import InternalTraversal

from dicomnode.archive import schema
from dicomnode.core.attributes import (
    COMPUTED,
    INDEXED,
    LEVEL_ORDER,
    UNIQUE_KEY,
    IndexedAttribute,
    levels_up_to,
)
from dicomnode.core.errors import InvalidInput
from dicomnode.core.model import Level, PatientIdentity, Query, StoredInstance
from dicomnode.core.uids import validate_uid

_TABLE = {
    Level.PATIENT: schema.patients,
    Level.STUDY: schema.studies,
    Level.SERIES: schema.series,
    Level.IMAGE: schema.instances,
}
_TIME_UPPER = "235959.999999"

# Bounds on a key's value: no indexed attribute's value is longer than 64 characters per
# component group (a range or a three-group name stays far below MAX_KEY_VALUE_LENGTH); a list of
# UIDs may be long (one IN), a list of other values shorter (each value is one more condition).
MAX_KEY_VALUE_LENGTH = 1024
MAX_KEY_VALUES = 1000
MAX_MATCH_VALUES = 100
_INT_RANGE = (-(2**31), 2**31 - 1)  # IS and US values fit in 32 bits
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def _shown(value: str, width: int = 64) -> str:
    """`value` for an error message: quoted, cut to `width` characters."""
    return repr(value if len(value) <= width else value[:width] + "...")


def _values(keyword: str, value: str, most: int = MAX_MATCH_VALUES) -> list[str]:
    """The backslash-separated values of a key, at most `most` of them, each within
    MAX_KEY_VALUE_LENGTH; InvalidInput if not."""
    items = value.split("\\")
    if len(items) > most:
        raise InvalidInput(f"{keyword}: more than {most} values")
    for item in items:
        if len(item) > MAX_KEY_VALUE_LENGTH:
            raise InvalidInput(
                f"{keyword} value too long: {len(item)} characters, limit "
                f"{MAX_KEY_VALUE_LENGTH}: {_shown(item)}"
            )
    return items


def _joined(level: Level) -> Any:
    """patients JOIN studies JOIN series JOIN instances, down to `level`."""
    p, st, se, i = schema.patients, schema.studies, schema.series, schema.instances
    joined: Any = p
    if level in (Level.STUDY, Level.SERIES, Level.IMAGE):
        joined = joined.join(st, st.c.patient_pk == p.c.id)
    if level in (Level.SERIES, Level.IMAGE):
        joined = joined.join(se, se.c.study_pk == st.c.id)
    if level == Level.IMAGE:
        joined = joined.join(i, i.c.series_pk == se.c.id)
    return joined


def _like_pattern(value: str) -> str:
    escaped = value.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return escaped.replace("*", "%").replace("?", "_")


def _item_condition(target: Any, item: str) -> ColumnElement[bool]:
    """`target` equals `item`, or matches it as a wildcard pattern when it has `*` or `?`."""
    if "*" in item or "?" in item:
        return target.like(_like_pattern(item), escape="!")
    return target == item


def _string_condition(column: Any, value: str, keyword: str = "") -> ColumnElement[bool]:
    """Case-sensitive single value or wildcard matching, any of a backslash list."""
    return or_(*(_item_condition(column, item) for item in _values(keyword, value)))


class _PersonNameGroup(FunctionElement):
    """Component group `group` (0 alphabetic, 1 ideographic, 2 phonetic) of a PN column's
    text, "" when the name has fewer groups (PS3.5 6.2: groups are separated by ``=``)."""

    type = String()
    inherit_cache = True
    name = "person_name_group"
    # The group number shapes the SQL, so it is part of the statement cache's key.
    _traverse_internals = [
        *FunctionElement._traverse_internals,
        ("group", InternalTraversal.dp_plain_obj),
    ]

    def __init__(self, column: Any, group: int) -> None:
        self.group = group
        super().__init__(column)


@compiles(_PersonNameGroup, "postgresql")
def _pn_group_postgresql(element: _PersonNameGroup, compiler: Any, **kw: Any) -> str:
    (column,) = element.clauses
    return compiler.process(func.split_part(column, "=", element.group + 1), **kw)


@compiles(_PersonNameGroup)
def _pn_group_sqlite(element: _PersonNameGroup, compiler: Any, **kw: Any) -> str:
    # SQLite has no split function: with "==" appended the text has a separator after each of
    # its three groups, so each group runs up to the next "=" of what follows the one before.
    (column,) = element.clauses
    separator, one = literal_column("'='"), literal_column("1")
    rest = column.concat(literal_column("'=='"))
    for _ in range(element.group):
        rest = func.substr(rest, func.instr(rest, separator) + one)
    return compiler.process(func.substr(rest, one, func.instr(rest, separator) - one), **kw)


def _person_name_condition(column: Any, value: str, keyword: str) -> ColumnElement[bool]:
    """PN matching: case-insensitive, by component group (see the module docstring)."""
    lowered = func.lower(column)
    conditions = []
    for item in _values(keyword, value.lower()):
        groups = item.split("=")
        if len(groups) > len(_PN_GROUPS):
            raise InvalidInput(f"{keyword}: a person name has at most 3 component groups")
        if len(groups) == 1:
            # One group asked: the name matches when any of its groups does.
            conditions.append(
                or_(
                    *(
                        _item_condition(_PersonNameGroup(lowered, n), item)
                        for n in range(len(_PN_GROUPS))
                    )
                )
            )
            continue
        asked = [
            _item_condition(_PersonNameGroup(lowered, n), group)
            for n, group in enumerate(groups)
            if group not in ("", "*")
        ]
        conditions.append(and_(*asked) if asked else true())
    return or_(*conditions)


def _upper_bound(value: str, vr: str) -> str:
    """The last instant a partial TM/DT value names: 10 -> 105959.999999."""
    if vr == "TM":
        return value + _TIME_UPPER[len(value) :] if len(value) < len(_TIME_UPPER) else value
    date_part = "99991231"
    full = date_part + _TIME_UPPER
    return value + full[len(value) :] if len(value) < len(full) else value


def _range_condition(column: Any, value: str, vr: str, keyword: str) -> ColumnElement[bool]:
    value = (
        value.replace(":", "") if vr == "TM" else value.replace(".", "") if vr == "DA" else value
    )
    if value.count("-") > 1 or (vr == "DA" and not value.replace("-", "").isdigit()):
        raise InvalidInput(f"{keyword}: not a valid {vr} match value: {_shown(value)}")
    if "-" not in value:
        if vr == "DA":
            return column == value
        return and_(column >= value, column <= _upper_bound(value, vr))
    low, high = value.split("-")
    conditions = []
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(column <= (high if vr == "DA" else _upper_bound(high, vr)))
    if not conditions:
        raise InvalidInput(f"{keyword}: a range needs at least one end, got {_shown(value)}")
    return and_(*conditions)


def attribute_condition(attribute: IndexedAttribute, value: str) -> ColumnElement[bool] | None:
    """The SQL condition for `attribute` matching `value`; None for universal matching."""
    value = value.strip()
    if value in ("", "*"):
        return None
    column = _TABLE[attribute.level].c[attribute.column]
    vr = attribute.vr
    keyword = attribute.keyword
    values = _values(keyword, value, MAX_KEY_VALUES if vr == "UI" else MAX_MATCH_VALUES)
    if vr == "UI":
        uids = [validate_uid(v, keyword) for v in values if v]
        return column.in_(uids)
    if vr in ("DA", "TM", "DT"):
        return _range_condition(column, value, vr, keyword)
    if attribute.is_integer:
        return column.in_([_integer(keyword, v) for v in values])
    if vr == "PN":
        return _person_name_condition(column, value, keyword)
    return _string_condition(column, value, keyword)


def _integer(keyword: str, text: str) -> int:
    """An integer key value (IS, US), within 32 bits; InvalidInput if not."""
    text = text.strip()
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not (digits.isascii() and digits.isdigit()):
        raise InvalidInput(f"{keyword}: not a number: {_shown(text)}")
    digits = digits.lstrip("0") or "0"
    number = int(digits) * (-1 if text.startswith("-") else 1) if len(digits) <= 10 else None
    if number is None or not _INT_RANGE[0] <= number <= _INT_RANGE[1]:
        raise InvalidInput(f"{keyword}: {_shown(text)} is out of range for an IS or US value")
    return number


def _computed_condition(keyword: str, value: str) -> ColumnElement[bool] | None:
    value = value.strip()
    if value in ("", "*"):
        return None
    st, se, i = schema.studies, schema.series, schema.instances
    if keyword == "ModalitiesInStudy":
        return exists(
            select(se.c.id).where(
                se.c.study_pk == st.c.id, _string_condition(se.c.modality, value, keyword)
            )
        )
    if keyword == "SOPClassesInStudy":
        uids = [validate_uid(v, keyword) for v in _values(keyword, value, MAX_KEY_VALUES) if v]
        return exists(
            select(i.c.id)
            .join(se, i.c.series_pk == se.c.id)
            .where(se.c.study_pk == st.c.id, i.c.sop_class_uid.in_(uids))
        )
    return None


def _not_retained() -> ColumnElement[bool]:
    """The study (``studies`` in the query) is not retained by law (item 33): such a study is
    seen only through `archive.retained`, never by a query or a retrieval."""
    r = schema.retained_studies
    return ~exists().where(r.c.study_instance_uid == schema.studies.c.study_instance_uid)


def _has_visible_study() -> ColumnElement[bool]:
    """The patient (``patients`` in the query) has a study that is not retained by law."""
    st = schema.studies
    return exists(select(st.c.id).where(st.c.patient_pk == schema.patients.c.id, _not_retained()))


def _filtered(level: Level, filters: Iterable[tuple[str, str]], columns: list[Any]) -> Select:
    query = select(*columns).select_from(_joined(level))
    query = query.where(_has_visible_study() if level == Level.PATIENT else _not_retained())
    allowed = set(levels_up_to(level))
    for keyword, value in filters:
        attribute = INDEXED.get(keyword)
        if attribute is not None and attribute.level in allowed:
            condition = attribute_condition(attribute, value)
        elif COMPUTED.get(keyword) == Level.STUDY and level != Level.PATIENT:
            condition = _computed_condition(keyword, value)
        else:
            condition = None
        if condition is not None:
            query = query.where(condition)
    return query


_PK_LABEL = {lv: f"_pk_{lv.value}" for lv in LEVEL_ORDER}


def search(conn: Connection, query: Query) -> list[dict[str, Any]]:
    """Rows matching `query`, each a dict keyword -> value for the unique keys of every level
    down to the query's, the filtered keys and the requested return keys."""
    level = query.level
    levels = levels_up_to(level)
    wanted = {UNIQUE_KEY[lv] for lv in levels}
    wanted |= {k for k, _ in query.filters} | set(query.return_keys)
    indexed = [INDEXED[k] for k in sorted(wanted) if k in INDEXED and INDEXED[k].level in levels]
    columns = [_TABLE[lv].c.id.label(_PK_LABEL[lv]) for lv in levels]
    columns += [_TABLE[a.level].c[a.column].label(a.keyword) for a in indexed]
    if level == Level.IMAGE:
        columns.append(schema.instances.c.transfer_syntax_uid.label("_ts"))
    statement = _filtered(level, query.filters, columns).order_by(_TABLE[level].c.id)
    if query.limit is not None:
        statement = statement.limit(query.limit)
    if query.offset:
        statement = statement.offset(query.offset)
    rows = [dict(r._mapping) for r in conn.execute(statement)]
    computed = sorted(k for k in wanted if k in COMPUTED and COMPUTED[k] in levels)
    if rows and computed:
        _fill_computed(conn, rows, computed)
    unsupported = wanted - set(INDEXED) - set(COMPUTED)
    for row in rows:
        public = {k: v for k, v in row.items() if not k.startswith("_")}
        for keyword in unsupported:
            public.setdefault(keyword, None)
        row.clear()
        row.update(public)
    return rows


_st, _se, _i = schema.studies, schema.series, schema.instances
# Outer joins, so that one query counts every level below its owner (DISTINCT skips NULLs).
_BELOW_STUDY = _st.outerjoin(_se, _se.c.study_pk == _st.c.id).outerjoin(
    _i, _i.c.series_pk == _se.c.id
)
# owning level -> (grouping column, joined tables); keyword -> counted column
_COUNT_GROUPS = {
    Level.PATIENT: (_st.c.patient_pk, _BELOW_STUDY),
    Level.STUDY: (_st.c.id, _BELOW_STUDY),
    Level.SERIES: (_se.c.id, _se.outerjoin(_i, _i.c.series_pk == _se.c.id)),
}
_COUNTED = {
    "NumberOfPatientRelatedStudies": _st.c.id,
    "NumberOfPatientRelatedSeries": _se.c.id,
    "NumberOfPatientRelatedInstances": _i.c.id,
    "NumberOfStudyRelatedSeries": _se.c.id,
    "NumberOfStudyRelatedInstances": _i.c.id,
    "NumberOfSeriesRelatedInstances": _i.c.id,
}
_STUDY_INSTANCES = _st.join(_se, _se.c.study_pk == _st.c.id).join(_i, _i.c.series_pk == _se.c.id)
_LISTS = {"SOPClassesInStudy": (_i.c.sop_class_uid, _STUDY_INSTANCES)}


@functools.cache
def _counts_statement(level: Level, keys: tuple[str, ...], by_modality: bool) -> Select:
    """Counts of `keys` per entity of `level` among the pks bound as `pks` (with a study's
    modalities, one group per modality). Built once per shape: a statement used again also
    skips SQLAlchemy's cache-key work."""
    group, joined = _COUNT_GROUPS[level]
    groups = (group, _se.c.modality) if by_modality else (group,)
    return (
        select(*groups, *(func.count(distinct(_COUNTED[k])) for k in keys))
        .select_from(joined)
        .where(group.in_(bindparam("pks", expanding=True)))
        .where(_not_retained() if level != Level.SERIES else true())  # a patient's counts
        .group_by(*groups)
    )


@functools.cache
def _list_statement(key: str) -> Select:
    """The distinct values of a list attribute (SOPClassesInStudy) per study in `pks`."""
    column, joined = _LISTS[key]
    return (
        select(_st.c.id, column)
        .select_from(joined)
        .where(_st.c.id.in_(bindparam("pks", expanding=True)), column.is_not(None))
        .distinct()
        .order_by(_st.c.id, column)
    )


def _fill_computed(conn: Connection, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """Fill the computed attributes of one page of rows: one grouped query for the counts of
    a level (a study's modalities with its counts), one for SOPClassesInStudy.

    Each attribute belongs to a level (COMPUTED) and is looked up by the row's key at that level,
    so a study's NumberOfPatientRelatedStudies is its patient's count.
    """
    with_modalities = "ModalitiesInStudy" in keys
    for level in _COUNT_GROUPS:
        level_keys = tuple(k for k in keys if k in _COUNTED and COMPUTED[k] == level)
        # A study's modalities come with its counts: grouped by study and modality, the counts
        # of one study's groups add up (a series has one modality).
        by_modality = level == Level.STUDY and with_modalities
        if not level_keys and not by_modality:
            continue
        owner = _PK_LABEL[level]
        pks = sorted({r[owner] for r in rows})
        statement = _counts_statement(level, level_keys, by_modality)
        totals: dict[int, list[int]] = {}
        modalities: dict[int, list[str]] = defaultdict(list)
        for pk, *values in conn.execute(statement, {"pks": pks}):
            if by_modality:
                modality, *values = values
                if modality is not None:
                    modalities[pk].append(modality)
            sums = totals.setdefault(pk, [0] * len(level_keys))
            for n, value in enumerate(values):
                sums[n] += value
        for row in rows:
            sums = totals.get(row[owner], [0] * len(level_keys))
            for n, key in enumerate(level_keys):
                row[key] = sums[n]
            if by_modality:
                row["ModalitiesInStudy"] = "\\".join(sorted(modalities.get(row[owner], []))) or None
    for key in keys:
        if key in _COUNTED or key == "ModalitiesInStudy":
            continue
        owner = _PK_LABEL[COMPUTED[key]]
        if key in _LISTS:
            pks = sorted({r[owner] for r in rows})
            collected: dict[int, list[str]] = defaultdict(list)
            for pk, value in conn.execute(_list_statement(key), {"pks": pks}):
                collected[pk].append(value)
            found_list = {pk: "\\".join(v) for pk, v in collected.items()}
            for row in rows:
                row[key] = found_list.get(row[owner])
        elif key == "AvailableTransferSyntaxUID":
            for row in rows:
                row[key] = row["_ts"]
        else:  # InstanceAvailability: everything the index holds is on line
            for row in rows:
                row[key] = "ONLINE"


def _instance_columns() -> list[Any]:
    """The columns of a StoredInstance, in its field order."""
    p, st, se, i = schema.patients, schema.studies, schema.series, schema.instances
    return [
        i.c.sop_instance_uid,
        i.c.sop_class_uid,
        se.c.series_instance_uid,
        st.c.study_instance_uid,
        p.c.patient_id,
        i.c.transfer_syntax_uid,
        i.c.blob_path,
        i.c.size,
        i.c.sha256,
    ]


# Keys that name a person: whatever hands data over matches them exactly, never as a pattern.
PERSON_KEYS = ("PatientID", "IssuerOfPatientID")


def find_instances(
    conn: Connection, level: Level, filters: Iterable[tuple[str, str]]
) -> list[StoredInstance]:
    """Every stored instance under the entities that match `filters` at `level`: what a
    retrieval (C-MOVE, C-GET, WADO-RS) hands over. Patient ID and its issuer are matched
    exactly (`A*` is the patient whose ID is `A*`); the other keys as C-FIND matches them."""
    st, se, i = schema.studies, schema.series, schema.instances
    allowed = set(levels_up_to(level))
    filters = list(filters)
    person = [_EXACT_COLUMNS[k] == v for k, v in filters if k in PERSON_KEYS]
    scoped = [
        (k, v)
        for k, v in filters
        if k not in PERSON_KEYS and k in INDEXED and INDEXED[k].level in allowed
    ]
    statement = (
        _filtered(Level.IMAGE, scoped, _instance_columns())
        .where(*person)
        .order_by(st.c.id, se.c.id, i.c.instance_number, i.c.id)
    )
    return [StoredInstance(*row) for row in conn.execute(statement)]


# Keys an exact selection may use: the identity of a person and the unique keys of the levels.
_EXACT_COLUMNS = {
    "PatientID": schema.patients.c.patient_id,
    "IssuerOfPatientID": schema.patients.c.issuer_of_patient_id,
    "StudyInstanceUID": schema.studies.c.study_instance_uid,
    "SeriesInstanceUID": schema.series.c.series_instance_uid,
    "SOPInstanceUID": schema.instances.c.sop_instance_uid,
}


def find_instances_exactly(
    conn: Connection, keys: Iterable[tuple[str, str]], include_retained: bool = False
) -> list[StoredInstance]:
    """Every stored instance whose attributes equal `keys` exactly: no wildcard, no list, no
    range (`*` is the value `*`). What is destroyed or handed to a data subject is selected
    this way, never with the query matcher. Studies retained by law (item 33) are left out
    unless `include_retained` (destruction, and the checks that refuse an erasure)."""
    st, se, i = schema.studies, schema.series, schema.instances
    conditions = []
    for keyword, value in keys:
        if keyword not in _EXACT_COLUMNS:
            raise InvalidInput(f"{keyword} cannot select what to delete or export")
        conditions.append(_EXACT_COLUMNS[keyword] == value)
    if not conditions:
        raise InvalidInput("an exact selection needs at least one key")
    statement = (
        select(*_instance_columns())
        .select_from(_joined(Level.IMAGE))
        .where(*conditions)
        .order_by(st.c.id, se.c.id, i.c.instance_number, i.c.id)
    )
    if not include_retained:
        statement = statement.where(_not_retained())
    return [StoredInstance(*row) for row in conn.execute(statement)]


def identity_keys(identity: PatientIdentity) -> tuple[tuple[str, str], ...]:
    """The exact keys that select one person's objects (issuer included when named)."""
    keys = (("PatientID", identity.patient_id),)
    if identity.issuer is not None:
        keys += (("IssuerOfPatientID", identity.issuer),)
    return keys


def issuers_of(conn: Connection, patient_id: str) -> list[str]:
    """The issuers the archive holds this exact Patient ID under ("" for none recorded)."""
    p = schema.patients
    return sorted(
        conn.execute(
            select(p.c.issuer_of_patient_id).where(p.c.patient_id == patient_id).distinct()
        ).scalars()
    )
