"""The image-analysis core of the built-in `xa-qca` analyzer: classical quantitative coronary
analysis (QCA) of one X-ray angiography frame (`qca.analyze_frame`), frame choice and
calibration helpers, and a synthetic angiography phantom with known ground truth
(`phantom`). No DICOM networking, database or plugin code lives here. Research use only."""
