"""The built-in analyzers' clinical fit (minimum data): which units each processes by default.

Each site can replace any of these lists in the analyzer's settings, e.g.
``[analysis.analyzers."ct-lung"] body_parts = ["CHEST", "LUNG", "THORAX", "WHOLEBODY"]``.
Anatomic region codes are SNOMED CT (SCT) with their SNOMED-DICOM (SRT) equivalents, from
PS3.16 CID 4031 (Common Anatomic Regions).
"""

from __future__ import annotations

from dicomnode.analysis.plugin import ClinicalFit

# ct-lung: a CT that images the lungs.
CHEST_CT = ClinicalFit(
    purpose="a chest CT",
    body_parts=frozenset({"CHEST", "LUNG", "THORAX", "CHESTABDOMEN", "CHESTABDPELVIS"}),
    anatomic_regions=frozenset(
        {
            "SCT:51185008",  # chest
            "SCT:39607008",  # lung
            "SCT:416550000",  # chest and abdomen
            "SCT:416775004",  # chest, abdomen and pelvis
            "SRT:T-D3000",  # chest
            "SRT:T-28000",  # lung
        }
    ),
    protocols=("*CHEST*", "*THORAX*", "*THORAC*", "*LUNG*"),
    excluded_image_types=frozenset({"LOCALIZER"}),  # scouts are no volume of the chest
)

# xa-qca: a coronary angiogram.
CORONARY_ANGIOGRAPHY = ClinicalFit(
    purpose="a coronary angiogram",
    body_parts=frozenset({"HEART", "CORONARYARTERY"}),  # compared without spaces: "CORONARY ARTERY"
    anatomic_regions=frozenset(
        {
            "SCT:80891009",  # heart
            "SCT:41801008",  # coronary artery
            "SRT:T-32000",  # heart
            "SRT:T-43000",  # coronary artery
        }
    ),
    protocols=("*CORONAR*", "*CARDIAC*"),
)
