"""Safe private attributes (PS3.15 E.3.10, Table E.3.10-1) kept by the Retain Safe Private option.

Each row is (private creator, group, element bytes): the creator string as written in the
private creator element, the odd group in hex, and the low bytes ("xx" of (gggg,xxEE)) of the
elements the table lists for that creator, separated by spaces. A private element is kept only
when its block's creator and its group and low byte match a row; every other private element,
and every element of an unknown creator, is removed.

These rows are transcribed from Table E.3.10-1 (vendor attributes that carry no identity but
are needed to interpret the data, such as the Philips PET SUV scale factor). They are a subset
of the table: an attribute missing here is removed, which is the safe side.
"""

SAFE_PRIVATE_ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    ("Philips PET Private Group", "7053", "00 09"),
    ("Philips MR Imaging DD 001", "2005", "0D 0E"),
    ("Philips Imaging DD 001", "2001", "03 04"),
    ("Philips US Imaging DD 023", "200D", "45"),
    ("Philips US Imaging DD 033", "200D", "00 01 02 03 04 05 06 07 08 0D 0F 10 11 14 21"),
    (
        "Philips US Imaging DD 034",
        "200D",
        "01 02 03 04 05 08 09 0A 0B 0C 0D 0E 0F 10 11 12 13 14 17 18 1B 1C 1D 1E 1F 20 21 22 23 "
        "24 25 26 27 28",
    ),
    ("Philips US Imaging DD 035", "200D", "01 03 04 07 08 09 0A 0C 0D"),
    ("Philips US Imaging DD 036", "200D", "15 16 17 18 19 20"),
    ("Philips US Imaging DD 038", "200D", "01 02 03 04"),
    ("Philips US Imaging DD 039", "200D", "01 02 03 04 05 06 07 08 09 0A 0B 0C 0D 15"),
    ("Philips US Imaging DD 040", "200D", "01 02 03 04 05 06 07 20"),
    (
        "Philips US Imaging DD 042",
        "200D",
        "15 16 20 30 31 40 50 51 52 53 54 55 56 57 58 59 5A 5B 5C 5D 5E 5F 60 70 71 72 73 74 75 "
        "76 77 78 8C",
    ),
    ("Philips US Imaging DD 045", "200D", "F1 F3 F4 F5 F6 F8 FA FB"),
    ("Philips US Imaging DD 046", "200D", "17"),
    ("Philips US Imaging DD 048", "200D", "01"),
    ("Philips US Imaging DD 065", "200D", "07"),
    ("Philips US Imaging DD 066", "200D", "00 01 03 04"),
    ("SIEMENS MR HEADER", "0019", "0C 0D 0E 27"),
    ("ELSCINT1", "00E1", "21"),
    ("ELSCINT1", "01E1", "26 50"),
    ("ELSCINT1", "01F1", "01 07 26 27"),
    ("GEMS_ACQU_01", "0019", "23 24 27 9E"),
    ("GEMS_SERS_01", "0025", "07"),
    ("GEMS_PARM_01", "0043", "27 39 6F"),
    ("GEMS_HELIOS_01", "0045", "01 02"),
    (
        "GEMS_SENO_02",
        "0045",
        "06 1B 20 27 29 2A 2B 49 58 59 60 61 64 71 72 90 A0 A1 A2 A4 A7 A8",
    ),
    ("GEIIS PACS", "0903", "10 11 12"),
    ("HOLOGIC, Inc.", "7E01", "01 02 10 11 12"),
    ("HOLOGIC, Inc.", "7F01", "01 02 10 11 12"),
    (
        "HOLOGIC, Inc.",
        "0019",
        "06 07 08 16 25 26 27 28 29 30 31 32 33 34 35 37 40 41 42 43 44 45 46 50 51 52 53 60 61 "
        "62 70 71 80 85 87 89 8A 90 97 98",
    ),
    (
        "LORAD Selenia",
        "0019",
        "06 07 08 16 26 27 28 29 30 31 32 33 34 35 37 40 41 50 51 52 53 60 70 71 80 90",
    ),
    ("NQHeader", "0099", "01 04 05 10 20 21"),
    (
        "NQLeft",
        "0199",
        "01 02 03 04 05 06 07 08 09 0A 0B 0C 0D 0E 0F 10 11 12 13 14 15 16",
    ),
    (
        "NQRight",
        "0299",
        "01 02 03 04 05 06 07 08 09 0A 0B 0C 0D 0E 0F 10 11 12 13 14 15 16",
    ),
)
