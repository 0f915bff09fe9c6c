"""The built-in `xa-qca` analyzer (`analyzer.XaQca`): classical quantitative coronary
analysis (QCA) of an X-ray angiography run, written back as a DICOM SEG of the coronary lumen
and a TID 1500 measurement report. `qca` is the image-analysis core (frame choice,
calibration, `analyze_frame` on one frame), free of DICOM encoding, networking and database
code; `phantom` draws synthetic angiograms with known ground truth. Research use only."""
